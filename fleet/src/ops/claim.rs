//! The factory's side of claim-based first boot: a batch's allow-list and
//! its claim identity (the bundle that goes into the golden image).
//!
//! How a factory runs it:
//! 1. `edgebind factory claim-identity --batch line-7 --out claim/`: the
//!    batch's claim certificate (`claim:line-7`, short-lived) and a *claim
//!    bundle* ([`edgebind_protocol::bundle`]) whose tar goes onto the golden
//!    image's boot partition (`edgebind image personalize`), the same for
//!    every unit of the batch.
//! 2. `edgebind factory allow --batch line-7 --serials serials.txt`: the
//!    serials the batch may provision, each once.
//! 3. `edgebind fleet serve` answers the units' requests on the provisioning
//!    listener ([`crate::service::provision`]); revoking `claim:line-7`
//!    (`edgebind pki revoke claim:line-7`) stops new provisioning and leaves
//!    the provisioned devices alone.
//!
//! Re-provisioning ([`reprovision_device`]): a unit whose device certificate
//! expired while it was offline asks again through the same claim identity,
//! for its own id, with a new key. The policy is
//! [`crate::registry::rules::check_reprovision`] (its serial, its id, not
//! revoked, the certificate expired); the new certificate becomes the
//! device's current one in the registry's history (origin
//! `reprovisioned`), the expired one is revoked, and the audit log says so.
//! A batch whose claim identity was revoked or has expired re-provisions
//! nothing: `edgebind device reissue DEV` is then the way back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use edgebind_certs::{DeviceCsr, Pki, Validity, bundle};
use edgebind_protocol::bundle::{SerialSource, claim_agent_toml};
use edgebind_protocol::{DeviceId, Principal, UnitSerial};
use serde::Serialize;

use super::{AgentBroker, ClaimRequest, FleetHome, OpsError, Provisioned};
use crate::registry::{
    AllowReport, CertOrigin, CertRecord, CertState, ProvisionedUnit, RegistryError, Store, rules,
};

/// Read a serials file: one serial per line; blank lines and lines starting
/// with `#` are skipped, surrounding white space is ignored. Every bad line
/// (not a [`UnitSerial`], or a serial given twice) is named with its line
/// number, and then nothing is returned.
pub fn read_serials(path: &Path) -> Result<Vec<UnitSerial>, OpsError> {
    let text = std::fs::read_to_string(path).map_err(|e| OpsError::Io {
        path: path.to_owned(),
        source: e,
    })?;
    parse_serials(&text).map_err(|problems| {
        OpsError::Factory(format!(
            "serials file {}: nothing was allowed; {} bad line(s):\n  {}",
            path.display(),
            problems.len(),
            problems.join("\n  ")
        ))
    })
}

