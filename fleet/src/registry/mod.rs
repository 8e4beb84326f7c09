//! The device registry: the fleet's single source of truth.
//!
//! Three layers, so that a rule is written once and every database obeys it:
//! - [`rules`]: the domain rules (lifecycle transitions, "a final command
//!   state is never overwritten", presence from connection events, inventory
//!   from results) as plain functions over plain values, the clock passed in;
//! - [`Store`]: the operations everything outside this module calls, written
//!   once (`operations.rs`) over
//! - [`storage::Storage`]: what a backend implements, transactions that only
//!   store and load. Two backends: [`SqliteStore`] (one file, WAL; the
//!   default) and [`PostgresStore`] (a server, a connection pool).
//!
//! [`open_store`] chooses the backend from a registry URL ([`RegistryUrl`]):
//! `sqlite:PATH` or a plain path, or `postgres://user@host:port/db`.
//!
//! # Why the operations stay synchronous
//!
//! Every caller is a blocking thread: the fleet service's batch writer and
//! outbox threads, and the CLI. SQLite is a blocking library, so an async
//! trait would make the default backend and every caller wrap each call in
//! `spawn_blocking` to gain nothing. The PostgreSQL store instead owns a
//! current-thread tokio runtime and blocks on each statement; the async
//! driver stays an implementation detail of `postgres.rs`.

pub mod cert_history;
mod model;
mod operations;
pub mod postgres;
mod rows;
pub mod rules;
pub mod sqlite;
pub mod storage;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use edgebind_protocol::messages::{Action, Desired, UnixSeconds};
use edgebind_protocol::{CommandId, DeviceId, IdError, UnitSerial};
use serde_json::{Map, Value};

pub use cert_history::{CertOrigin, CertRecord, CertState, RenewalStatus};
pub use model::*;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// A boxed error from a database driver, kept as the source of [`RegistryError::Backend`].
pub type BackendSource = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device {0} is not in the registry")]
    UnknownDevice(DeviceId),
    #[error("device {0} is already registered")]
    DuplicateDevice(DeviceId),
    #[error("device {0} is revoked")]
    Revoked(DeviceId),
    #[error("unit serial {serial:?} already has a manufacturing record (device {device})")]
    DuplicateUnit { serial: String, device: DeviceId },
    #[error("unit serial {0:?} has no manufacturing record")]
    UnknownUnit(String),
    #[error("unit serial {serial:?}: {why}")]
    ManufacturingConflict { serial: String, why: String },
    #[error("unit serial {serial} is not on the allow-list of batch {batch}")]
    NotAllowed { batch: DeviceId, serial: UnitSerial },
    #[error("unit serial {serial} is on the allow-list of batch {other}, not {batch}")]
    OtherBatch {
        batch: DeviceId,
        serial: UnitSerial,
        other: DeviceId,
    },
    #[error("unit serial {serial} is already provisioned (device {device})")]
    AlreadyProvisioned {
        serial: UnitSerial,
        device: DeviceId,
    },
    #[error("unit serial {serial} (device {device}) may not be provisioned again: {why}")]
    NoReprovision {
        serial: UnitSerial,
        device: DeviceId,
        why: String,
    },
    #[error("certificate {serial} is not one of device {device}'s")]
    UnknownCertificate { device: DeviceId, serial: String },
    #[error("certificate {serial} of device {device} is {state}, not pending or current")]
    CertificateState {
        device: DeviceId,
        serial: String,
        state: &'static str,
    },
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("unknown board {given:?}; known boards: {}", KNOWN_BOARDS.join(", "))]
    UnknownBoard { given: String },
    #[error(
        "invalid tag {0:?}: tags are 1-{MAX_TAG_LEN} ASCII letters, digits, '-', '_', '.' or ':', starting with a letter or digit"
    )]
    InvalidTag(String),
    #[error("invalid setting {key:?}: {why}")]
    InvalidSetting { key: String, why: String },
    /// A console login code that is unknown, used or expired (which of
    /// them is in `why`; a login page shows only that it was refused).
    #[error("login code refused: {why}")]
    LoginRefused { why: &'static str },
    #[error("invalid device listing: {0}")]
    InvalidQuery(String),
    #[error("command {0} is not in the registry")]
    UnknownCommand(CommandId),
    #[error("command id {0} is already used")]
    DuplicateCommand(CommandId),
    #[error("on-connect rule {0} does not exist")]
    UnknownRule(i64),
    #[error(
        "invalid registry URL {given:?}: {why} (use sqlite:PATH, a plain file path, or postgres://USER@HOST:PORT/DATABASE)"
    )]
    InvalidUrl { given: String, why: String },
    #[error(
        "registry {location}: schema version {found} is newer than this edgebind understands (up to {known}); upgrade edgebind"
    )]
    SchemaTooNew {
        location: String,
        found: i64,
        known: i64,
    },
    /// The database itself failed (cannot open, connection lost, disk full,
    /// lock timeout). `location` is the file or the URL without its password.
    /// The driver's error is kept for callers that look into it, but not
    /// chained as a `source`: its text is already in the message, and a
    /// journal line that repeats it three times helps nobody.
    #[error("registry {location}: {}", describe(error.as_ref()))]
    Backend {
        location: String,
        error: BackendSource,
    },
    #[error("registry: stored {what} is not valid: {detail}")]
    Corrupt { what: String, detail: String },
    #[error(
        "registry {location} does not exist. `edgebind pki init` creates it with a new fleet home; \
         if this home had a registry, it was moved or deleted: restore it from a backup \
         (`edgebind fleet backup DEST` makes one) or start an empty one with `edgebind fleet init`"
    )]
    Missing { location: String },
    #[error(
        "registry {location} is damaged ({detail}); nothing was read or changed. Restore it from a \
         backup (`edgebind fleet backup DEST` makes one); `edgebind fleet check` runs the full check"
    )]
    Damaged { location: String, detail: String },
}

