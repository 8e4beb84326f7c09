//! Certificate renewal by the device ([`edgebind_protocol::renewal`]): the
//! fleet's side. The fleet service calls these for each request on a
//! device's renewal topic; nothing here touches the network.
//!
//! - [`sign_renewal`] signs a CSR only for a registered, non-revoked device
//!   whose current certificate (by the registry, and usable by the PKI) is
//!   the one presenting the request, at most once per
//!   [`RenewalPolicy::min_interval_s`]; the same key asking again gets the
//!   same certificate. The new certificate is recorded `pending`: the
//!   device's current one stays current until the device connects with the
//!   new one. Undo: a certificate the registry cannot record is revoked.
//! - [`confirm_renewal`]: the device connected with its new certificate;
//!   the previous one's grace period starts.
//! - [`retire_due`]: previous certificates whose grace period is over are
//!   revoked (CRL, broker reloaded) and marked retired.
//!
//! Two service instances never sign for one device at once: signing takes
//! the `renew/DEVICE` claim in the registry first ([`Store::claim`]), and
//! retiring takes `retire/SERIAL`.

use edgebind_certs::{DeviceCsr, Pki, Validity};
use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::now_unix;
use edgebind_protocol::renewal::Response;
use serde::Serialize;

use super::{FleetHome, OpsError, PolicyRefresh, refresh_broker_policy};
use crate::registry::cert_history::{RenewalCheck, check_renewal};
use crate::registry::{CertOrigin, CertRecord, CertState, Lifecycle, RegistryError, Store};

/// How the fleet signs renewals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RenewalPolicy {
    /// Lifetime of a renewed certificate, in seconds.
    pub validity_s: u64,
    /// At most one renewal signed per device in this many seconds.
    pub min_interval_s: u64,
    /// How long the previous certificate stays valid after the device
    /// connected with its new one (connections still open with it, a
    /// rollback of the device's files).
    pub grace_s: u64,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        RenewalPolicy {
            validity_s: u64::from(edgebind_certs::profile::default_days::DEVICE) * 86_400,
            min_interval_s: 3600,
            grace_s: 86_400,
        }
    }
}

/// Seconds a device waits when the request could not be handled now (the
/// registry failed, another instance is signing for it).
const RETRY_SOON_S: u64 = 30;

