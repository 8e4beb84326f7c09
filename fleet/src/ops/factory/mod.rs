//! The flashing station: make a batch of units from a manifest, each one
//! registered and issued through [`register_device`] (or [`renew_unit`]
//! with `--reissue`) with its [`ManufacturingRecord`] stored in the same
//! registry transaction, and its identity written as a personalized copy of
//! a golden image or as a bundle tar (for a duplicator).
//!
//! - [`run`]: the batch. Units whose serial already has a record are
//!   skipped (they never get a second certificate) unless `reissue`. A unit
//!   that fails is reported and undone by the registration's own undo
//!   (files removed, certificate revoked, no registry row, no record), and
//!   the batch goes on; an image that cannot take a bundle at all (its boot
//!   partition is full) stops the batch, since every unit would fail alike.
//! - [`export`] / [`import`]: records (and the devices they register, and
//!   their certificates' inventory entries) from a station registry into the
//!   fleet registry; idempotent, one registry transaction.
//! - [`station_kit`]: what an offline station needs: the issuing CA (never
//!   the root key), the root certificate, the CRL, an empty registry.

pub mod manifest;

use std::io::Read;
use std::path::{Path, PathBuf};

use edgebind_certs::InventoryEntry;
use edgebind_certs::layout::{CRL, INVENTORY, ISSUING_CERT, ISSUING_KEY, ROOT_CERT, ROOT_KEY};
use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::now_unix;
use serde::{Deserialize, Serialize};

use super::{
    AgentBroker, FleetHome, IdentityOutput, OpsError, Registration, Unit, agent_broker,
    register_device, renew_unit,
};
use crate::registry::{
    CertInfo, ImportReport, Lifecycle, ManufacturingRecord, NewDevice, RegistryError, Store,
};
pub use manifest::{ManifestError, ManifestUnit, device_id_for_serial, read_manifest};

/// What the station writes per unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FactoryOutput {
    /// `<out>/<device id>.<ext of golden>`: a personalized copy of `golden`.
    Image {
        golden: PathBuf,
        partition: Option<usize>,
    },
    /// `<out>/<device id>.tar`: the bundle, for a duplicator that flashes the
    /// golden image and copies the bundle itself.
    Bundles,
}

/// A batch to make.
#[derive(Debug, Clone)]
pub struct FactoryRun {
    pub units: Vec<ManifestUnit>,
    pub output: FactoryOutput,
    pub out: PathBuf,
    pub station: String,
    pub operator: String,
    pub validity_days: u32,
    /// What `agent.toml` dials; `None`: the station kit's broker
    /// (`<home>/station.json`), else the home's broker settings.
    pub broker: Option<AgentBroker>,
    /// Make units that have a record again, with a new certificate.
    pub reissue: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Made,
    Reissued,
    /// Already made (a record exists): nothing issued, nothing written.
    Skipped,
    Failed,
    /// The batch stopped before this unit (see [`FactoryReport::stopped`]).
    NotAttempted,
}

/// One unit of a batch and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct UnitResult {
    pub line: u64,
    pub serial: String,
    pub device: DeviceId,
    pub outcome: Outcome,
    pub cert_serial: Option<String>,
    pub fingerprint_sha256: Option<String>,
    pub output: Option<PathBuf>,
    pub error: Option<String>,
}