/// [`read_serials`] on text: the serials, or every problem.
pub fn parse_serials(text: &str) -> Result<Vec<UnitSerial>, Vec<String>> {
    let mut serials = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut problems = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let s = raw.trim();
        if s.is_empty() || s.starts_with('#') {
            continue;
        }
        match UnitSerial::new(s) {
            Ok(serial) => match seen.get(&serial.device_id().to_string()) {
                // Two spellings of one unit would be one device id.
                Some(first) => problems.push(format!(
                    "line {line}: serial {s:?} repeats line {first} (serials that differ only in case are one unit)"
                )),
                None => {
                    seen.insert(serial.device_id().to_string(), line);
                    serials.push(serial);
                }
            },
            Err(e) => problems.push(format!("line {line}: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(serials)
    } else {
        Err(problems)
    }
}

/// What `factory allow` did.
#[derive(Debug, Clone, Serialize)]
pub struct Allowed {
    pub batch: DeviceId,
    #[serde(flatten)]
    pub report: AllowReport,
}

/// Put `serials` on the allow-list of `batch` (all or nothing; see
/// [`Store::allow_serials`]).
pub fn allow(
    store: &mut dyn Store,
    batch: &DeviceId,
    serials: &[UnitSerial],
) -> Result<Allowed, OpsError> {
    Ok(Allowed {
        batch: batch.clone(),
        report: store.allow_serials(batch, serials)?,
    })
}

/// A batch's claim identity to issue.
#[derive(Debug, Clone)]
pub struct ClaimIdentityRequest {
    pub batch: DeviceId,
    pub validity_days: u32,
    /// What the units' `agent.toml` dials; `None`: the home's broker settings.
    pub broker: Option<AgentBroker>,
    /// The provisioning listener's port; `None`: the home's broker settings.
    pub provisioning_port: Option<u16>,
    /// Where each unit reads its serial number.
    pub serial: SerialSource,
    /// The bundle directory (must not exist); its tar is written beside it.
    pub out: PathBuf,
}

/// An issued claim identity and its bundle.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimIdentity {
    pub principal: String,
    pub serial: String,
    pub fingerprint_sha256: String,
    pub not_after: u64,
    pub broker: AgentBroker,
    pub provisioning_port: u16,
    pub dir: PathBuf,
    /// The tar for the golden image's boot partition.
    pub tar: PathBuf,
}

/// Issue the batch's claim identity and write its claim bundle. Issuing
/// again for a batch is a renewal (the earlier certificate stays valid
/// until it expires or is revoked). If the bundle cannot be written, the
/// new certificate is revoked.
pub fn claim_identity(
    home: &FleetHome,
    req: &ClaimIdentityRequest,
) -> Result<ClaimIdentity, OpsError> {
    if req.out.exists() || bundle::tar_path_for(&req.out).exists() {
        return Err(OpsError::OutputExists(req.out.clone()));
    }
    let broker = match &req.broker {
        Some(b) => b.clone(),
        None => super::agent_broker(home, None, None, None)
            .map_err(|e| OpsError::NoBrokerAddress(Box::new(e)))?,
    };
    let provisioning_port = match req.provisioning_port {
        Some(p) => p,
        None => edgebind_broker::BrokerSettings::load(&home.broker_dir())?
            .provisioning_port
            .ok_or_else(|| {
                OpsError::Factory(
                    "the broker has no provisioning listener: run `edgebind broker config --provisioning-port PORT` (or pass --provisioning-port)".into(),
                )
            })?,
    };
    let pki = home.open_pki()?;
    let principal = Principal::Claim(req.batch.clone());
    let issued = pki.issue(&principal, Validity::days(req.validity_days))?;
    let toml = claim_agent_toml(
        &broker.host,
        broker.port,
        broker.server_name.as_deref(),
        provisioning_port,
        &req.serial,
    );
    let written = bundle::write_claim_bundle(&req.out, &issued, pki.root_pem(), &toml);
    let paths = match written {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&req.out);
            let _ = std::fs::remove_file(bundle::tar_path_for(&req.out));
            return match pki.revoke_serial(&issued.serial) {
                Ok(_) => Err(e.into()),
                Err(revoke) => Err(OpsError::RollbackFailed {
                    what: format!("revoking serial {} of {principal}", issued.serial),
                    cause: Box::new(e.into()),
                    rollback: revoke.to_string(),
                }),
            };
        }
    };
    Ok(ClaimIdentity {
        principal: principal.cn(),
        serial: issued.serial.clone(),
        fingerprint_sha256: issued.fingerprint_sha256.clone(),
        not_after: issued.not_after.unix_timestamp().max(0) as u64,
        broker,
        provisioning_port,
        dir: paths.dir,
        tar: paths.tar,
    })
}

/// The audit action of a re-provisioning.
pub const REPROVISION_ACTION: &str = "device.reprovision";