impl RegistryError {
    /// A database failure whose location the caller fills in ([`RegistryError::located`]).
    pub fn backend(source: impl Into<BackendSource>) -> Self {
        RegistryError::Backend {
            location: String::new(),
            error: source.into(),
        }
    }

    /// Name the registry in a backend error that does not say where it happened.
    pub fn located(self, at: &str) -> Self {
        match self {
            RegistryError::Backend { location, error } if location.is_empty() => {
                RegistryError::Backend {
                    location: at.to_owned(),
                    error,
                }
            }
            other => other,
        }
    }
}

/// An error and its causes in one line, each cause once: drivers often
/// repeat their cause inside their own message.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// The registry operations. Every mutating call is one transaction: it either
/// happens completely or, on any error, changes nothing. Implemented once,
/// for every [`storage::Storage`] backend.
pub trait Store: Send {
    /// The registry file, or its URL without a password.
    fn location(&self) -> String;
    /// Fail (without writing) if `id` could not be added: already present.
    /// Lets callers check before issuing a certificate.
    fn check_new_device(&self, id: &DeviceId) -> Result<()>;
    fn add_device(&mut self, new: &NewDevice) -> Result<Device>;
    /// Register many devices in one transaction (a factory batch): all or none.
    fn add_devices(&mut self, new: &[NewDevice]) -> Result<()>;
    /// Record (or replace) the certificate of an existing device.
    fn set_certificate(&mut self, id: &DeviceId, cert: &CertInfo) -> Result<()>;
    fn device(&self, id: &DeviceId) -> Result<Device>;
    /// Devices matching `selector`, sorted by id. `Selector::Ids` fails on the
    /// first unknown id instead of silently skipping it.
    fn devices(&self, selector: &Selector) -> Result<Vec<Device>>;
    /// One page of devices, filtered and paged in the database (see [`DeviceQuery`]).
    fn list_devices(&self, query: &DeviceQuery) -> Result<DevicePage>;
    fn revoke(&mut self, id: &DeviceId) -> Result<Device>;