impl UnitResult {
    /// `line 3 (unit "SN-3", device sn-3)`, for messages.
    pub fn label(&self) -> String {
        format!(
            "line {} (unit {:?}, device {})",
            self.line, self.serial, self.device
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FactoryReport {
    pub station: String,
    pub operator: String,
    /// SHA-256 of the golden image (image mode).
    pub image_sha256: Option<String>,
    pub units: Vec<UnitResult>,
    pub made: usize,
    pub reissued: usize,
    pub skipped: usize,
    pub failed: usize,
    /// Why the batch stopped early, if it did.
    pub stopped: Option<String>,
}

impl FactoryReport {
    /// Every unit was made, reissued or already done.
    pub fn all_done(&self) -> bool {
        self.failed == 0 && self.stopped.is_none()
    }
}

/// The station's own settings, written by [`station_kit`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StationFile {
    pub station: Option<String>,
    pub broker: Option<StationBroker>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StationBroker {
    pub host: String,
    pub port: u16,
    pub server_name: Option<String>,
}

/// `<home>/station.json`.
pub const STATION_FILE: &str = "station.json";

fn station_file(home: &FleetHome) -> Result<Option<StationFile>, OpsError> {
    let path = home.root().join(STATION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| OpsError::Factory(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(OpsError::Io { path, source: e }),
    }
}

/// The station name a kit recorded, if any (the CLI's default `--station`).
pub fn kit_station_name(home: &FleetHome) -> Option<String> {
    station_file(home).ok().flatten().and_then(|s| s.station)
}

fn resolve_broker(home: &FleetHome, given: Option<&AgentBroker>) -> Result<AgentBroker, OpsError> {
    if let Some(b) = given {
        return Ok(b.clone());
    }
    if let Some(b) = station_file(home)?.and_then(|s| s.broker) {
        return Ok(AgentBroker {
            host: b.host,
            port: b.port,
            server_name: b.server_name,
        });
    }
    agent_broker(home, None, None, None).map_err(|e| OpsError::NoBrokerAddress(Box::new(e)))
}

/// SHA-256 (hex) of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, OpsError> {
    let io = |e| OpsError::Io {
        path: path.to_owned(),
        source: e,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn output_for(run: &FactoryRun, id: &DeviceId) -> IdentityOutput {
    match &run.output {
        FactoryOutput::Image { golden, partition } => {
            let ext = golden.extension().and_then(|e| e.to_str()).unwrap_or("img");
            IdentityOutput::Image {
                golden: golden.clone(),
                partition: *partition,
                image: run.out.join(format!("{id}.{ext}")),
            }
        }
        FactoryOutput::Bundles => IdentityOutput::TarOnly {
            tar: run.out.join(format!("{id}.tar")),
        },
    }
}

fn output_path(output: &IdentityOutput) -> Option<PathBuf> {
    match output {
        IdentityOutput::Image { image, .. } => Some(image.clone()),
        IdentityOutput::TarOnly { tar } => Some(tar.clone()),
        _ => None,
    }
}

/// An image error that every unit would hit alike.
fn stops_the_batch(e: &OpsError) -> bool {
    use edgebind_image::Error as E;
    matches!(
        e,
        OpsError::Image {
            source: E::Full { .. }
                | E::NoBootPartition(_)
                | E::NotFat(_)
                | E::BadFat(..)
                | E::NotADiskImage(_)
                | E::NoSuchPartition(_),
            ..
        }
    )
}

/// Make a batch (see the module documentation). Errors that concern the
/// whole batch (the golden image has no FAT boot partition, no broker
/// address, no PKI, `out` cannot be created) are returned before anything
/// is issued; a unit's own failure is in its [`UnitResult`]. `progress`
/// gets each unit's result as it is done.
pub fn run(
    home: &FleetHome,
    store: &mut dyn Store,
    run: &FactoryRun,
    mut progress: impl FnMut(&UnitResult),
) -> Result<FactoryReport, OpsError> {
    let image_sha256 = match &run.output {
        FactoryOutput::Image { golden, partition } => {
            let mut file = std::fs::File::open(golden).map_err(|e| OpsError::Io {
                path: golden.clone(),
                source: e,
            })?;
            edgebind_image::partition::boot_partition(&mut file, *partition).map_err(|e| {
                OpsError::Image {
                    path: golden.clone(),
                    source: e,
                }
            })?;
            Some(sha256_file(golden)?)
        }
        FactoryOutput::Bundles => None,
    };
    let broker = resolve_broker(home, run.broker.as_ref())?;
    home.open_pki()?;
    std::fs::create_dir_all(&run.out).map_err(|e| OpsError::Io {
        path: run.out.clone(),
        source: e,
    })?;
    let mut report = FactoryReport {
        station: run.station.clone(),
        operator: run.operator.clone(),
        image_sha256: image_sha256.clone(),
        units: Vec::with_capacity(run.units.len()),
        made: 0,
        reissued: 0,
        skipped: 0,
        failed: 0,
        stopped: None,
    };
    for u in &run.units {
        let mut result = UnitResult {
            line: u.line,
            serial: u.serial.clone(),
            device: u.id.clone(),
            outcome: Outcome::NotAttempted,
            cert_serial: None,
            fingerprint_sha256: None,
            output: None,
            error: None,
        };
        if let Some(why) = &report.stopped {
            result.error = Some(why.clone());
            report.units.push(result);
            continue;
        }
        let unit = Unit {
            serial: u.serial.clone(),
            station: run.station.clone(),
            operator: run.operator.clone(),
            image_sha256: image_sha256.clone(),
        };
        let output = output_for(run, &u.id);
        match make_unit(home, store, run, u, &unit, &broker, &output) {
            Ok(Made::New(cert, fp)) => {
                result.outcome = Outcome::Made;
                (result.cert_serial, result.fingerprint_sha256) = (Some(cert), Some(fp));
                result.output = output_path(&output);
                report.made += 1;
            }
            Ok(Made::Again(cert, fp)) => {
                result.outcome = Outcome::Reissued;
                (result.cert_serial, result.fingerprint_sha256) = (Some(cert), Some(fp));
                result.output = output_path(&output);
                report.reissued += 1;
            }
            Ok(Made::Already(rec)) => {
                result.outcome = Outcome::Skipped;
                result.cert_serial = Some(rec.cert_serial);
                result.fingerprint_sha256 = Some(rec.cert_fingerprint_sha256);
                report.skipped += 1;
            }
            Err(e) => {
                result.outcome = Outcome::Failed;
                if stops_the_batch(&e) {
                    report.stopped = Some(format!(
                        "not attempted: {} failed on the golden image itself ({e})",
                        result.label()
                    ));
                }
                result.error = Some(e.to_string());
                report.failed += 1;
            }
        }
        progress(&result);
        report.units.push(result);
    }
    Ok(report)
}

enum Made {
    New(String, String),
    Again(String, String),
    Already(ManufacturingRecord),
}

fn make_unit(
    home: &FleetHome,
    store: &mut dyn Store,
    run: &FactoryRun,
    u: &ManifestUnit,
    unit: &Unit,
    broker: &AgentBroker,
    output: &IdentityOutput,
) -> Result<Made, OpsError> {
    if let Some(rec) = store.manufacturing_record(&u.serial)? {
        if rec.device != u.id {
            return Err(OpsError::Factory(format!(
                "unit {:?} was already made as device {} (station {}, certificate {}); the manifest now says {}",
                u.serial, rec.device, rec.station, rec.cert_serial, u.id
            )));
        }
        if !run.reissue {
            return Ok(Made::Already(rec));
        }
        let done = renew_unit(
            home,
            store,
            unit,
            &u.id,
            run.validity_days,
            Some(broker),
            output,
        )?;
        return Ok(Made::Again(done.serial, done.fingerprint_sha256));
    }
    match store.device(&u.id) {
        Ok(d) if d.lifecycle == Lifecycle::Revoked => {
            return Err(OpsError::Factory(format!(
                "device id {} is revoked; a revoked id is never issued again: give the unit another device_id",
                u.id
            )));
        }
        Ok(_) => {
            return Err(OpsError::Factory(format!(
                "device id {} is already registered: give the unit another device_id",
                u.id
            )));
        }
        Err(RegistryError::UnknownDevice(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let done = register_device(
        home,
        store,
        &Registration {
            id: u.id.clone(),
            board: u.board.clone(),
            tags: u.tags.clone(),
            validity_days: run.validity_days,
            broker: Some(broker.clone()),
            output: output.clone(),
            unit: Some(unit.clone()),
        },
    )?;
    Ok(Made::New(done.serial, done.fingerprint_sha256))
}

/// The export file format's name and version.
pub const EXPORT_FORMAT: &str = "edgebind-manufacturing/1";

/// What `factory export` writes: every record of a registry with the device
/// it registered and its certificate's inventory entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Export {
    pub format: String,
    pub exported_at: u64,
    pub units: Vec<ExportedUnit>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportedUnit {
    pub record: ManufacturingRecord,
    pub board: String,
    pub tags: Vec<String>,
    pub certificate: InventoryEntry,
}

/// Every record of `store`, with its device and certificate.
pub fn export(home: &FleetHome, store: &dyn Store) -> Result<Export, OpsError> {
    let inventory = home.open_pki()?.inventory()?;
    let mut units = Vec::new();
    for record in store.manufacturing_records()? {
        let device = store.device(&record.device)?;
        let certificate = inventory
            .entries
            .iter()
            .find(|e| e.serial == record.cert_serial)
            .cloned()
            .ok_or_else(|| {
                OpsError::Factory(format!(
                    "unit {:?}: certificate {} of device {} is not in the PKI inventory of {}",
                    record.serial,
                    record.cert_serial,
                    record.device,
                    home.pki_dir().display()
                ))
            })?;
        units.push(ExportedUnit {
            board: device.board.to_string(),
            tags: device.tags.iter().map(|t| t.to_string()).collect(),
            certificate,
            record,
        });
    }
    Ok(Export {
        format: EXPORT_FORMAT.into(),
        exported_at: now_unix(),
        units,
    })
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct Imported {
    pub registry: ImportReport,
    /// Certificates added to this PKI's inventory (so they can be revoked here).
    pub certificates_added: usize,
}

/// Merge an export into this registry and PKI inventory. Everything is
/// checked first (format, each unit's device and certificate agree, no
/// certificate serial that this inventory knows with another fingerprint);
/// then the registry takes every unit in one transaction (nothing on any
/// conflict); then the inventory takes the certificates it lacks. Importing
/// the same export again changes nothing. Should the inventory update fail
/// after the registry committed, running the import again completes it.
pub fn import(
    home: &FleetHome,
    store: &mut dyn Store,
    export: &Export,
) -> Result<Imported, OpsError> {
    if export.format != EXPORT_FORMAT {
        return Err(OpsError::Factory(format!(
            "not a manufacturing export: format {:?}, expected {EXPORT_FORMAT:?}",
            export.format
        )));
    }
    let pki = home.open_pki()?;
    let inventory = pki.inventory()?;
    let mut units = Vec::with_capacity(export.units.len());
    for u in &export.units {
        let r = &u.record;
        let bad = |why: String| OpsError::Factory(format!("unit {:?}: {why}", r.serial));
        let c = &u.certificate;
        if c.serial != r.cert_serial
            || c.fingerprint_sha256 != r.cert_fingerprint_sha256
            || c.cn != r.device.as_str()
            || c.role != "device"
        {
            return Err(bad(format!(
                "its certificate entry ({} {} serial {}) does not match its record (device {} serial {})",
                c.role, c.cn, c.serial, r.device, r.cert_serial
            )));
        }
        if let Some(have) = inventory.entries.iter().find(|e| e.serial == c.serial)
            && have.fingerprint_sha256 != c.fingerprint_sha256
        {
            return Err(bad(format!(
                "certificate serial {} is already in this PKI's inventory for {} with another fingerprint",
                c.serial, have.cn
            )));
        }
        let board = u
            .board
            .parse()
            .map_err(|e: RegistryError| bad(e.to_string()))?;
        let tags = u
            .tags
            .iter()
            .map(|t| t.parse())
            .collect::<Result<_, RegistryError>>()
            .map_err(|e| bad(e.to_string()))?;
        units.push((
            NewDevice {
                id: r.device.clone(),
                board,
                tags,
                cert: Some(CertInfo {
                    serial: c.serial.clone(),
                    fingerprint_sha256: c.fingerprint_sha256.clone(),
                    not_after: c.not_after.unix_timestamp().max(0) as u64,
                }),
            },
            r.clone(),
        ));
    }
    let registry = store.import_manufactured(&units)?;
    let entries: Vec<InventoryEntry> = export.units.iter().map(|u| u.certificate.clone()).collect();
    let certificates_added = pki.merge_entries(&entries).map_err(|e| {
        OpsError::Factory(format!(
            "the registry took the import, but the PKI inventory did not ({e}); run the import again to finish it"
        ))
    })?;
    Ok(Imported {
        registry,
        certificates_added,
    })
}

/// What [`station_kit`] made.
#[derive(Debug, Clone, Serialize)]
pub struct StationKit {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub broker: Option<StationBroker>,
}

/// A fleet home for an offline flashing station in `out` (which must not
/// exist or be empty): `pki/` with the issuing CA's certificate and key, the
/// root certificate, the CRL and the inventory (never `root-ca.key`), an
/// empty registry, and `station.json` with the station name and the broker
/// address its units' `agent.toml` dial (`broker`, else this home's broker
/// settings, else none: then `factory run --broker` is needed).
pub fn station_kit(
    home: &FleetHome,
    out: &Path,
    station: Option<&str>,
    broker: Option<&AgentBroker>,
) -> Result<StationKit, OpsError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |e| OpsError::Io { path, source: e }
    };
    if out.exists() && std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
        return Err(OpsError::OutputExists(out.to_owned()));
    }
    let src = home.pki_dir();
    // Everything Pki::open needs must be there before anything is copied.
    home.open_pki()?;
    let kit = FleetHome::new(out);
    let dest = kit.pki_dir();
    let made = (|| {
        edgebind_certs::files::create_dir(&dest, 0o700)?;
        let mut files = Vec::new();
        for name in [ROOT_CERT, ISSUING_CERT, ISSUING_KEY, CRL, INVENTORY] {
            debug_assert_ne!(name, ROOT_KEY);
            let from = src.join(name);
            let bytes = match std::fs::read(&from) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && name == INVENTORY => {
                    continue;
                }
                Err(e) => return Err(io(&from)(e)),
            };
            let to = dest.join(name);
            if name == ISSUING_KEY {
                edgebind_certs::files::write_private(&to, &bytes)?;
            } else {
                edgebind_certs::files::write_public(&to, &bytes)?;
            }
            files.push(to);
        }
        kit.create_registry()?;
        files.push(kit.registry_db());
        let broker = match broker {
            Some(b) => Some(b.clone()),
            None => agent_broker(home, None, None, None).ok(),
        }
        .map(|b| StationBroker {
            host: b.host,
            port: b.port,
            server_name: b.server_name,
        });
        let station_file = out.join(STATION_FILE);
        let text = serde_json::to_string_pretty(&StationFile {
            station: station.map(str::to_owned),
            broker: broker.clone(),
        })
        .expect("station file serializes");
        edgebind_certs::files::write_public(&station_file, text.as_bytes())?;
        files.push(station_file);
        kit.open_pki()?;
        Ok(StationKit {
            dir: out.to_owned(),
            files,
            broker,
        })
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(out);
    }
    made
}

#[cfg(test)]
mod tests;
