//! The registry's data model, independent of the database that stores it.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use edgebind_protocol::messages::{Action, CommandResult, Event, Reported, Status, UnixSeconds};
use edgebind_protocol::{CommandId, DeviceId, UnitSerial};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::RegistryError;

/// Boards (Yocto `MACHINE` names) a device may be registered with. The
/// registry refuses anything else so that a typo does not create a device no
/// image will ever be built for.
pub const KNOWN_BOARDS: &[&str] = &[
    "raspberrypi3-64",
    "raspberrypi4-64",
    "raspberrypi5",
    "qemux86-64",
    "qemuarm64",
];

/// A validated board name from [`KNOWN_BOARDS`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Board(String);

impl Board {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Board {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, RegistryError> {
        if KNOWN_BOARDS.contains(&s) {
            Ok(Board(s.to_owned()))
        } else {
            Err(RegistryError::UnknownBoard {
                given: s.to_owned(),
            })
        }
    }
}

impl fmt::Display for Board {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest tag; tags end up in command lines and tables, keep them short.
pub const MAX_TAG_LEN: usize = 64;

/// A free-form label used to address groups of devices (`send --tag`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, RegistryError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_TAG_LEN
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(RegistryError::InvalidTag(s.to_owned()))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a device is in its life, independent of whether it is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Recorded and its identity issued; never seen on the broker yet.
    Registered,
    /// Has connected with its identity at least once.
    Provisioned,
    /// Certificate revoked; the broker refuses it.
    Revoked,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Registered => "registered",
            Lifecycle::Provisioned => "provisioned",
            Lifecycle::Revoked => "revoked",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        [
            Lifecycle::Registered,
            Lifecycle::Provisioned,
            Lifecycle::Revoked,
        ]
        .into_iter()
        .find(|l| l.as_str() == s)
    }
}

/// What the registry keeps about a device's certificate (not the certificate itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// Hex serial number as the PKI reports it.
    pub serial: String,
    /// SHA-256 of the DER certificate, hex.
    pub fingerprint_sha256: String,
    pub not_after: UnixSeconds,
}

/// Input of [`super::Store::add_device`].
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub id: DeviceId,
    pub board: Board,
    pub tags: BTreeSet<Tag>,
    pub cert: Option<CertInfo>,
}

/// Settings the device last reported as in force.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportedState {
    pub revision: u64,
    pub applied: Map<String, Value>,
    pub ignored: Map<String, Value>,
    pub at: UnixSeconds,
}

/// Everything the registry knows about one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    pub id: DeviceId,
    pub board: Board,
    pub tags: BTreeSet<Tag>,
    pub lifecycle: Lifecycle,
    pub registered_at: UnixSeconds,
    pub provisioned_at: Option<UnixSeconds>,
    pub revoked_at: Option<UnixSeconds>,
    pub cert: Option<CertInfo>,
    pub online: bool,
    pub last_seen: Option<UnixSeconds>,
    /// `ts` of the `online` status that began the current (or last) connection.
    pub connected_at: Option<UnixSeconds>,
    pub agent_version: Option<String>,
    pub boot_id: Option<String>,
    pub addresses: Vec<String>,
    pub desired: Map<String, Value>,
    pub desired_revision: u64,
    /// Highest desired revision the fleet service has published (retained).
    pub desired_published_revision: u64,
    pub reported: Option<ReportedState>,
    pub inventory: Option<Value>,
    pub inventory_at: Option<UnixSeconds>,
    pub telemetry: Option<Value>,
    pub telemetry_at: Option<UnixSeconds>,
    /// Telemetry messages ever stored for this device (history is capped, this is not).
    pub telemetry_count: u64,
}

/// What an operator sees of a device at a glance: its lifecycle and
/// presence in one word (the STATE column of `edgebind devices`, the
/// console's badge and filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceState {
    Online,
    Offline,
    NeverSeen,
    Revoked,
}

impl PresenceState {
    pub const ALL: [PresenceState; 4] = [
        PresenceState::Online,
        PresenceState::Offline,
        PresenceState::NeverSeen,
        PresenceState::Revoked,
    ];

