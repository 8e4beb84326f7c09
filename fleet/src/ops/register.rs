//! Registering a device: issue its certificate, write its identity, put it in
//! the broker policy and in the registry, or leave nothing behind.
//!
//! The steps run in an order that puts the registry insert last: the
//! [`Store`] has no "delete device", so the row is the commit point and every
//! step before it can be undone. If a step fails, the steps before it are
//! undone in reverse:
//!
//! | failed step              | undone                                                        |
//! |--------------------------|---------------------------------------------------------------|
//! | validation, lookups      | nothing was written                                           |
//! | writing the identity     | partial files removed, certificate revoked                    |
//! | broker policy refresh    | files removed, certificate revoked                            |
//! | registry insert          | files removed, certificate revoked, broker policy refreshed again so the revocation is in force |
//!
//! "Revoked" is the undo of an issuance: a serial cannot be unissued, but a
//! revoked one is in the CRL and the ACL grants it nothing, so no usable
//! certificate remains. The broker policy is refreshed before the insert, so
//! a device may connect a moment before its row exists; the fleet service
//! ignores a device it does not know until then.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use edgebind_certs::bundle::{self, BundleForm};
use edgebind_certs::{DeviceCsr, IssuedCert, Pki, Validity};
use edgebind_protocol::bundle::{CA_CERT, DEVICE_CERT, DEVICE_KEY};
use edgebind_protocol::{DeviceId, Principal, UnitSerial};
use serde::Serialize;

use super::endpoint::{AgentBroker, agent_broker};
use super::{FleetHome, OpsError, PolicyRefresh, refresh_broker_policy};
use crate::registry::{
    Board, CertInfo, Device, Lifecycle, ManufacturingRecord, NewDevice, ProvisionedUnit, Store, Tag,
};

/// What a new device's identity is written as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IdentityOutput {
    /// A bundle directory (the four bundle files) and `<dir>.tar` beside it.
    Bundle { dir: PathBuf },
    /// Only the bundle tar (a factory line copies it onto the boot partition).
    TarOnly { tar: PathBuf },
    /// `device.crt`, `device.key` and `ca.crt` in `dir`, no `agent.toml`.
    CertificateFiles { dir: PathBuf },
    /// A personalized copy of a golden disk image: `golden` copied to
    /// `image` with the bundle tar on its FAT boot partition (`partition`,
    /// or the first FAT one). Made under a temporary name beside `image`
    /// ([`staging_path`]) and renamed onto it only once complete, so `image`
    /// is never a partial one.
    Image {
        golden: PathBuf,
        partition: Option<usize>,
        image: PathBuf,
    },
}

/// Where an [`IdentityOutput::Image`] is made before it is renamed onto
/// its name: `.<name>.partial` in the same directory.
pub fn staging_path(image: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(image.file_name().unwrap_or_default());
    name.push(".partial");
    image.with_file_name(name)
}

impl IdentityOutput {
    fn needs_agent_config(&self) -> bool {
        !matches!(self, IdentityOutput::CertificateFiles { .. })
    }

    /// Every path this output creates (what an undo removes).
    fn paths(&self) -> Vec<PathBuf> {
        match self {
            IdentityOutput::Bundle { dir } => vec![dir.clone(), bundle::tar_path_for(dir)],
            IdentityOutput::TarOnly { tar } => vec![tar.clone()],
            IdentityOutput::CertificateFiles { dir } => [DEVICE_CERT, DEVICE_KEY, CA_CERT]
                .map(|f| dir.join(f))
                .to_vec(),
            IdentityOutput::Image { image, .. } => vec![image.clone(), staging_path(image)],
        }
    }

    /// A new registration refuses to write over anything: what is there
    /// belongs to some earlier identity.
    fn check_free(&self) -> Result<(), OpsError> {
        // A staging copy left by an interrupted run is overwritten, not in the way.
        let mut paths = self.paths();
        if let IdentityOutput::Image { image, .. } = self {
            paths.retain(|p| p == image);
        }
        match paths.into_iter().find(|p| p.exists()) {
            Some(path) => Err(OpsError::OutputExists(path)),
            None => Ok(()),
        }
    }

