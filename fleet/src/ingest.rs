//! Turning what arrives from the broker into registry [`Update`]s.
//!
//! Pure functions of (topic, payload, clock): no socket, no database, so
//! every malformed input can be tested directly.

use edgebind_protocol::messages::{
    Command, CommandResult, Event, Reported, Status, Telemetry, UnixSeconds,
};
use edgebind_protocol::topics::{Kind, Topic};

use crate::registry::Update;

/// The filters the fleet service subscribes to: everything devices report,
/// plus commands on their way (so commands sent by any operator enter the log),
/// each as a shared subscription so that instances split the work.
pub fn subscriptions() -> Vec<String> {
    [
        Kind::Status,
        Kind::Telemetry,
        Kind::Events,
        Kind::Reported,
        Kind::CmdResult,
        Kind::Cmd,
    ]
    .into_iter()
    .map(Kind::filter_shared)
    .collect()
}

/// Why a message was dropped instead of written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    #[error("topic {0:?} is not an Edgebind device topic")]
    ForeignTopic(String),
    #[error("{topic}: empty payload (a cleared retained message)")]
    Empty { topic: String },
    #[error("{topic}: the fleet does not ingest this kind of topic")]
    NotIngested { topic: String },
    #[error("{topic}: invalid payload: {detail}")]
    Invalid { topic: String, detail: String },
}

fn invalid(topic: &str, detail: impl ToString) -> Dropped {
    Dropped::Invalid {
        topic: topic.to_owned(),
        detail: detail.to_string(),
    }
}

/// Decode one message. `received_at` is the service's clock.
pub fn decode(topic: &str, payload: &[u8], received_at: UnixSeconds) -> Result<Update, Dropped> {
    let parsed = Topic::parse(topic).ok_or_else(|| Dropped::ForeignTopic(topic.to_owned()))?;
    if payload.is_empty() {
        return Err(Dropped::Empty {
            topic: topic.to_owned(),
        });
    }
    Ok(match parsed {
        Topic::Status(device) => Update::Status {
            device,
            status: serde_json::from_slice::<Status>(payload).map_err(|e| invalid(topic, e))?,
            received_at,
        },
        Topic::Telemetry(device) => {
            let t: Telemetry = serde_json::from_slice(payload).map_err(|e| invalid(topic, e))?;
            let text = std::str::from_utf8(payload).map_err(|e| invalid(topic, e))?;
            Update::Telemetry {
                device,
                ts: t.ts,
                payload: text.to_owned(),
                received_at,
            }
        }
        Topic::Events(device) => Update::Event {
            device,
            event: serde_json::from_slice::<Event>(payload).map_err(|e| invalid(topic, e))?,
            received_at,
        },
        Topic::Reported(device) => Update::Reported {
            device,
            reported: serde_json::from_slice::<Reported>(payload).map_err(|e| invalid(topic, e))?,
            received_at,
        },
        Topic::CmdResult(device, id) => {
            let result: CommandResult =
                serde_json::from_slice(payload).map_err(|e| invalid(topic, e))?;
            if result.id != id {
                return Err(invalid(
                    topic,
                    format!(
                        "result is for command {} but the topic names {id}",
                        result.id
                    ),
                ));
            }
            Update::CommandResult {
                device,
                result,
                received_at,
            }
        }
        Topic::Cmd(device, id) => {
            // now = 0: an expired command is still a command that was sent.
            let command = Command::decode(&id, payload, 0).map_err(|e| invalid(topic, e))?;
            Update::CommandSeen {
                device,
                command,
                received_at,
            }
        }
        Topic::Desired(_) => {
            return Err(Dropped::NotIngested {
                topic: topic.to_owned(),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use edgebind_protocol::messages::{CommandStatus, Presence};
    use edgebind_protocol::{CommandId, DeviceId};
    use serde_json::json;

    use super::*;

    fn telemetry_json(ts: u64) -> String {
        json!({
            "ts": ts, "cpu_pct": 3.5, "load_avg": [0.1, 0.2, 0.3],
            "mem_total_bytes": 1000, "mem_used_bytes": 500,
            "disk_total_bytes": 10, "disk_used_bytes": 5,
            "uptime_s": 9, "net": []
        })
        .to_string()
    }

    #[test]
    fn subscribes_to_every_reporting_kind_through_protocol() {
        let subs = subscriptions();
        assert!(subs.contains(&Kind::Telemetry.filter_shared()));
        assert!(subs.contains(&Kind::CmdResult.filter_shared()));
        assert!(!subs.contains(&Kind::Desired.filter_shared()));
    }

    #[test]
    fn decodes_status_telemetry_and_results() {
        let dev = DeviceId::new("a").unwrap();
        let status = decode(
            "edgebind/v2/status/a",
            br#"{"state":"online","agent_version":"0.1.0","ts":5}"#,
            7,
        )
        .unwrap();
        match status {
            Update::Status {
                device,
                status,
                received_at,
            } => {
                assert_eq!(device, dev);
                assert_eq!(status.state, Presence::Online);
                assert_eq!(received_at, 7);
            }
            other => panic!("{other:?}"),
        }
        let payload = telemetry_json(42);
        match decode("edgebind/v2/telemetry/a", payload.as_bytes(), 43) {
            Ok(Update::Telemetry { ts, payload: p, .. }) => {
                assert_eq!(ts, 42);
                assert_eq!(p, payload, "stored verbatim");
            }
            other => panic!("{other:?}"),
        }
        let r = decode(
            "edgebind/v2/cmd-result/a/c1",
            br#"{"id":"c1","status":"rejected","reason":"no","ts":1}"#,
            2,
        )
        .unwrap();
        assert!(matches!(r, Update::CommandResult { result, .. }
            if result.status == CommandStatus::Rejected && result.id == CommandId::new("c1").unwrap()));
    }

    #[test]
    fn bad_messages_are_dropped_with_a_reason() {
        let cases: &[(&str, &[u8])] = &[
            ("other/topic", b"{}"),
            ("edgebind/v2/status/a+b", b"{}"),
            ("edgebind/v2/status/a", b""),
            ("edgebind/v2/status/a", b"not json"),
            ("edgebind/v2/status/a", br#"{"state":"sleeping"}"#),
            ("edgebind/v2/telemetry/a", br#"{"ts":"yesterday"}"#),
            (
                "edgebind/v2/cmd-result/a/c1",
                br#"{"id":"c2","status":"failed","ts":1}"#,
            ),
            (
                "edgebind/v2/cmd/a/c1",
                br#"{"id":"c1","action":"Format disk!"}"#,
            ),
            ("edgebind/v2/desired/a", br#"{"revision":1,"settings":{}}"#),
        ];
        for (topic, payload) in cases {
            let err = decode(topic, payload, 0).unwrap_err();
            assert!(!err.to_string().is_empty(), "{topic}");
        }
        let err = decode(
            "edgebind/v2/cmd-result/a/c1",
            br#"{"id":"c2","status":"failed","ts":1}"#,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("c2") && err.contains("c1"), "{err}");
    }
}