    /// Merge `changes` into the desired settings (a `null` value removes the
    /// key) and bump the revision. Returns what the device should now receive.
    fn set_desired(&mut self, id: &DeviceId, changes: &Map<String, Value>) -> Result<Desired>;
    /// Desired settings whose latest revision has not been published yet.
    fn unpublished_desired(&self) -> Result<Vec<(DeviceId, Desired)>>;
    fn mark_desired_published(&mut self, id: &DeviceId, revision: u64) -> Result<()>;

    /// Record commands (all or none). Queued ones wait for the fleet service.
    fn insert_commands(&mut self, commands: &[NewCommand]) -> Result<()>;
    fn command(&self, id: &CommandId) -> Result<CommandRecord>;
    /// Latest first.
    fn commands_for(&self, device: &DeviceId, limit: u32) -> Result<Vec<CommandRecord>>;
    /// Queued commands whose device is online now, oldest first.
    fn deliverable_queued(&self) -> Result<Vec<CommandRecord>>;
    /// Queued commands of one device, oldest first.
    fn queued_for(&self, device: &DeviceId) -> Result<Vec<CommandRecord>>;
    /// Mark commands as handed to the broker; only those still queued (or
    /// just recorded) move, so a command is never sent twice by the service.
    fn mark_sent(&mut self, ids: &[CommandId], at: UnixSeconds) -> Result<()>;

    fn add_on_connect(
        &mut self,
        device: &DeviceId,
        action: Action,
        args: &Map<String, Value>,
    ) -> Result<OnConnectRule>;
    fn on_connect_rules(&self, device: &DeviceId) -> Result<Vec<OnConnectRule>>;
    fn remove_on_connect(&mut self, rule: i64) -> Result<()>;

    /// Write a batch of broker updates in one transaction, queueing nothing
    /// on connect.
    fn apply(&mut self, batch: &[Update]) -> Result<BatchReport> {
        self.apply_with(batch, &ConnectPolicy::default())
    }
    /// Write a batch of broker updates in one transaction. Idempotent: a
    /// batch applied again (a redelivery after a crash) changes nothing,
    /// and each new connection queues `policy`'s commands exactly once.
    fn apply_with(&mut self, batch: &[Update], policy: &ConnectPolicy) -> Result<BatchReport>;
    /// Latest first.
    fn telemetry_history(&self, device: &DeviceId, limit: u32) -> Result<Vec<TelemetryRow>>;
    /// Latest first.
    fn events(&self, device: &DeviceId, limit: u32) -> Result<Vec<EventRow>>;
    /// The device's connects and disconnects, latest first (the newest
    /// [`PRESENCE_PER_DEVICE`] are kept).
    fn presence_history(&self, device: &DeviceId, limit: u32) -> Result<Vec<PresenceChange>>;
    fn stats(&self) -> Result<Stats>;

    /// Record a fleet service's broker connection (heartbeats, connect, loss, stop).
    fn record_service(&mut self, presence: &ServicePresence) -> Result<()>;
    /// What every fleet service last recorded ([`rules::presence_view`] reads it).
    fn services(&self) -> Result<Vec<ServicePresence>>;