    fn write(
        &self,
        issued: &IssuedCert,
        pki: &Pki,
        agent_toml: Option<&str>,
    ) -> Result<(), OpsError> {
        let toml = agent_toml.unwrap_or_default();
        match self {
            IdentityOutput::Bundle { dir } => {
                bundle::write_bundle(dir, issued, pki.root_pem(), toml)?;
            }
            IdentityOutput::TarOnly { tar } => {
                bundle::write_tar(tar, issued, pki.root_pem(), toml)?;
            }
            IdentityOutput::CertificateFiles { dir } => {
                issued.write_identity(dir, "device", pki.root_pem())?;
            }
            IdentityOutput::Image {
                golden,
                partition,
                image,
            } => write_image(
                golden,
                *partition,
                image,
                &bundle::tar_of(issued, pki.root_pem(), toml)?,
            )?,
        }
        Ok(())
    }

    fn remove(&self) {
        for p in self.paths() {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }

    fn form_for_batch(out: &Path, id: &DeviceId, form: BundleForm) -> Self {
        match form {
            BundleForm::DirectoryAndTar => IdentityOutput::Bundle {
                dir: out.join(id.as_str()),
            },
            BundleForm::TarOnly => IdentityOutput::TarOnly {
                tar: out.join(format!("{id}.tar")),
            },
        }
    }
}

/// Copy `golden` to the staging name of `image`, write `tar` onto its boot
/// partition, rename it onto `image`. On any error the staging copy is removed.
/// (How a registration writes [`IdentityOutput::Image`]; the console makes
/// an image of a device registered with a bundle the same way.)
pub fn write_image(
    golden: &Path,
    partition: Option<usize>,
    image: &Path,
    tar: &[u8],
) -> Result<(), OpsError> {
    let staging = staging_path(image);
    let made = (|| {
        std::fs::copy(golden, &staging).map_err(|e| OpsError::Io {
            path: staging.clone(),
            source: e,
        })?;
        edgebind_image::personalize(&staging, partition, tar).map_err(|e| OpsError::Image {
            path: golden.to_owned(),
            source: e,
        })?;
        std::fs::rename(&staging, image).map_err(|e| OpsError::Io {
            path: image.to_owned(),
            source: e,
        })
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    made
}

/// The manufacturing side of a registration at a flashing station: the
/// unit the identity goes into. With it, the registry insert also stores the
/// unit's [`ManufacturingRecord`] (one transaction: both or neither).
#[derive(Debug, Clone)]
pub struct Unit {
    /// The unit's serial number.
    pub serial: String,
    pub station: String,
    pub operator: String,
    /// SHA-256 (hex) of the golden image, in image mode.
    pub image_sha256: Option<String>,
}

impl Unit {
    /// The record of this unit made now with `issued` as `id`.
    pub fn record(&self, id: &DeviceId, issued: &IssuedCert) -> ManufacturingRecord {
        ManufacturingRecord {
            serial: self.serial.clone(),
            device: id.clone(),
            cert_serial: issued.serial.clone(),
            cert_fingerprint_sha256: issued.fingerprint_sha256.clone(),
            station: self.station.clone(),
            operator: self.operator.clone(),
            made_at: edgebind_protocol::messages::now_unix(),
            image_sha256: self.image_sha256.clone(),
        }
    }
}

/// A device to register.
#[derive(Debug, Clone)]
pub struct Registration {
    pub id: DeviceId,
    pub board: Board,
    pub tags: BTreeSet<Tag>,
    pub validity_days: u32,
    /// What `agent.toml` dials; `None`: the broker settings of the home.
    pub broker: Option<AgentBroker>,
    pub output: IdentityOutput,
    /// The unit a flashing station makes (its record is stored with the device).
    pub unit: Option<Unit>,
}

/// A registered device and where its identity went.
#[derive(Debug, Clone, Serialize)]
pub struct Registered {
    pub device: Device,
    pub serial: String,
    pub fingerprint_sha256: String,
    /// What `agent.toml` dials (none for certificate files alone).
    pub broker: Option<AgentBroker>,
    pub output: IdentityOutput,
    pub policy: PolicyRefresh,
    /// The unit's manufacturing record, when the registration made one.
    pub record: Option<ManufacturingRecord>,
}

fn cert_info(issued: &IssuedCert) -> CertInfo {
    CertInfo {
        serial: issued.serial.clone(),
        fingerprint_sha256: issued.fingerprint_sha256.clone(),
        not_after: issued.not_after.unix_timestamp().max(0) as u64,
    }
}

/// Register one device: validate, issue its certificate, write its identity,
/// refresh the broker policy, insert it into the registry. Completes, or
/// undoes what it did (see the module documentation).
pub fn register_device(
    home: &FleetHome,
    store: &mut dyn Store,
    req: &Registration,
) -> Result<Registered, OpsError> {
    // Everything that can be checked is checked before anything is issued.
    store.check_new_device(&req.id)?;
    req.output.check_free()?;
    let broker = resolve_broker(home, req.broker.as_ref(), &req.output)?;
    let pki = home.open_pki()?;

    let issued = pki.issue_device(&req.id, Validity::days(req.validity_days))?;
    let agent_toml = broker.as_ref().map(|b| b.agent_toml(&req.id));
    let undo = |e: OpsError, policy_in_force: bool| -> OpsError {
        req.output.remove();
        if let Err(revoke) = pki.revoke_serial(&issued.serial) {
            return OpsError::RollbackFailed {
                what: format!("revoking serial {} of {}", issued.serial, req.id),
                cause: Box::new(e),
                rollback: revoke.to_string(),
            };
        }
        if policy_in_force && let Err(refresh) = refresh_broker_policy(home, &pki) {
            return OpsError::RollbackFailed {
                what: format!(
                    "refreshing the broker policy after revoking {} (run `edgebind broker reload`)",
                    req.id
                ),
                cause: Box::new(e),
                rollback: refresh.to_string(),
            };
        }
        e
    };
    if let Err(e) = req.output.write(&issued, &pki, agent_toml.as_deref()) {
        return Err(undo(e, false));
    }
    let policy = match refresh_broker_policy(home, &pki) {
        Ok(p) => p,
        Err(e) => return Err(undo(e, false)),
    };
    let new = NewDevice {
        id: req.id.clone(),
        board: req.board.clone(),
        tags: req.tags.clone(),
        cert: Some(cert_info(&issued)),
    };
    let record = req.unit.as_ref().map(|u| u.record(&req.id, &issued));
    let inserted = match &record {
        Some(r) => store.add_manufactured(&new, r),
        None => store.add_device(&new),
    };
    let device = match inserted {
        Ok(d) => d,
        Err(e) => return Err(undo(e.into(), policy.applied.is_some())),
    };
    Ok(Registered {
        device,
        serial: issued.serial.clone(),
        fingerprint_sha256: issued.fingerprint_sha256.clone(),
        broker,
        output: req.output.clone(),
        policy,
        record,
    })
}

/// A unit's claim request, as the fleet service received it on the
/// provisioning listener: the topic named the batch (the claim CN) and the
/// serial (the client id); the payload carried the CSR.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub batch: DeviceId,
    pub serial: UnitSerial,
    pub csr_pem: String,
    /// The board the batch's units are registered with.
    pub board: Board,
    pub validity_days: u32,
}

/// A unit provisioned by the claim flow: what goes back to it.
#[derive(Debug, Clone, Serialize)]
pub struct Provisioned {
    pub device: DeviceId,
    /// The device certificate followed by the issuing CA.
    pub chain_pem: String,
    /// False when the unit had been provisioned with this same key already
    /// (it restarted before storing its certificate): the chain it was sent
    /// then, and nothing issued now.
    pub issued_now: bool,
}

/// Register a device from its claim request: the claim-flow sibling of
/// [`register_device`] (same checks, same undo), for a key made on the device.
///
/// Order: the batch's claim identity must hold a usable certificate (a
/// revoked batch provisions nothing); the CSR is verified and its id
/// validated ([`edgebind_certs::DeviceCsr`]); the serial must be on the
/// batch's allow-list and not provisioned (the same key asking again gets the
/// chain it was sent; another key is a re-provisioning, allowed only by
/// [`super::claim::reprovision_device`]'s policy); the id must be the one
/// the serial names ([`UnitSerial::device_id`]) and new. Then
/// the certificate is signed and the device registered together with its
/// serial's provisioning in one transaction
/// ([`Store::add_provisioned`]): if that fails, the certificate is revoked.
///
/// Unlike [`register_device`] the broker policy is not refreshed: a new
/// device certificate changes neither the ACL (devices are served by the
/// `%u` patterns, not by `user` blocks) nor the CRL, and a broker SIGHUP
/// per unit would not let a batch boot at once.
pub fn provision_device(
    pki: &Pki,
    store: &mut dyn Store,
    req: &ClaimRequest,
) -> Result<Provisioned, OpsError> {
    let claim = Principal::Claim(req.batch.clone());
    let now = time::OffsetDateTime::now_utc();
    if !pki.inventory()?.active_principals(now).contains(&claim) {
        return Err(OpsError::ClaimRefused(format!(
            "{claim} has no usable certificate (revoked or expired): the batch provisions nothing"
        )));
    }
    let csr = DeviceCsr::parse(&req.csr_pem)?;
    let entry = store.claim_serial(&req.serial)?;
    if let Some(entry) = &entry
        && entry.batch == req.batch
        && let Some(done) = &entry.provisioned
        && done.key_sha256 == csr.key_sha256()
        && &done.device == csr.requested()
    {
        return Ok(Provisioned {
            device: done.device.clone(),
            chain_pem: done.chain_pem.clone(),
            issued_now: false,
        });
    }
    if let Some(entry) = &entry
        && entry.batch == req.batch
        && entry.provisioned.is_some()
    {
        // Provisioned before, asking with a new key: its certificate expired
        // while it was offline, or someone holds the batch key.
        return super::claim::reprovision_device(pki, store, req, &csr);
    }
    crate::registry::rules::check_provision(&req.batch, &req.serial, entry.as_ref(), None)?;
    // A unit asks for the id its serial names (the one rule of
    // `edgebind_protocol`), so a claim identity can never choose a name.
    let own = req.serial.device_id();
    if csr.requested() != &own {
        return Err(OpsError::ClaimRefused(format!(
            "unit {} asked for the id {}; its serial names {own}",
            req.serial,
            csr.requested()
        )));
    }
    store.check_new_device(csr.requested())?;
    let issued = pki.sign_device_csr(&csr, Validity::days(req.validity_days))?;
    let new = NewDevice {
        id: csr.requested().clone(),
        board: req.board.clone(),
        tags: BTreeSet::new(),
        cert: Some(cert_info(&issued)),
    };
    let unit = ProvisionedUnit {
        device: csr.requested().clone(),
        key_sha256: csr.key_sha256().to_owned(),
        chain_pem: issued.chain_pem.clone(),
        at: edgebind_protocol::messages::now_unix(),
    };
    match store.add_provisioned(&new, &req.batch, &req.serial, &unit) {
        Ok(_) => Ok(Provisioned {
            device: unit.device,
            chain_pem: unit.chain_pem,
            issued_now: true,
        }),
        Err(e) => match pki.revoke_serial(&issued.serial) {
            Ok(_) => Err(e.into()),
            Err(revoke) => Err(OpsError::RollbackFailed {
                what: format!("revoking serial {} of {}", issued.serial, new.id),
                cause: Box::new(e.into()),
                rollback: revoke.to_string(),
            }),
        },
    }
}

fn resolve_broker(
    home: &FleetHome,
    given: Option<&AgentBroker>,
    output: &IdentityOutput,
) -> Result<Option<AgentBroker>, OpsError> {
    if !output.needs_agent_config() {
        return Ok(None);
    }
    match given {
        Some(b) => Ok(Some(b.clone())),
        None => agent_broker(home, None, None, None)
            .map(Some)
            .map_err(|e| OpsError::NoBrokerAddress(Box::new(e))),
    }
}

/// A fresh certificate for a device that is registered: the id stays, the
/// registry records the new certificate, the previous one stays valid until
/// it expires or is revoked (`revoke_serial`). Writes over `output`.
///
/// Undo: if the identity cannot be written or the registry cannot record the
/// certificate, the new certificate is revoked and the registry keeps the
/// previous one (files already overwritten then hold a revoked certificate;
/// the error says so). A broker policy refresh that fails afterwards is
/// reported in the result, not undone: the certificate is valid and
/// registered, and `edgebind broker reload` applies the policy.
pub fn renew_device(
    home: &FleetHome,
    store: &mut dyn Store,
    id: &DeviceId,
    validity_days: u32,
    broker: Option<&AgentBroker>,
    output: &IdentityOutput,
) -> Result<Renewed, OpsError> {
    renew(home, store, id, validity_days, broker, output, None)
}

/// [`renew_device`] for a unit made again at a flashing station
/// (`factory run --reissue`): the new certificate and the unit's new
/// manufacturing record are stored in one transaction. The unit must have a
/// record for the same device. An image output that was already written
/// when the registry refuses is removed (it holds a revoked certificate).
pub fn renew_unit(
    home: &FleetHome,
    store: &mut dyn Store,
    unit: &Unit,
    id: &DeviceId,
    validity_days: u32,
    broker: Option<&AgentBroker>,
    output: &IdentityOutput,
) -> Result<Renewed, OpsError> {
    renew(home, store, id, validity_days, broker, output, Some(unit))
}

fn renew(
    home: &FleetHome,
    store: &mut dyn Store,
    id: &DeviceId,
    validity_days: u32,
    broker: Option<&AgentBroker>,
    output: &IdentityOutput,
    unit: Option<&Unit>,
) -> Result<Renewed, OpsError> {
    let device = store.device(id)?;
    if device.lifecycle == Lifecycle::Revoked {
        return Err(OpsError::DeviceRevoked(id.clone()));
    }
    let broker = resolve_broker(home, broker, output)?;
    let pki = home.open_pki()?;
    let issued = pki.issue_device(id, Validity::days(validity_days))?;
    let agent_toml = broker.as_ref().map(|b| b.agent_toml(id));
    let undo = |e: OpsError| -> OpsError {
        if matches!(output, IdentityOutput::Image { .. }) {
            output.remove();
        }
        match pki.revoke_serial(&issued.serial) {
            Ok(_) => OpsError::RenewalUndone {
                id: id.clone(),
                serial: issued.serial.clone(),
                cause: Box::new(e),
            },
            Err(revoke) => OpsError::RollbackFailed {
                what: format!("revoking serial {} of {id}", issued.serial),
                cause: Box::new(e),
                rollback: revoke.to_string(),
            },
        }
    };
    output
        .write(&issued, &pki, agent_toml.as_deref())
        .map_err(undo)?;
    let record = unit.map(|u| u.record(id, &issued));
    match &record {
        Some(r) => store.record_reissue(r, &cert_info(&issued)),
        None => store.set_certificate(id, &cert_info(&issued)),
    }
    .map_err(|e| undo(e.into()))?;
    let policy = refresh_broker_policy(home, &pki).map_err(|e| e.to_string());
    Ok(Renewed {
        device: store.device(id)?,
        serial: issued.serial.clone(),
        fingerprint_sha256: issued.fingerprint_sha256.clone(),
        broker,
        policy,
        record,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Renewed {
    pub device: Device,
    pub serial: String,
    pub fingerprint_sha256: String,
    pub broker: Option<AgentBroker>,
    /// The refresh, or why it failed (the renewal stands either way).
    pub policy: Result<PolicyRefresh, String>,
    /// The unit's new manufacturing record ([`renew_unit`]).
    pub record: Option<ManufacturingRecord>,
}

/// Many new devices at once (a factory line): one board and tag set, one
/// bundle each in `out`.
#[derive(Debug, Clone)]
pub struct BatchRegistration {
    pub ids: Vec<DeviceId>,
    pub board: Board,
    pub tags: BTreeSet<Tag>,
    pub validity_days: u32,
    pub broker: Option<AgentBroker>,
    pub out: PathBuf,
    pub form: BundleForm,
    /// Issuing threads.
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchRegistered {
    pub registered: Vec<DeviceId>,
    /// Devices whose registry insert failed (each undone: files removed,
    /// certificate revoked), with the reason.
    pub failed: Vec<(DeviceId, String)>,
    pub broker: Option<AgentBroker>,
    pub policy: PolicyRefresh,
}

/// Register every device of a batch. Validation (ids new, outputs free,
/// broker address known) covers the whole batch before anything is issued.
/// Issuance and bundles are all or nothing: if one bundle cannot be written,
/// every bundle of the batch is removed and no certificate is recorded; if
/// the broker policy cannot be refreshed, every certificate is revoked and
/// every bundle removed. Each registry insert is then its own commit: a
/// device whose insert fails is undone alone and listed in `failed`.
pub fn register_devices(
    home: &FleetHome,
    store: &mut dyn Store,
    batch: &BatchRegistration,
    progress: impl Fn(usize) + Sync,
) -> Result<BatchRegistered, OpsError> {
    let outputs: Vec<IdentityOutput> = batch
        .ids
        .iter()
        .map(|id| IdentityOutput::form_for_batch(&batch.out, id, batch.form))
        .collect();
    for (id, output) in batch.ids.iter().zip(&outputs) {
        store.check_new_device(id)?;
        output.check_free()?;
    }
    let bundle = IdentityOutput::Bundle {
        dir: batch.out.clone(),
    };
    let broker = resolve_broker(home, batch.broker.as_ref(), &bundle)?
        .expect("bundles need the broker address");
    let pki = home.open_pki()?;
    std::fs::create_dir_all(&batch.out).map_err(|e| OpsError::Io {
        path: batch.out.clone(),
        source: e,
    })?;
    let remove_all = || outputs.iter().for_each(IdentityOutput::remove);
    let each = |issued: &IssuedCert| {
        let Some(edgebind_protocol::Principal::Device(id)) = &issued.principal else {
            unreachable!("a batch issues device certificates only")
        };
        bundle::write_into(
            &batch.out,
            batch.form,
            id,
            issued,
            pki.root_pem(),
            &broker.agent_toml(id),
        )
    };
    let issued = pki
        .issue_devices(
            &batch.ids,
            Validity::days(batch.validity_days),
            batch.threads,
            each,
            progress,
        )
        .inspect_err(|_| remove_all())?;
    let serials: Vec<String> = issued.iter().map(|c| c.serial.clone()).collect();
    let policy = match refresh_broker_policy(home, &pki) {
        Ok(p) => p,
        Err(e) => {
            remove_all();
            return Err(match pki.revoke_serials(&serials) {
                Ok(_) => e,
                Err(revoke) => OpsError::RollbackFailed {
                    what: format!("revoking the {} certificates of the batch", serials.len()),
                    cause: Box::new(e),
                    rollback: revoke.to_string(),
                },
            });
        }
    };
    let mut registered = Vec::with_capacity(issued.len());
    let mut failed = Vec::new();
    let mut undo_serials = Vec::new();
    for ((id, cert), output) in batch.ids.iter().zip(&issued).zip(&outputs) {
        match store.add_device(&NewDevice {
            id: id.clone(),
            board: batch.board.clone(),
            tags: batch.tags.clone(),
            cert: Some(cert_info(cert)),
        }) {
            Ok(_) => registered.push(id.clone()),
            Err(e) => {
                output.remove();
                undo_serials.push(cert.serial.clone());
                failed.push((id.clone(), e.to_string()));
            }
        }
    }
    let policy = if undo_serials.is_empty() {
        policy
    } else {
        pki.revoke_serials(&undo_serials)?;
        refresh_broker_policy(home, &pki)?
    };
    Ok(BatchRegistered {
        registered,
        failed,
        broker: Some(broker),
        policy,
    })
}
