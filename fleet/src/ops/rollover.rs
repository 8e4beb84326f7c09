//! Issuing-CA rollover without a fleet outage.
//!
//! [`rollover`] makes a new issuing CA under the same root
//! ([`edgebind_certs::Pki::rollover`]); from then on every certificate is
//! signed by it, renewals included, while the old one keeps signing its CRL,
//! so the broker (which trusts the root) accepts certificates of both during
//! the overlap. Devices move over as they renew (`edgebind device renew`
//! hurries them). [`retire_unused`] retires the old one once no usable
//! certificate depends on it; the fleet service runs it after each
//! retirement of renewed-away certificates.

use edgebind_certs::Rollover;
use serde::Serialize;

use super::{FleetHome, OpsError, PolicyRefresh, refresh_broker_policy};

#[derive(Debug, Clone, Serialize)]
pub struct RolledOver {
    pub rollover: Rollover,
    pub policy: PolicyRefresh,
}

/// Roll the issuing CA over (`days`: the new one's lifetime) and refresh
/// the broker policy, so its CRL file holds a CRL of each issuing CA.
pub fn rollover(home: &FleetHome, days: u32) -> Result<RolledOver, OpsError> {
    let rollover = home.open_pki()?.rollover(days)?;
    let pki = home.open_pki()?;
    let policy = refresh_broker_policy(home, &pki)?;
    Ok(RolledOver { rollover, policy })
}

/// What [`retire_unused`] did.
#[derive(Debug, Clone, Serialize)]
pub struct IssuersRetired {
    pub retired: Vec<String>,
    /// Previous issuing CAs that certificates still depend on.
    pub remaining: Vec<String>,
    pub policy: Option<PolicyRefresh>,
}

/// Retire previous issuing CAs on which no usable certificate depends.
pub fn retire_unused(home: &FleetHome) -> Result<IssuersRetired, OpsError> {
    let pki = home.open_pki()?;
    let retired = pki.retire_unused(time::OffsetDateTime::now_utc())?;
    let pki = home.open_pki()?;
    let policy = if retired.is_empty() {
        None
    } else {
        Some(refresh_broker_policy(home, &pki)?)
    };
    Ok(IssuersRetired {
        retired,
        remaining: pki.previous_issuers(),
        policy,
    })
}
