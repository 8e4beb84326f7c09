//! Payload schemas (JSON) for every topic kind.
//!
//! Fields added later must be optional (`#[serde(default)]`) so that old
//! agents and new fleet services can talk; unknown fields are ignored on
//! purpose for the same reason.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::ids::CommandId;

/// Largest command payload an agent will parse; larger ones are rejected
/// without being parsed so that a broker cannot make the agent allocate much.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;

/// Largest MQTT packet the broker accepts and clients expect.
pub const MAX_PACKET_BYTES: usize = 256 * 1024;

/// Seconds since the Unix epoch.
pub type UnixSeconds = u64;

pub fn now_unix() -> UnixSeconds {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Online,
    Offline,
}

/// Retained on the status topic: `online` on connect, `offline` as the will
/// and on clean shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: Presence,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<UnixSeconds>,
    /// Names one connection of one agent process (`online` only): two
    /// connections within the same second differ here, the same message
    /// delivered twice does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

impl Status {
    pub fn offline() -> Self {
        Status {
            state: Presence::Offline,
            agent_version: None,
            boot_id: None,
            uptime_s: None,
            addresses: Vec::new(),
            ts: None,
            session: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetCounters {
    pub iface: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Periodic health sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub ts: UnixSeconds,
    /// Whole-system CPU use since the previous sample, 0–100.
    #[serde(deserialize_with = "finite_f32")]
    pub cpu_pct: f32,
    pub load_avg: [f64; 3],
    pub mem_total_bytes: u64,
    pub mem_used_bytes: u64,
    /// Filesystem holding the agent's data directory.
    pub disk_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub uptime_s: u64,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "finite_f32_opt"
    )]
    pub soc_temp_c: Option<f32>,
    #[serde(default)]
    pub net: Vec<NetCounters>,
}

/// serde reads an `f32` from any JSON number and turns one beyond its range
/// into infinity, which renders as `null` and then no longer parses (the
/// registry stores telemetry as received and reads it back): refused here.
fn finite_f32<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let wide = f64::deserialize(d)?;
    let narrow = wide as f32;
    if narrow.is_finite() {
        Ok(narrow)
    } else {
        Err(serde::de::Error::custom(format!(
            "{wide} is beyond the range of an f32"
        )))
    }
}

fn finite_f32_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "finite_f32")] f32);
    Ok(Option::<Wrap>::deserialize(d)?.map(|Wrap(f)| f))
}

/// Free-form device event (e.g. "settings applied", "identity expires soon").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub ts: UnixSeconds,
    pub kind: String,
    pub message: String,
}

/// The `kind`s of [`Event`] an agent sends.
pub mod events {
    /// A `desired` message that could not be read at all (not JSON, no
    /// revision); the message says why.
    pub const DESIRED_REJECTED: &str = "desired-rejected";
    /// The agent found unreadable records in its own state files at start
    /// (journal, saved settings, outbox: a power cut on flash, a bad sector)
    /// and skipped them; the message names each file and how many records or
    /// bytes were lost. It started and serves anyway.
    pub const STATE_RECOVERED: &str = "state_recovered";
    /// The outbox (what the agent queues while disconnected) was full and
    /// records were dropped, oldest telemetry first; the message counts them
    /// by kind and gives the time span. Sent once the link is back.
    pub const OUTBOX_DROPPED: &str = "outbox_dropped";
}

/// Action names (validated; each device lists the ones it offers).
pub use crate::actions::Action;

/// A remote command as published on `devices/{id}/cmd/{cmd-id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: CommandId,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub args: Map<String, Value>,
    /// After this instant the command must not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<UnixSeconds>,
}

/// Loose shape used to decode, so that a bad `action` still yields a
/// rejection that names it instead of a generic parse error.
#[derive(Deserialize)]
struct RawCommand {
    id: String,
    action: String,
    #[serde(default)]
    args: Option<Value>,
    #[serde(default)]
    expires_at: Option<UnixSeconds>,
}

/// Why a delivered command is refused; the agent reports it as `rejected`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("payload is {len} bytes; commands are limited to {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed command: {0}")]
    Malformed(String),
    #[error("{0}")]
    BadActionName(String),
    #[error("command id in payload ({payload}) differs from the topic's ({topic})")]
    IdMismatch { topic: String, payload: String },
    #[error("command expired at {expires_at} (device clock: {now})")]
    Expired {
        expires_at: UnixSeconds,
        now: UnixSeconds,
    },
}