/// Answer one renewal request of `device` (the id of the topic it came on,
/// authenticated by the broker). Refusals are answers, not errors: what
/// the device did wrong or must wait for is in [`Response::Refused`]. An
/// error is the fleet's own failure (the PKI or registry), after which
/// nothing was recorded and no usable certificate remains.
pub fn sign_renewal(
    pki: &Pki,
    store: &mut dyn Store,
    device: &DeviceId,
    csr_pem: &str,
    current_serial: &str,
    policy: &RenewalPolicy,
    holder: &str,
) -> Result<Response, OpsError> {
    let refuse = |reason: String| Response::Refused {
        reason,
        retry_after_s: None,
    };
    let csr = match DeviceCsr::parse(csr_pem) {
        Ok(csr) => csr,
        Err(e) => return Ok(refuse(e.to_string())),
    };
    if csr.requested() != device {
        return Ok(refuse(format!(
            "the CSR asks for {}, but the request came from {device}",
            csr.requested()
        )));
    }
    let row = match store.device(device) {
        Ok(d) => d,
        Err(RegistryError::UnknownDevice(_)) => {
            return Ok(refuse(format!("device {device} is not registered")));
        }
        Err(e) => return Err(e.into()),
    };
    if row.lifecycle == Lifecycle::Revoked {
        return Ok(refuse(format!("device {device} is revoked")));
    }
    let mut row = row;
    let mut history = store.cert_history(device)?;
    let presented = edgebind_certs::inventory::normalize_serial(current_serial);
    if history
        .iter()
        .any(|r| r.state == CertState::Pending && r.serial == presented)
    {
        // Connected with a renewed certificate whose confirmation never
        // arrived (lost with a restart): the request itself proves it.
        store.confirm_certificate(device, &presented, now_unix())?;
        row = store.device(device)?;
        history = store.cert_history(device)?;
    }
    let now = now_unix();
    match check_renewal(
        &row,
        &history,
        current_serial,
        csr.key_sha256(),
        now,
        policy.min_interval_s,
    ) {
        RenewalCheck::Refuse {
            reason,
            retry_after_s,
        } => {
            return Ok(Response::Refused {
                reason,
                retry_after_s,
            });
        }
        RenewalCheck::Resend(r) => {
            return Ok(Response::Issued {
                device_id: device.clone(),
                serial: r.serial,
                chain_pem: r.chain_pem.unwrap_or_default(),
            });
        }
        RenewalCheck::Sign => {}
    }
    // The registry's current certificate must also be usable in the PKI: a
    // certificate revoked by serial renews nothing.
    let inventory = pki.inventory()?;
    let usable = inventory
        .by_serial(current_serial)
        .is_some_and(|e| e.is_active(time::OffsetDateTime::now_utc()));
    if !usable {
        return Ok(refuse(format!(
            "certificate {current_serial} of {device} is revoked, expired or unknown to the PKI"
        )));
    }
    if !store.claim(&format!("renew/{device}"), holder, RETRY_SOON_S)? {
        return Ok(Response::Refused {
            reason: format!("another fleet service instance is renewing {device}"),
            retry_after_s: Some(RETRY_SOON_S),
        });
    }
    let issued = pki.sign_device_csr(&csr, Validity::seconds(policy.validity_s))?;
    let record = CertRecord {
        device: device.clone(),
        serial: issued.serial.clone(),
        fingerprint_sha256: issued.fingerprint_sha256.clone(),
        not_after: issued.not_after.unix_timestamp().max(0) as u64,
        issued_at: now,
        origin: CertOrigin::Renewed,
        state: CertState::Pending,
        key_sha256: Some(csr.key_sha256().to_owned()),
        chain_pem: Some(issued.chain_pem.clone()),
        confirmed_at: None,
        superseded_at: None,
        retired_at: None,
    };
    let abandoned = match store.record_renewal(&record) {
        Ok(a) => a,
        Err(e) => {
            return Err(match pki.revoke_serial(&issued.serial) {
                Ok(_) => OpsError::RenewalUndone {
                    id: device.clone(),
                    serial: issued.serial.clone(),
                    cause: Box::new(e.into()),
                },
                Err(revoke) => OpsError::RollbackFailed {
                    what: format!("revoking serial {} of {device}", issued.serial),
                    cause: Box::new(e.into()),
                    rollback: revoke.to_string(),
                },
            });
        }
    };
    // A renewal signed earlier and never confirmed will never be: the
    // device made a new key since. Revoke it now rather than let it live.
    if !abandoned.is_empty()
        && let Err(e) = revoke_known(pki, &abandoned)
    {
        tracing::warn!(%device, error = %e, "abandoned renewal certificates not revoked yet");
    }
    Ok(Response::Issued {
        device_id: device.clone(),
        serial: issued.serial,
        chain_pem: issued.chain_pem,
    })
}

/// The device says it is connected with certificate `serial`. Returns the
/// records changed (empty when it was current already).
pub fn confirm_renewal(
    store: &mut dyn Store,
    device: &DeviceId,
    serial: &str,
) -> Result<Vec<CertRecord>, OpsError> {
    Ok(store.confirm_certificate(device, serial, now_unix())?)
}

/// What [`retire_due`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Retired {
    pub serials: Vec<String>,
    /// The broker policy refresh, or why it failed (the revocation stands:
    /// the CRL in the PKI has it, `edgebind broker reload` applies it).
    pub policy: Option<Result<PolicyRefresh, String>>,
}

/// Revoke every previous certificate whose grace period is over at `now`.
pub fn retire_due(
    home: &FleetHome,
    pki: &Pki,
    store: &mut dyn Store,
    grace_s: u64,
    now: u64,
    holder: &str,
) -> Result<Retired, OpsError> {
    let due = store.due_retirements(now.saturating_sub(grace_s))?;
    let mut serials = Vec::new();
    for r in due {
        if store.claim(&format!("retire/{}", r.serial), holder, 300)? {
            serials.push(r.serial);
        }
    }
    if serials.is_empty() {
        return Ok(Retired {
            serials,
            policy: None,
        });
    }
    revoke_known(pki, &serials)?;
    store.mark_retired(&serials, now)?;
    let policy = refresh_broker_policy(home, pki).map_err(|e| e.to_string());
    Ok(Retired {
        serials,
        policy: Some(policy),
    })
}

/// Revoke those of `serials` the PKI knows (one CRL for all).
pub(super) fn revoke_known(pki: &Pki, serials: &[String]) -> Result<(), OpsError> {
    let inventory = pki.inventory()?;
    let known: Vec<String> = serials
        .iter()
        .filter(|s| inventory.by_serial(s).is_some())
        .cloned()
        .collect();
    if !known.is_empty() {
        pki.revoke_serials(&known)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "renew_tests.rs"]
mod tests;
