//! Keeping the broker's ACL and CRL in step with the PKI inventory: the one
//! "refresh the broker policy" every operation that issues or revokes calls.

use edgebind_broker::BrokerSettings;
use edgebind_certs::{CrlStatus, Pki};
use serde::Serialize;

use super::{FleetHome, OpsError};

/// What a refresh did. `applied` is `None` when no broker is configured in
/// the home (nothing to refresh: the PKI's own CRL is already current).
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRefresh {
    pub applied: Option<AppliedPolicy>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AppliedPolicy {
    pub crl: CrlStatus,
    /// Principals the ACL denies everything (all their certificates revoked).
    pub denied: Vec<String>,
    /// The CRL lapses within the broker's warning window of this many days.
    pub crl_lapses_soon: bool,
    pub crl_warn_days: u32,
    /// Usable certificates whose names the fleet must not sign (`broker audit`).
    pub misissued_usable: usize,
    /// Pid of the broker that was signalled, or why none was.
    pub reloaded_pid: Option<u32>,
    pub not_reloaded: Option<String>,
}

impl PolicyRefresh {
    /// A running broker was signalled and applies the new ACL and CRL now.
    pub fn reloaded(&self) -> bool {
        self.applied
            .as_ref()
            .is_some_and(|a| a.reloaded_pid.is_some())
    }
}

/// Re-render the broker's ACL and CRL from the PKI and signal a running
/// broker (SIGHUP: no client is disconnected). A broker that is not running
/// is not an error: it reads the files when it starts. Writing the files is
/// what can fail, and then nothing was signalled.
pub fn refresh_broker_policy(home: &FleetHome, pki: &Pki) -> Result<PolicyRefresh, OpsError> {
    let dir = home.broker_dir();
    let settings = match BrokerSettings::load(&dir) {
        Ok(s) => s,
        Err(edgebind_broker::Error::NotConfigured { .. }) => {
            return Ok(PolicyRefresh { applied: None });
        }
        Err(e) => return Err(OpsError::Policy(e)),
    };
    let generated =
        edgebind_broker::regenerate_policy(&dir, pki, &settings).map_err(OpsError::Policy)?;
    let now = time::OffsetDateTime::now_utc();
    let misissued_usable = pki
        .inventory()
        .map(|inv| inv.audit(now).into_iter().filter(|f| f.active).count())
        .unwrap_or(0);
    let (reloaded_pid, not_reloaded) = match edgebind_broker::process::reload(&dir) {
        Ok(pid) => (Some(pid), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(PolicyRefresh {
        applied: Some(AppliedPolicy {
            crl_lapses_soon: generated.crl.expires_within(now, settings.crl_warn_days),
            crl_warn_days: settings.crl_warn_days,
            crl: generated.crl,
            denied: generated.revoked,
            misissued_usable,
            reloaded_pid,
            not_reloaded,
        }),
    })
}