    /// `online`, `offline`, `never seen`, `revoked`.
    pub fn label(self) -> &'static str {
        match self {
            PresenceState::Online => "online",
            PresenceState::Offline => "offline",
            PresenceState::NeverSeen => "never seen",
            PresenceState::Revoked => "revoked",
        }
    }

    /// `online`, `offline`, `never-seen`, `revoked` (a query value).
    pub fn key(self) -> &'static str {
        match self {
            PresenceState::NeverSeen => "never-seen",
            other => other.label(),
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.key() == key)
    }

    /// Narrow `query` to the devices in this state.
    pub fn narrow(self, query: &mut DeviceQuery) {
        let (lifecycle, online) = match self {
            PresenceState::Online => (None, Some(true)),
            PresenceState::Offline => (Some(Lifecycle::Provisioned), Some(false)),
            PresenceState::NeverSeen => (Some(Lifecycle::Registered), None),
            PresenceState::Revoked => (Some(Lifecycle::Revoked), None),
        };
        query.lifecycle = lifecycle;
        query.online = online;
    }
}

impl PresenceState {
    pub fn of(lifecycle: Lifecycle, online: bool) -> Self {
        match (lifecycle, online) {
            (Lifecycle::Revoked, _) => PresenceState::Revoked,
            (_, true) => PresenceState::Online,
            (Lifecycle::Registered, false) => PresenceState::NeverSeen,
            (_, false) => PresenceState::Offline,
        }
    }
}

impl Device {
    pub fn presence_state(&self) -> PresenceState {
        PresenceState::of(self.lifecycle, self.online)
    }

    /// Whether the device reports having applied the current desired revision
    /// with every desired key at the desired value.
    pub fn converged(&self) -> bool {
        match &self.reported {
            None => self.desired.is_empty(),
            Some(r) => {
                r.revision >= self.desired_revision
                    && self
                        .desired
                        .iter()
                        .all(|(k, v)| r.applied.get(k) == Some(v))
            }
        }
    }
}

/// Lifecycle and presence of a device: what the broker's status messages
/// change, loaded and saved as one piece by [`super::rules::on_status`]'s callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub lifecycle: Lifecycle,
    pub provisioned_at: Option<UnixSeconds>,
    pub revoked_at: Option<UnixSeconds>,
    pub online: bool,
    pub last_seen: Option<UnixSeconds>,
    pub connected_at: Option<UnixSeconds>,
    pub agent_version: Option<String>,
    pub boot_id: Option<String>,
    pub addresses: Vec<String>,
}

impl Device {
    pub fn state(&self) -> DeviceState {
        DeviceState {
            lifecycle: self.lifecycle,
            provisioned_at: self.provisioned_at,
            revoked_at: self.revoked_at,
            online: self.online,
            last_seen: self.last_seen,
            connected_at: self.connected_at,
            agent_version: self.agent_version.clone(),
            boot_id: self.boot_id.clone(),
            addresses: self.addresses.clone(),
        }
    }
}

/// Largest page [`super::Store::list_devices`] returns.
pub const MAX_PAGE: u32 = 1000;

/// One page of a device listing, filtered and paged by the database. Pages
/// are keyed by id (`after`), so a page stays cheap however deep it is and
/// a device added meanwhile neither repeats nor hides another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceQuery {
    pub tag: Option<Tag>,
    pub lifecycle: Option<Lifecycle>,
    pub online: Option<bool>,
    /// Part of the device id (plain text, not a pattern).
    pub search: Option<String>,
    /// Only devices whose id sorts after this one (the previous page's `next_after`).
    pub after: Option<DeviceId>,
    /// At most this many devices (1..=[`MAX_PAGE`]).
    pub limit: u32,
}

impl Default for DeviceQuery {
    fn default() -> Self {
        DeviceQuery {
            tag: None,
            lifecycle: None,
            online: None,
            search: None,
            after: None,
            limit: 100,
        }
    }
}

/// What [`super::Store::list_devices`] returns.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DevicePage {
    /// Sorted by id.
    pub devices: Vec<Device>,
    /// `Some(last id)` when more devices match: pass it as `after`.
    pub next_after: Option<DeviceId>,
}

