//! The device registry: the fleet's single source of truth.
//!
//! Everything outside this module talks to the [`Store`] trait; the only
//! implementation today is [`sqlite::SqliteStore`] (one file, WAL). A
//! PostgreSQL backend would be a second implementation of the same trait and
//! nothing else would change.

mod model;
pub mod sqlite;

use std::path::{Path, PathBuf};

use edgebind_protocol::messages::{Action, Desired, UnixSeconds};
use edgebind_protocol::{CommandId, DeviceId, IdError};
use serde_json::{Map, Value};

pub use model::*;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device {0} is not in the registry")]
    UnknownDevice(DeviceId),
    #[error("device {0} is already registered")]
    DuplicateDevice(DeviceId),
    #[error("device {0} is revoked")]
    Revoked(DeviceId),
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
    #[error("command {0} is not in the registry")]
    UnknownCommand(CommandId),
    #[error("command id {0} is already used")]
    DuplicateCommand(CommandId),
    #[error("on-connect rule {0} does not exist")]
    UnknownRule(i64),
    #[error(
        "registry {path}: schema version {found} is newer than this edgebind understands (up to {known}); upgrade edgebind"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("registry {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("registry: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("registry: stored {what} is not valid: {detail}")]
    Corrupt { what: String, detail: String },
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// The registry operations. Every mutating call is one transaction: it either
/// happens completely or, on any error, changes nothing.
pub trait Store: Send {
    /// Fail (without writing) if `id` could not be added: already present.
    /// Lets callers check before issuing a certificate.
    fn check_new_device(&self, id: &DeviceId) -> Result<()>;
    fn add_device(&mut self, new: &NewDevice) -> Result<Device>;
    /// Record (or replace) the certificate of an existing device.
    fn set_certificate(&mut self, id: &DeviceId, cert: &CertInfo) -> Result<()>;
    fn device(&self, id: &DeviceId) -> Result<Device>;
    /// Devices matching `selector`, sorted by id. `Selector::Ids` fails on the
    /// first unknown id instead of silently skipping it.
    fn devices(&self, selector: &Selector) -> Result<Vec<Device>>;
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

    /// Write a batch of broker updates in one transaction.
    fn apply(&mut self, batch: &[Update]) -> Result<BatchReport>;
    /// Latest first.
    fn telemetry_history(&self, device: &DeviceId, limit: u32) -> Result<Vec<TelemetryRow>>;
    /// Latest first.
    fn events(&self, device: &DeviceId, limit: u32) -> Result<Vec<EventRow>>;
    fn stats(&self) -> Result<Stats>;
}

/// Open (creating and migrating if needed) the default registry backend.
pub fn open(path: &Path) -> Result<SqliteStore> {
    SqliteStore::open(path, Retention::default())
}

/// The one place that chooses the backend for everything that only needs
/// the [`Store`] operations (the fleet service, the CLI).
pub fn open_store(path: &Path, retention: Retention) -> Result<Box<dyn Store>> {
    Ok(Box::new(SqliteStore::open(path, retention)?))
}