impl Command {
    /// Decode and check a command delivered on the topic of `topic_id`.
    /// Never panics, whatever the bytes.
    pub fn decode(
        topic_id: &CommandId,
        payload: &[u8],
        now: UnixSeconds,
    ) -> Result<Command, Rejection> {
        if payload.len() > MAX_COMMAND_BYTES {
            return Err(Rejection::TooLarge {
                len: payload.len(),
                max: MAX_COMMAND_BYTES,
            });
        }
        let raw: RawCommand =
            serde_json::from_slice(payload).map_err(|e| Rejection::Malformed(e.to_string()))?;
        if raw.id != topic_id.as_str() {
            return Err(Rejection::IdMismatch {
                topic: topic_id.to_string(),
                payload: raw.id,
            });
        }
        let action: Action = raw.action.parse().map_err(Rejection::BadActionName)?;
        let args = match raw.args {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map,
            Some(other) => {
                return Err(Rejection::Malformed(format!(
                    "args must be a JSON object, not {other}"
                )));
            }
        };
        if let Some(expires_at) = raw.expires_at
            && expires_at <= now
        {
            return Err(Rejection::Expired { expires_at, now });
        }
        Ok(Command {
            id: topic_id.clone(),
            action,
            args,
            expires_at: raw.expires_at,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a Command always serializes")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Accepted,
    Succeeded,
    Failed,
    /// The action ran past its time limit and was killed.
    TimedOut,
    Rejected,
}

impl CommandStatus {
    /// Whether no further result will follow for this command id.
    pub fn is_final(self) -> bool {
        !matches!(self, CommandStatus::Accepted)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Accepted => "accepted",
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::TimedOut => "timed_out",
            CommandStatus::Rejected => "rejected",
        }
    }
}

/// Published on `devices/{id}/cmd-result/{cmd-id}`: `accepted`, then one final status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: CommandId,
    pub status: CommandStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The output is a report of the device's facts (what `inventory`
    /// answers): the registry keeps the latest such report of a device,
    /// whichever action sent it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub facts: bool,
    pub ts: UnixSeconds,
}

/// What `inventory` answers with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub agent_version: String,
    #[serde(default)]
    pub os_release: Option<String>,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub board_model: Option<String>,
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub boot_id: Option<String>,
    /// The actions this device offers, built-in and declared by its image,
    /// with their argument schemas (absent from agents before 0.2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<crate::actions::ActionSpec>,
}

impl Inventory {
    /// The spec of `action`, if the device offers it.
    pub fn action(&self, action: &Action) -> Option<&crate::actions::ActionSpec> {
        self.actions.iter().find(|a| &a.name == action)
    }
}

/// The desired-settings keys (the contract with types and ranges is
/// [`crate::settings`]).
pub mod settings {
    pub use crate::settings::{LOG_LEVEL, TELEMETRY_INTERVAL_S};
}

/// Retained on `devices/{id}/desired`: what the fleet wants the device to run with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    /// Increases with every change, so a report can say which version it applied.
    pub revision: u64,
    pub settings: Map<String, Value>,
}

/// Retained on `devices/{id}/reported`: what the device applied from a revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reported {
    pub revision: u64,
    /// Settings in force after applying (including unchanged defaults).
    pub applied: Map<String, Value>,
    /// Keys the agent did not apply, with why (unknown key, bad value).
    #[serde(default)]
    pub ignored: Map<String, Value>,
    pub ts: UnixSeconds,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(s: &str) -> CommandId {
        CommandId::new(s).unwrap()
    }

    #[test]
    fn decodes_a_well_formed_command() {
        let c = Command::decode(
            &cid("c1"),
            br#"{"id":"c1","action":"reboot","expires_at":200}"#,
            100,
        )
        .unwrap();
        assert_eq!(c.action, crate::actions::REBOOT);
        assert_eq!(c.expires_at, Some(200));
        let again = Command::decode(&cid("c1"), &c.encode(), 100).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn every_kind_of_bad_command_is_a_rejection_not_a_panic() {
        type Check = fn(&Rejection) -> bool;
        let id = cid("c1");
        let cases: Vec<(&[u8], Check)> = vec![
            (b"not json", |r| matches!(r, Rejection::Malformed(_))),
            (b"\xff\xfe", |r| matches!(r, Rejection::Malformed(_))),
            (br#"{"id":"c1"}"#, |r| matches!(r, Rejection::Malformed(_))),
            (
                br#"{"id":"c1","action":"Format disk"}"#,
                |r| matches!(r, Rejection::BadActionName(m) if m.contains("Format disk")),
            ),
            (br#"{"id":"c2","action":"ping"}"#, |r| {
                matches!(r, Rejection::IdMismatch { .. })
            }),
            (br#"{"id":"c1","action":"ping","expires_at":5}"#, |r| {
                matches!(r, Rejection::Expired { .. })
            }),
            (br#"{"id":"c1","action":"ping","args":[1]}"#, |r| {
                matches!(r, Rejection::Malformed(_))
            }),
        ];
        for (payload, check) in cases {
            let r = Command::decode(&id, payload, 10).unwrap_err();
            assert!(
                check(&r),
                "{:?} gave {r:?}",
                String::from_utf8_lossy(payload)
            );
        }
        let big = vec![b' '; MAX_COMMAND_BYTES + 1];
        assert!(matches!(
            Command::decode(&id, &big, 0),
            Err(Rejection::TooLarge { .. })
        ));
    }

    #[test]
    fn status_offline_is_small_and_parses_back() {
        let s = serde_json::to_string(&Status::offline()).unwrap();
        assert_eq!(s, r#"{"state":"offline"}"#);
        let back: Status = serde_json::from_str(&s).unwrap();
        assert_eq!(back.state, Presence::Offline);
    }
}