/// The command lists a backend can load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandQuery<'a> {
    /// Latest first.
    Device { device: &'a DeviceId, limit: u32 },
    /// Queued commands of one device, oldest first.
    QueuedFor(&'a DeviceId),
    /// Queued commands whose device is online, oldest first.
    QueuedOnline,
}

/// The per-device histories that are capped by [`Retention`] (presence
/// by [`PRESENCE_PER_DEVICE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    Telemetry,
    Events,
    Commands,
    Presence,
}

/// Connection changes kept per device (the newest).
pub const PRESENCE_PER_DEVICE: u32 = 200;

/// One change of a device's connection as the fleet service saw it: a new
/// connection (`online`, at the `ts` of its `online` status) or its end
/// (`offline`, when the last will or a clean `offline` arrived).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceChange {
    pub at: UnixSeconds,
    pub online: bool,
}

/// Which devices a listing or a fan-out addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    All,
    Tag(Tag),
    Ids(Vec<DeviceId>),
}

/// How a command reaches its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Published by the operator right away.
    Now,
    /// Held by the fleet service until the device is online.
    Queued,
    /// Created from an on-connect rule when the device connected.
    OnConnect,
    /// Sent by the fleet service on its own (inventory on connect).
    Auto,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Now => "now",
            Delivery::Queued => "queued",
            Delivery::OnConnect => "on_connect",
            Delivery::Auto => "auto",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        [
            Delivery::Now,
            Delivery::Queued,
            Delivery::OnConnect,
            Delivery::Auto,
        ]
        .into_iter()
        .find(|d| d.as_str() == s)
    }
}

/// A command's progress as the registry last heard of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    Queued,
    Sent,
    Accepted,
    Succeeded,
    Failed,
    Rejected,
}

impl CommandState {
    pub const FINAL: [CommandState; 3] = [
        CommandState::Succeeded,
        CommandState::Failed,
        CommandState::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Accepted => "accepted",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Rejected => "rejected",
        }
    }

    pub fn is_final(self) -> bool {
        Self::FINAL.contains(&self)
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        [
            CommandState::Queued,
            CommandState::Sent,
            CommandState::Accepted,
            CommandState::Succeeded,
            CommandState::Failed,
            CommandState::Rejected,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// Input of [`super::Store::insert_commands`].
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: CommandId,
    pub device: DeviceId,
    pub action: Action,
    pub args: Map<String, Value>,
    pub delivery: Delivery,
    /// CN of whoever asked (`operator:alice`, `service:fleet`).
    pub requested_by: Option<String>,
    pub expires_at: Option<UnixSeconds>,
    /// The on-connect rule this command was made from.
    pub rule_id: Option<i64>,
}

/// One entry of the command log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandRecord {
    pub id: CommandId,
    pub device: DeviceId,
    /// `None` when only the device's result was seen, never the command.
    pub action: Option<String>,
    pub args: Map<String, Value>,
    pub delivery: Delivery,
    pub state: CommandState,
    pub requested_by: Option<String>,
    pub rule_id: Option<i64>,
    pub created_at: UnixSeconds,
    pub sent_at: Option<UnixSeconds>,
    pub accepted_at: Option<UnixSeconds>,
    pub finished_at: Option<UnixSeconds>,
    pub expires_at: Option<UnixSeconds>,
    pub reason: Option<String>,
    pub output: Option<Value>,
}

/// "Run this action whenever the device connects."
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OnConnectRule {
    pub id: i64,
    pub device: DeviceId,
    pub action: Action,
    pub args: Map<String, Value>,
    pub created_at: UnixSeconds,
}

/// One stored telemetry sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TelemetryRow {
    pub ts: UnixSeconds,
    pub received_at: UnixSeconds,
    pub payload: Value,
}

/// One stored device event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRow {
    pub ts: UnixSeconds,
    pub received_at: UnixSeconds,
    pub kind: String,
    pub message: String,
}