/// Issue a new certificate to a provisioned unit asking again with a new
/// key (its own had expired; see the module documentation). Called by
/// [`super::provision_device`] once it knows the serial was provisioned and
/// the batch's claim identity is usable. Refusals are errors naming the
/// reason ([`RegistryError::NoReprovision`], [`RegistryError::Revoked`], …);
/// a certificate the registry does not take is revoked again.
pub fn reprovision_device(
    pki: &Pki,
    store: &mut dyn Store,
    req: &ClaimRequest,
    csr: &DeviceCsr,
) -> Result<Provisioned, OpsError> {
    let now = edgebind_protocol::messages::now_unix();
    let entry = store.claim_serial(&req.serial)?;
    let device = match store.device(csr.requested()) {
        Ok(d) => Some(d),
        Err(RegistryError::UnknownDevice(_)) => None,
        Err(e) => return Err(e.into()),
    };
    // Checked before signing (nothing is signed for a refusal), and again
    // in the registry transaction (the final word).
    rules::check_reprovision(
        &req.batch,
        &req.serial,
        entry.as_ref(),
        device.as_ref(),
        csr.requested(),
        now,
    )?;
    let previous = device.and_then(|d| d.cert).map(|c| c.serial);
    let issued = pki.sign_device_csr(csr, Validity::days(req.validity_days))?;
    let record = CertRecord {
        device: csr.requested().clone(),
        serial: issued.serial.clone(),
        fingerprint_sha256: issued.fingerprint_sha256.clone(),
        not_after: issued.not_after.unix_timestamp().max(0) as u64,
        issued_at: now,
        origin: CertOrigin::Reprovisioned,
        state: CertState::Current,
        key_sha256: Some(csr.key_sha256().to_owned()),
        chain_pem: Some(issued.chain_pem.clone()),
        confirmed_at: None,
        superseded_at: None,
        retired_at: None,
    };
    let unit = ProvisionedUnit {
        device: csr.requested().clone(),
        key_sha256: csr.key_sha256().to_owned(),
        chain_pem: issued.chain_pem.clone(),
        at: now,
    };
    let superseded = match store.reprovision(&req.batch, &req.serial, &unit, &record, now) {
        Ok(s) => s,
        Err(e) => {
            return Err(match pki.revoke_serial(&issued.serial) {
                Ok(_) => e.into(),
                Err(revoke) => OpsError::RollbackFailed {
                    what: format!("revoking serial {} of {}", issued.serial, unit.device),
                    cause: Box::new(e.into()),
                    rollback: revoke.to_string(),
                },
            });
        }
    };
    // Expired anyway; revoked so the CRL names every certificate the fleet
    // gave up. A failure here leaves an expired certificate out of the CRL,
    // which the broker refuses regardless: logged, not fatal.
    if let Err(e) = super::renew::revoke_known(pki, &superseded) {
        tracing::warn!(device = %unit.device, error = %e, "re-provisioned; the superseded certificates are not revoked yet");
    }
    let detail = format!(
        "serial {} of batch {}: certificate {} replaces {} (expired)",
        req.serial,
        req.batch,
        issued.serial,
        previous.as_deref().unwrap_or("none")
    );
    let actor = edgebind_protocol::Principal::Claim(req.batch.clone()).cn();
    if let Err(e) = super::audit::record(
        store,
        &actor,
        REPROVISION_ACTION,
        unit.device.as_str(),
        &detail,
    ) {
        tracing::warn!(device = %unit.device, error = %e, "re-provisioned, but not in the audit log");
    }
    Ok(Provisioned {
        device: unit.device,
        chain_pem: unit.chain_pem,
        issued_now: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serials_file_names_every_bad_line() {
        let ok = parse_serials("# line 7\nSN-1\n\n  SN-2  \n").unwrap();
        assert_eq!(
            ok,
            [
                UnitSerial::new("SN-1").unwrap(),
                UnitSerial::new("SN-2").unwrap()
            ]
        );
        let bad = parse_serials("SN-1\nSN 2\nsn-1\n/x\n").unwrap_err();
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad[0].starts_with("line 2:"), "{bad:?}");
        assert!(
            bad[1].starts_with("line 3:") && bad[1].contains("repeats line 1"),
            "{bad:?}"
        );
        assert!(bad[2].starts_with("line 4:"), "{bad:?}");
    }
}
