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
    let mut update = decode_raw(topic, payload, received_at)?;
    replace_nul(&mut update);
    Ok(update)
}

/// A NUL character (`\u0000` in the JSON) is valid JSON and a valid Rust
/// string, but PostgreSQL refuses it in TEXT: one such status or event made
/// every retry of its batch fail, the service gave up, and the broker handed
/// the unacknowledged message to the next start, so one device could halt
/// ingest for the fleet. The free text stored as is (not as JSON, which
/// escapes it) gets U+FFFD instead, as a lossy UTF-8 read would, on every
/// backend alike.
fn replace_nul(update: &mut Update) {
    fn clean(s: &mut String) {
        if s.contains('\0') {
            *s = s.replace('\0', "\u{FFFD}");
        }
    }
    match update {
        Update::Status { status, .. } => {
            for s in [
                &mut status.agent_version,
                &mut status.boot_id,
                &mut status.session,
            ]
            .into_iter()
            .flatten()
            {
                clean(s);
            }
            status.addresses.iter_mut().for_each(clean);
        }
        Update::Event { event, .. } => {
            clean(&mut event.kind);
            clean(&mut event.message);
        }
        Update::CommandResult { result, .. } => {
            if let Some(r) = &mut result.reason {
                clean(r);
            }
        }
        // Stored as JSON text (escaped) or as a validated id.
        Update::Telemetry { .. } | Update::Reported { .. } | Update::CommandSeen { .. } => {}
    }
}

fn decode_raw(topic: &str, payload: &[u8], received_at: UnixSeconds) -> Result<Update, Dropped> {
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
    use serde_json::{Value, json};

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

    /// The strings of `u` stored as they are (not as JSON).
    fn free_text(u: &Update) -> Vec<&str> {
        match u {
            Update::Status { status, .. } => {
                [&status.agent_version, &status.boot_id, &status.session]
                    .into_iter()
                    .flatten()
                    .chain(&status.addresses)
                    .map(String::as_str)
                    .collect()
            }
            Update::Event { event, .. } => vec![&event.kind, &event.message],
            Update::CommandResult { result, .. } => result.reason.as_deref().into_iter().collect(),
            _ => vec![],
        }
    }

    #[test]
    fn a_nul_in_stored_free_text_becomes_a_replacement_character() {
        let u = decode(
            "edgebind/v2/events/a",
            br#"{"ts":1,"kind":"k\u0000","message":"a\u0000b"}"#,
            2,
        )
        .unwrap();
        match u {
            Update::Event { event, .. } => {
                assert_eq!(
                    (event.kind.as_str(), event.message.as_str()),
                    ("k\u{FFFD}", "a\u{FFFD}b")
                );
            }
            other => panic!("{other:?}"),
        }
        let u = decode(
            "edgebind/v2/status/a",
            br#"{"state":"online","agent_version":"\u0000","addresses":["\u0000"]}"#,
            2,
        )
        .unwrap();
        assert!(free_text(&u).iter().all(|s| !s.contains('\0')), "{u:?}");
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

    /// The fuzz set for what devices (and anyone allowed to publish) send the
    /// fleet: any topic and any bytes are an update for the device the topic
    /// names, or a reason to drop them, never a panic.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;
        use proptest::sample::Index;

        fn topic() -> impl Strategy<Value = String> {
            (
                prop_oneof![
                    Just("status".to_owned()),
                    Just("telemetry".to_owned()),
                    Just("events".to_owned()),
                    Just("reported".to_owned()),
                    Just("cmd-result".to_owned()),
                    Just("cmd".to_owned()),
                    Just("desired".to_owned()),
                    "[a-z+#-]{0,10}",
                ],
                prop_oneof![Just("a".to_owned()), "[a-zA-Z0-9/+#._ -]{0,10}"],
                prop_oneof![Just("c1".to_owned()), "[a-zA-Z0-9/+#._ -]{0,10}"],
                0..3usize,
            )
                .prop_map(|(kind, dev, cmd, shape)| match shape {
                    0 => format!("edgebind/v2/{kind}/{dev}/{cmd}"),
                    1 => format!("edgebind/v2/{kind}/{dev}"),
                    _ => format!("{kind}/{dev}/{cmd}"),
                })
        }

        /// A valid payload for `topic`'s kind (or `{}`).
        fn valid_payload(topic: &str) -> Vec<u8> {
            let kind = topic.split('/').nth(2).unwrap_or("");
            let v = match kind {
                "status" => {
                    json!({"state": "online", "agent_version": "0.1.0", "ts": 5, "addresses": ["10.0.0.2"]})
                }
                "telemetry" => serde_json::from_str(&telemetry_json(42)).unwrap(),
                "events" => json!({"ts": 1, "kind": "k", "message": "m"}),
                "reported" => {
                    json!({"revision": 2, "applied": {"log_level": "info"}, "ignored": {}, "ts": 3})
                }
                "cmd-result" => {
                    json!({"id": "c1", "status": "succeeded", "output": {"a": [1, 2]}, "facts": true, "ts": 1})
                }
                "cmd" => json!({"id": "c1", "action": "ping", "args": {"x": 1}}),
                _ => json!({}),
            };
            serde_json::to_vec(&v).unwrap()
        }

        fn field_edit() -> impl Strategy<Value = (Index, Value)> {
            let value = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                ".{0,8}".prop_map(Value::from),
                Just(json!([])),
                Just(json!({"nested": [null]})),
            ];
            (any::<Index>(), value)
        }

        fn check(topic: &str, payload: &[u8]) -> Result<(), TestCaseError> {
            match decode(topic, payload, 9) {
                Ok(update) => {
                    let parsed = Topic::parse(topic);
                    prop_assert_eq!(parsed.as_ref().map(Topic::device), Some(update.device()));
                    if let Update::Telemetry {
                        payload: stored, ..
                    } = &update
                    {
                        prop_assert_eq!(stored.as_bytes(), payload, "stored verbatim");
                    }
                    // Nothing PostgreSQL would refuse (see replace_nul).
                    prop_assert!(
                        free_text(&update).iter().all(|s| !s.contains('\0')),
                        "{:?}",
                        update
                    );
                }
                Err(d) => prop_assert!(!d.to_string().is_empty()),
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_topic_and_bytes_are_an_update_or_dropped_with_a_reason(
                topic in topic(),
                bytes in prop::collection::vec(any::<u8>(), 0..256),
            ) {
                check(&topic, &bytes)?;
            }

            #[test]
            fn a_damaged_message_is_an_update_or_dropped_with_a_reason(
                topic in topic(),
                flips in prop::collection::vec((any::<Index>(), 1..=255u8), 1..4),
                cut in any::<Index>(),
            ) {
                let mut bytes = valid_payload(&topic);
                for (i, m) in &flips {
                    let at = i.index(bytes.len());
                    bytes[at] ^= m;
                }
                check(&topic, &bytes)?;
                bytes.truncate(cut.index(bytes.len()));
                check(&topic, &bytes)?;
            }

            #[test]
            fn a_message_with_a_wrong_field_is_an_update_or_dropped_with_a_reason(
                topic in topic(),
                edits in prop::collection::vec(field_edit(), 1..4),
            ) {
                let mut v: Value = serde_json::from_slice(&valid_payload(&topic)).unwrap();
                let obj = v.as_object_mut().unwrap();
                for (i, value) in edits {
                    let keys: Vec<String> = obj.keys().cloned().collect();
                    if !keys.is_empty() {
                        obj.insert(keys[i.index(keys.len())].clone(), value);
                    }
                }
                check(&topic, &serde_json::to_vec(&v).unwrap())?;
            }
        }
    }
}