/// A fact learned from the broker, to be written by [`super::Store::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Status {
        device: DeviceId,
        status: Status,
        received_at: UnixSeconds,
    },
    /// `payload` is the JSON text exactly as received (already validated);
    /// storing it as-is keeps ingest cheap and loses no field a newer agent adds.
    Telemetry {
        device: DeviceId,
        ts: UnixSeconds,
        payload: String,
        received_at: UnixSeconds,
    },
    Event {
        device: DeviceId,
        event: Event,
        received_at: UnixSeconds,
    },
    Reported {
        device: DeviceId,
        reported: Reported,
        received_at: UnixSeconds,
    },
    /// A command seen on its way to the device (published by anyone).
    CommandSeen {
        device: DeviceId,
        command: edgebind_protocol::messages::Command,
        received_at: UnixSeconds,
    },
    CommandResult {
        device: DeviceId,
        result: CommandResult,
        received_at: UnixSeconds,
    },
}

impl Update {
    pub fn device(&self) -> &DeviceId {
        match self {
            Update::Status { device, .. }
            | Update::Telemetry { device, .. }
            | Update::Event { device, .. }
            | Update::Reported { device, .. }
            | Update::CommandSeen { device, .. }
            | Update::CommandResult { device, .. } => device,
        }
    }
}

/// What [`super::Store::apply`] observed while writing a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchReport {
    pub applied: usize,
    /// Telemetry samples and events that were already stored (a message
    /// delivered again after a crash), so not stored twice.
    pub duplicates: usize,
    /// Of [`BatchReport::duplicates`]: telemetry samples.
    pub duplicate_telemetry: usize,
    /// Of [`BatchReport::duplicates`]: events.
    pub duplicate_events: usize,
    /// On-connect commands this batch queued for the outbox.
    pub queued_on_connect: usize,
    /// Ids that are not in the registry (their messages were dropped).
    pub unknown_devices: BTreeSet<DeviceId>,
    /// Devices that began a new connection in this batch, in order.
    pub connected: Vec<DeviceId>,
}

/// What a new connection queues, in the same transaction that records it
/// (so a crash can neither lose nor repeat it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectPolicy {
    /// Ask every device that connects for its inventory.
    pub inventory: bool,
    /// Who the log names as having asked (`service:fleet`).
    pub requested_by: Option<String>,
}

/// How much history to keep per device. Telemetry is trimmed back to its
/// window once it has grown a tenth past it ([`super::rules::telemetry_trim_due`]),
/// so up to `telemetry_per_device * 1.1` samples (plus one batch) are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub telemetry_per_device: u32,
    pub events_per_device: u32,
    pub commands_per_device: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            telemetry_per_device: 1000,
            events_per_device: 200,
            commands_per_device: 500,
        }
    }
}

/// Sizes for the benchmark and `fleet status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    pub devices: u64,
    pub telemetry_rows: u64,
    pub telemetry_received: u64,
    pub events: u64,
    pub commands: u64,
    /// Bytes used by the database pages (excluding the WAL).
    pub db_bytes: u64,
}

/// Parse one `key=value` desired-setting argument. The value is JSON when it
/// parses as JSON (`5`, `true`, `null`, `"x"`), otherwise a plain string, so
/// `log_level=debug` and `telemetry_interval_s=10` both do what one expects.
pub fn parse_setting(arg: &str) -> Result<(String, Value), RegistryError> {
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| RegistryError::InvalidSetting {
            key: arg.to_owned(),
            why: "expected key=value".into(),
        })?;
    validate_setting_key(key)?;
    let value = serde_json::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.into()));
    Ok((key.to_owned(), value))
}

pub(crate) fn validate_setting_key(key: &str) -> Result<(), RegistryError> {
    let ok = !key.is_empty()
        && key.len() <= 64
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidSetting {
            key: key.to_owned(),
            why: "keys are lowercase letters, digits and '_', starting with a letter".into(),
        })
    }
}

/// Setting keys every agent is known to understand (others are passed on
/// and the agent reports them as ignored).
pub fn known_setting(key: &str) -> bool {
    edgebind_protocol::settings::is_known(key)
}