    /// Claim the work item `key` (`cmd/ID`, `desired/DEVICE/REV`) for
    /// `holder` during `ttl_s` seconds: false while another holder's claim
    /// runs. How fleet service instances avoid publishing the same thing
    /// twice; a holder that dies loses its claims when they expire.
    fn claim(&mut self, key: &str, holder: &str, ttl_s: u64) -> Result<bool>;
    /// The manufacturing record of a unit serial, if there is one.
    fn manufacturing_record(&self, serial: &str) -> Result<Option<ManufacturingRecord>>;
    /// Every manufacturing record, by unit serial.
    fn manufacturing_records(&self) -> Result<Vec<ManufacturingRecord>>;
    /// Register a manufactured unit's device and its record in one
    /// transaction: both or neither (no device registered but unrecorded).
    /// Refused when the serial has a record or the id is taken (a revoked id
    /// with [`RegistryError::Revoked`]).
    fn add_manufactured(
        &mut self,
        device: &NewDevice,
        record: &ManufacturingRecord,
    ) -> Result<Device>;
    /// A unit made again with a new certificate: the device's certificate and
    /// the unit's record are replaced together. The record must exist for the
    /// same device, and the device must not be revoked.
    fn record_reissue(&mut self, record: &ManufacturingRecord, cert: &CertInfo) -> Result<()>;
    /// Put `serials` on the allow-list of `batch` (claim-based first boot).
    /// A serial already allowed for this batch is left alone; one on another
    /// batch's list fails the whole call, and then nothing is added.
    fn allow_serials(&mut self, batch: &DeviceId, serials: &[UnitSerial]) -> Result<AllowReport>;
    /// A serial's allow-list entry, if it has one.
    fn claim_serial(&self, serial: &UnitSerial) -> Result<Option<ClaimSerial>>;
    /// The allow-list of a batch, by serial.
    fn claim_serials(&self, batch: &DeviceId) -> Result<Vec<ClaimSerial>>;
    /// Register a device provisioned by the claim flow and mark its serial
    /// provisioned, in one transaction: refused when the serial is not on
    /// the batch's list, is provisioned already (whoever commits first wins,
    /// so two service instances never both register a serial) or the id is taken.
    fn add_provisioned(
        &mut self,
        device: &NewDevice,
        batch: &DeviceId,
        serial: &UnitSerial,
        unit: &ProvisionedUnit,
    ) -> Result<Device>;
    /// A provisioned unit whose certificate expired asked again, through its
    /// batch's claim identity, with a new key: in one transaction the
    /// policy is checked again ([`rules::check_reprovision`] at `now`),
    /// `record` becomes the device's current certificate (origin
    /// `reprovisioned`), the expired one is `retired` and any pending
    /// renewal `abandoned`, and the serial's provisioning names the new key
    /// and chain (so the same key asking again gets the same chain). Returns
    /// the serials superseded, for the caller to revoke.
    fn reprovision(
        &mut self,
        batch: &DeviceId,
        serial: &UnitSerial,
        unit: &ProvisionedUnit,
        record: &CertRecord,
        now: UnixSeconds,
    ) -> Result<Vec<String>>;
    /// Merge units exported from a station registry: each device (if new)
    /// and its record, in one transaction. A unit already recorded
    /// identically is left alone; any conflict (the serial recorded with
    /// another device or certificate, the device registered with another
    /// certificate or under another serial) fails the whole import.
    fn import_manufactured(
        &mut self,
        units: &[(NewDevice, ManufacturingRecord)],
    ) -> Result<ImportReport>;

    /// Store a new console login code (its hash must be new).
    fn add_login_code(&mut self, code: &LoginCode) -> Result<()>;
    /// Exchange the code whose hash is `hash` at `now`: the operator it was
    /// issued to, and the code is marked used in the same transaction, so
    /// it logs in once. Unknown, used or expired codes are refused with
    /// [`RegistryError::LoginRefused`] (see [`rules::check_login_code`]).
    fn redeem_login_code(&mut self, hash: &str, now: UnixSeconds) -> Result<String>;