/// Parse `key=value` command arguments into the command's `args` object.
pub fn parse_args<'a>(
    args: impl IntoIterator<Item = &'a str>,
) -> Result<Map<String, Value>, RegistryError> {
    let mut map = Map::new();
    for arg in args {
        let (k, v) = parse_setting(arg)?;
        map.insert(k, v);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boards_and_tags_are_validated() {
        assert!("raspberrypi3-64".parse::<Board>().is_ok());
        let err = "raspberrypi3".parse::<Board>().unwrap_err().to_string();
        assert!(err.contains("raspberrypi3-64"), "lists known boards: {err}");
        assert!("lab-1".parse::<Tag>().is_ok());
        for bad in ["", "a b", "-x", "a/b", &"t".repeat(65)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn settings_parse_json_or_plain_strings() {
        assert_eq!(
            parse_setting("telemetry_interval_s=5").unwrap(),
            ("telemetry_interval_s".into(), Value::from(5))
        );
        assert_eq!(
            parse_setting("log_level=debug").unwrap(),
            ("log_level".into(), Value::from("debug"))
        );
        assert_eq!(parse_setting("x=null").unwrap().1, Value::Null);
        assert!(parse_setting("novalue").is_err());
        assert!(parse_setting("Bad-Key=1").is_err());
    }

    #[test]
    fn convergence_compares_values_and_revision() {
        let mut d = Device {
            id: DeviceId::new("d").unwrap(),
            board: "qemux86-64".parse().unwrap(),
            tags: BTreeSet::new(),
            lifecycle: Lifecycle::Registered,
            registered_at: 0,
            provisioned_at: None,
            revoked_at: None,
            cert: None,
            online: false,
            last_seen: None,
            connected_at: None,
            agent_version: None,
            boot_id: None,
            addresses: vec![],
            desired: Map::new(),
            desired_revision: 0,
            desired_published_revision: 0,
            reported: None,
            inventory: None,
            inventory_at: None,
            telemetry: None,
            telemetry_at: None,
            telemetry_count: 0,
        };
        assert!(d.converged());
        d.desired.insert("log_level".into(), "debug".into());
        d.desired_revision = 1;
        assert!(!d.converged());
        let mut applied = Map::new();
        applied.insert("log_level".into(), "debug".into());
        d.reported = Some(ReportedState {
            revision: 1,
            applied,
            ignored: Map::new(),
            at: 1,
        });
        assert!(d.converged());
    }
}

/// What a fleet service last recorded about its broker connection: while it
/// is connected it refreshes `seen_at` every [`SERVICE_HEARTBEAT_S`]
/// seconds, and it records `connected: false` when it loses the broker or
/// stops. Presence in the registry is only as fresh as this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePresence {
    /// The service's principal name (`fleet` for `service:fleet`).
    pub name: String,
    pub connected: bool,
    /// When `connected` last changed.
    pub since: UnixSeconds,
    /// The last heartbeat.
    pub seen_at: UnixSeconds,
    /// The broker's dropped-messages counter as this service last read it
    /// (`$SYS/broker/publish/messages/dropped`, since the broker started;
    /// every client's queues count). `None` until it was read.
    #[serde(default)]
    pub broker_dropped: Option<u64>,
    /// Messages taken from the broker and not committed yet, at the heartbeat.
    #[serde(default)]
    pub lag: u64,
    /// Messages the broker holds (its stored-message count less retained
    /// ones): what waits for the fleet service there, its in-flight and
    /// uncommitted messages included. `None` until read.
    #[serde(default)]
    pub broker_waiting: Option<u64>,
    /// Age in seconds of the oldest message this service took from the
    /// broker and has not committed yet (`None`: nothing uncommitted).
    #[serde(default)]
    pub oldest_uncommitted_s: Option<u64>,
    /// Whether this service holds the fleet-wide throttle in force.
    #[serde(default)]
    pub push_back: bool,
}

/// How often a connected service refreshes its [`ServicePresence`].
pub const SERVICE_HEARTBEAT_S: u64 = 10;

/// What a flashing station made of one unit: the unit's serial number, the
/// device identity it was given and the image it was flashed with. One per
/// unit serial (the key); a device id belongs to at most one unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManufacturingRecord {
    /// The unit's serial number as the manifest spells it.
    pub serial: String,
    pub device: DeviceId,
    /// The device certificate written into the unit (hex, as the PKI reports it).
    pub cert_serial: String,
    pub cert_fingerprint_sha256: String,
    /// The flashing station (its name) and who ran it.
    pub station: String,
    pub operator: String,
    pub made_at: UnixSeconds,
    /// SHA-256 (hex) of the golden image the unit's image was made from;
    /// `None` when the station wrote bundles only (a duplicator flashes them).
    pub image_sha256: Option<String>,
}

/// A unit serial on a production batch's allow-list (claim-based first
/// boot): the batch's claim identity may provision it once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimSerial {
    pub serial: UnitSerial,
    /// The batch: the name of its claim identity (`claim:BATCH`).
    pub batch: DeviceId,
    pub allowed_at: UnixSeconds,
    /// Set once the unit has its device certificate.
    pub provisioned: Option<ProvisionedUnit>,
}

/// How an allowed unit was provisioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionedUnit {
    pub device: DeviceId,
    /// SHA-256 (hex) of the public key the unit made: the same key asking
    /// again (a unit that restarted before it stored its certificate) gets
    /// the same chain back, any other key is refused.
    pub key_sha256: String,
    /// What the unit was sent: its certificate and the issuing CA.
    pub chain_pem: String,
    pub at: UnixSeconds,
}

/// What [`super::Store::allow_serials`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AllowReport {
    /// Serials put on the batch's allow-list now.
    pub added: Vec<UnitSerial>,
    /// Serials that were on it already.
    pub already: Vec<UnitSerial>,
}

/// What [`super::Store::import_manufactured`] did with each unit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// Device and record added.
    pub added: Vec<String>,
    /// The device was already registered with this certificate: record added.
    pub recorded: Vec<String>,
    /// Record already present, identical: nothing to do.
    pub unchanged: Vec<String>,
}

/// A console login code as the registry keeps it: only its SHA-256 (hex),
/// never the code itself, so a copy of the registry logs nobody in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginCode {
    /// SHA-256 of the code, lower-case hex.
    pub hash: String,
    /// The operator principal's name (`alice` for `operator:alice`).
    pub operator: String,
    pub created_at: UnixSeconds,
    /// The code is refused from this second on.
    pub expires_at: UnixSeconds,
    /// When it was exchanged for a session; a used code is refused.
    pub used_at: Option<UnixSeconds>,
}

/// One line of the audit log: who changed what, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its place in the log (assigned when stored; 0 before).
    pub seq: i64,
    pub at: UnixSeconds,
    /// The principal or user who did it (`operator:alice`, `cli:root`).
    pub actor: String,
    /// What was done (`device.add`, `send`, `set`, `revoke`, `console.login`...).
    pub action: String,
    /// What it was done to (a device id, or empty).
    pub target: String,
    /// The outcome in words.
    pub detail: String,
}

/// The fleet at a glance: devices by [`PresenceState`], and the
/// non-revoked ones that need attention.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overview {
    pub total: u64,
    pub online: u64,
    pub offline: u64,
    pub never_seen: u64,
    pub revoked: u64,
    /// Certificates that expire before the instant asked about.
    pub cert_expiring: u64,
    /// Desired settings whose revision the device has not reported yet.
    pub settings_pending: u64,
}

impl Overview {
    pub fn count(&self, state: PresenceState) -> u64 {
        match state {
            PresenceState::Online => self.online,
            PresenceState::Offline => self.offline,
            PresenceState::NeverSeen => self.never_seen,
            PresenceState::Revoked => self.revoked,
        }
    }

    /// Add `n` devices of (`lifecycle`, `online`).
    pub fn add(&mut self, lifecycle: Lifecycle, online: bool, n: u64) {
        self.total += n;
        *match PresenceState::of(lifecycle, online) {
            PresenceState::Online => &mut self.online,
            PresenceState::Offline => &mut self.offline,
            PresenceState::NeverSeen => &mut self.never_seen,
            PresenceState::Revoked => &mut self.revoked,
        } += n;
    }
}