    /// Append to the audit log (its `seq` is assigned); the stored seq.
    fn record_audit(&mut self, entry: &AuditEntry) -> Result<i64>;
    /// The audit log, latest first, at most `limit` entries older than
    /// `before` (a seq) when given.
    fn audit_log(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>>;
    /// The device's certificates, oldest first. A device whose certificate
    /// predates the history has one record made from its row.
    fn cert_history(&self, id: &DeviceId) -> Result<Vec<CertRecord>>;
    /// Record a certificate signed by renewal as `pending` (one transaction):
    /// refused for an unknown or revoked device; a pending one of the
    /// device not confirmed yet becomes `abandoned`. Returns the abandoned
    /// serials (for the caller to revoke).
    fn record_renewal(&mut self, record: &CertRecord) -> Result<Vec<String>>;
    /// The device connected with `serial`: a pending certificate becomes
    /// the device's current one (and the registry row's), the current one
    /// `previous`. Returns the records changed (none when `serial` was
    /// current already). See [`cert_history::confirm_step`].
    fn confirm_certificate(
        &mut self,
        id: &DeviceId,
        serial: &str,
        now: UnixSeconds,
    ) -> Result<Vec<CertRecord>>;
    /// `previous` certificates superseded before `superseded_before`: their
    /// grace period is over.
    fn due_retirements(&self, superseded_before: UnixSeconds) -> Result<Vec<CertRecord>>;
    /// Mark certificates `retired` (revoked after their grace period).
    fn mark_retired(&mut self, serials: &[String], at: UnixSeconds) -> Result<()>;

    /// Counts of the whole fleet; `cert_expiring` counts the non-revoked
    /// devices whose certificate expires before `expiring_before`.
    fn overview(&self, expiring_before: UnixSeconds) -> Result<Overview>;
}

/// Open (creating and migrating if needed) the default registry backend.
/// Open the SQLite registry at `path`, creating an empty one if there is
/// none (tests and tools that make a fresh registry on purpose; operators'
/// commands use [`open_store`], which never creates one silently).
pub fn open_or_create(path: &Path) -> Result<SqliteStore> {
    SqliteStore::create(path, Retention::default())
}

/// Where a registry lives, parsed from `--registry` / `EDGEBIND_REGISTRY`.
#[derive(Clone, PartialEq, Eq)]
pub enum RegistryUrl {
    /// `sqlite:PATH`, or a plain path.
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`, kept whole for the driver.
    Postgres(String),
}

impl FromStr for RegistryUrl {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self> {
        let invalid = |why: &str| RegistryError::InvalidUrl {
            given: postgres::redact(s),
            why: why.to_owned(),
        };
        if s.is_empty() {
            return Err(invalid("empty"));
        }
        if let Some(path) = s.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(invalid("no file path after sqlite:"));
            }
            return Ok(RegistryUrl::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            postgres::check_url(s).map_err(|why| invalid(&why))?;
            return Ok(RegistryUrl::Postgres(s.to_owned()));
        }
        // Something that looks like another scheme is a mistake, not a file
        // name: creating `mysql:/…` as an empty SQLite file would hide it.
        if let Some((scheme, _)) = s.split_once("://")
            && !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err(invalid(&format!("unsupported scheme {scheme:?}")));
        }
        Ok(RegistryUrl::Sqlite(PathBuf::from(s)))
    }
}

impl From<PathBuf> for RegistryUrl {
    fn from(path: PathBuf) -> Self {
        RegistryUrl::Sqlite(path)
    }
}

impl From<&Path> for RegistryUrl {
    fn from(path: &Path) -> Self {
        RegistryUrl::Sqlite(path.to_owned())
    }
}

/// Shows the URL without its password, so it can go into logs and errors.
impl fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            RegistryUrl::Postgres(url) => f.write_str(&postgres::redact(url)),
        }
    }
}

impl fmt::Debug for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegistryUrl({self})")
    }
}

/// The one place that chooses the backend for everything that only needs
/// the [`Store`] operations (the fleet service, the CLI, the benchmarks).
pub fn open_store(url: &RegistryUrl, retention: Retention) -> Result<Box<dyn Store>> {
    Ok(match url {
        RegistryUrl::Sqlite(path) => Box::new(SqliteStore::open(path, retention)?),
        RegistryUrl::Postgres(url) => Box::new(PostgresStore::open(url, retention)?),
    })
}

/// [`open_store`] for a new fleet home: an SQLite file is created when there
/// is none (a PostgreSQL database must exist; its schema is created by the
/// migrations either way).
pub fn create_store(url: &RegistryUrl, retention: Retention) -> Result<Box<dyn Store>> {
    Ok(match url {
        RegistryUrl::Sqlite(path) => Box::new(SqliteStore::create(path, retention)?),
        RegistryUrl::Postgres(url) => Box::new(PostgresStore::open(url, retention)?),
    })
}

#[cfg(test)]
mod tests;
