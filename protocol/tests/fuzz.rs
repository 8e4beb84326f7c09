//! The fuzz set of the wire contract: everything a device, an operator or a
//! broker can put on a topic goes through these decoders, so random bytes and
//! valid messages with mutated fields must give a clear error or a value,
//! never a panic, and what we render must parse back to itself.
//!
//! Case counts keep the whole set to a few seconds in a debug build; raise
//! them with `PROPTEST_CASES=100000` for a longer run.

use std::collections::BTreeMap;

use edgebind_protocol::actions::{
    self, Action, ActionSpec, ArgSpec, ArgType, Origin, parse_arg, render_arg, validate_args,
};
use edgebind_protocol::messages::{
    Command, CommandResult, CommandStatus, Desired, Event, Inventory, MAX_COMMAND_BYTES,
    NetCounters, Presence, Rejection, Reported, Status, Telemetry,
};
use edgebind_protocol::topics::Topic;
use edgebind_protocol::{CommandId, DeviceId, provision, settings};
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

// ---- strategies ---------------------------------------------------------

fn device_id() -> impl Strategy<Value = DeviceId> {
    "[a-z0-9][a-z0-9._-]{0,63}".prop_map(|s| DeviceId::new(s).unwrap())
}

fn command_id() -> impl Strategy<Value = CommandId> {
    "[A-Za-z0-9][A-Za-z0-9._-]{0,63}".prop_map(|s| CommandId::new(s).unwrap())
}

fn action() -> impl Strategy<Value = Action> {
    "[a-z][a-z0-9_-]{0,63}".prop_map(|s| Action::new(s).unwrap())
}

/// Floats with a few decimal digits. serde_json parses floats best-effort
/// (exact round trips need its `float_roundtrip` feature, which halves float
/// parsing speed), so only values it reads back exactly are generated where
/// a round trip is asserted.
fn nice_f64() -> impl Strategy<Value = f64> {
    (any::<i32>(), 0..6i32).prop_map(|(m, e)| f64::from(m) / 10f64.powi(e))
}

fn nice_f32() -> impl Strategy<Value = f32> {
    (any::<i16>(), 0..3i32).prop_map(|(m, e)| f32::from(m) / 10f32.powi(e))
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        nice_f64().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map("[a-z_]{1,10}", json_value(), 0..4)
        .prop_map(|m| m.into_iter().collect())
}

fn short_text() -> impl Strategy<Value = String> {
    ".{0,24}"
}

fn command() -> impl Strategy<Value = Command> {
    (
        command_id(),
        action(),
        json_object(),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(id, action, args, expires_at)| Command {
            id,
            action,
            args,
            expires_at,
        })
}

fn status() -> impl Strategy<Value = Status> {
    (
        prop_oneof![Just(Presence::Online), Just(Presence::Offline)],
        prop::option::of(short_text()),
        prop::option::of(short_text()),
        prop::option::of(any::<u64>()),
        prop::collection::vec(short_text(), 0..3),
        prop::option::of(any::<u64>()),
        prop::option::of(short_text()),
    )
        .prop_map(
            |(state, agent_version, boot_id, uptime_s, addresses, ts, session)| Status {
                state,
                agent_version,
                boot_id,
                uptime_s,
                addresses,
                ts,
                session,
            },
        )
}

fn telemetry() -> impl Strategy<Value = Telemetry> {
    (
        any::<u64>(),
        nice_f32(),
        [nice_f64(), nice_f64(), nice_f64()],
        any::<[u64; 5]>(),
        prop::option::of(nice_f32()),
        prop::collection::vec(
            (short_text(), any::<u64>(), any::<u64>()).prop_map(|(iface, rx_bytes, tx_bytes)| {
                NetCounters {
                    iface,
                    rx_bytes,
                    tx_bytes,
                }
            }),
            0..3,
        ),
    )
        .prop_map(|(ts, cpu_pct, load_avg, n, soc_temp_c, net)| Telemetry {
            ts,
            cpu_pct,
            load_avg,
            mem_total_bytes: n[0],
            mem_used_bytes: n[1],
            disk_total_bytes: n[2],
            disk_used_bytes: n[3],
            uptime_s: n[4],
            soc_temp_c,
            net,
        })
}

fn command_status() -> impl Strategy<Value = CommandStatus> {
    prop_oneof![
        Just(CommandStatus::Accepted),
        Just(CommandStatus::Succeeded),
        Just(CommandStatus::Failed),
        Just(CommandStatus::TimedOut),
        Just(CommandStatus::Rejected),
    ]
}

fn command_result() -> impl Strategy<Value = CommandResult> {
    (
        command_id(),
        command_status(),
        prop::option::of(short_text()),
        prop::option::of(json_value()),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(id, status, reason, output, facts, ts)| CommandResult {
            id,
            status,
            reason,
            // `"output": null` reads back as no output: the same message.
            output: output.filter(|v| !v.is_null()),
            facts,
            ts,
        })
}

fn arg_spec() -> impl Strategy<Value = ArgSpec> {
    let ty = prop_oneof![
        (prop::collection::vec("[a-z0-9]{1,6}", 0..4), 0usize..64)
            .prop_map(|(allowed, max_len)| ArgType::String { allowed, max_len }),
        (any::<i64>(), any::<i64>()).prop_map(|(a, b)| ArgType::Integer {
            min: a.min(b),
            max: a.max(b),
        }),
        Just(ArgType::Bool),
    ];
    (ty, any::<bool>(), prop::option::of(short_text())).prop_map(|(ty, required, description)| {
        ArgSpec {
            ty,
            required,
            description,
        }
    })
}

fn arg_specs() -> impl Strategy<Value = BTreeMap<String, ArgSpec>> {
    prop::collection::btree_map("[a-z][a-z0-9_-]{0,10}", arg_spec(), 0..4)
}

fn action_spec() -> impl Strategy<Value = ActionSpec> {
    (
        action(),
        prop_oneof![Just(Origin::Builtin), Just(Origin::Declared)],
        prop::option::of(short_text()),
        arg_specs(),
        any::<bool>(),
        any::<u64>(),
        prop::option::of(short_text()),
    )
        .prop_map(
            |(name, origin, description, args, idempotent, timeout_s, result)| ActionSpec {
                name,
                origin,
                description,
                args,
                idempotent,
                timeout_s,
                result,
            },
        )
}

fn inventory() -> impl Strategy<Value = Inventory> {
    (
        short_text(),
        prop::collection::vec(prop::option::of(short_text()), 5),
        prop::collection::vec(action_spec(), 0..3),
    )
        .prop_map(|(agent_version, o, actions)| Inventory {
            agent_version,
            os_release: o[0].clone(),
            kernel: o[1].clone(),
            board_model: o[2].clone(),
            serial: o[3].clone(),
            boot_id: o[4].clone(),
            actions,
        })
}

fn topic() -> impl Strategy<Value = Topic> {
    (0..7usize, device_id(), command_id()).prop_map(|(k, d, c)| match k {
        0 => Topic::Status(d),
        1 => Topic::Telemetry(d),
        2 => Topic::Events(d),
        3 => Topic::Reported(d),
        4 => Topic::Desired(d),
        5 => Topic::Cmd(d, c),
        _ => Topic::CmdResult(d, c),
    })
}

/// One change to a byte string: flip bits, insert, delete or cut off.
#[derive(Debug, Clone)]
enum ByteEdit {
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Truncate(prop::sample::Index),
}

fn byte_edits() -> impl Strategy<Value = Vec<ByteEdit>> {
    let edit = prop_oneof![
        (any::<prop::sample::Index>(), 1..=255u8).prop_map(|(i, m)| ByteEdit::Flip(i, m)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        any::<prop::sample::Index>().prop_map(ByteEdit::Delete),
        any::<prop::sample::Index>().prop_map(ByteEdit::Truncate),
    ];
    prop::collection::vec(edit, 1..4)
}

fn apply(mut bytes: Vec<u8>, edits: &[ByteEdit]) -> Vec<u8> {
    for e in edits {
        if bytes.is_empty() {
            break;
        }
        match e {
            ByteEdit::Flip(i, m) => {
                let at = i.index(bytes.len());
                bytes[at] ^= m;
            }
            ByteEdit::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
            ByteEdit::Delete(i) => {
                bytes.remove(i.index(bytes.len()));
            }
            ByteEdit::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        }
    }
    bytes
}

/// A field of a JSON object replaced by any value, or removed, or a new one
/// added: a well-formed message with a wrong shape.
#[derive(Debug, Clone)]
enum FieldEdit {
    Replace(prop::sample::Index, Value),
    Remove(prop::sample::Index),
    Add(String, Value),
}

fn field_edits() -> impl Strategy<Value = Vec<FieldEdit>> {
    let edit = prop_oneof![
        (any::<prop::sample::Index>(), json_value()).prop_map(|(i, v)| FieldEdit::Replace(i, v)),
        any::<prop::sample::Index>().prop_map(FieldEdit::Remove),
        ("[a-z_]{1,12}", json_value()).prop_map(|(k, v)| FieldEdit::Add(k, v)),
    ];
    prop::collection::vec(edit, 1..4)
}

fn mutate_fields(mut value: Value, edits: &[FieldEdit]) -> Value {
    let Some(obj) = value.as_object_mut() else {
        return value;
    };
    for e in edits {
        let keys: Vec<String> = obj.keys().cloned().collect();
        match e {
            FieldEdit::Replace(i, v) if !keys.is_empty() => {
                obj.insert(keys[i.index(keys.len())].clone(), v.clone());
            }
            FieldEdit::Remove(i) if !keys.is_empty() => {
                obj.remove(&keys[i.index(keys.len())]);
            }
            FieldEdit::Add(k, v) => {
                obj.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
    value
}

fn round_trips<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    x: &T,
) -> Result<(), TestCaseError> {
    let text = serde_json::to_vec(x).unwrap();
    let back: T = serde_json::from_slice(&text)
        .map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&text))))?;
    prop_assert_eq!(&back, x);
    Ok(())
}

/// Decoding `bytes` as every message type: Ok or Err, never a panic, and
/// whatever decodes renders and decodes to itself.
fn decode_as_every_message(bytes: &[u8]) -> Result<(), TestCaseError> {
    fn one<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
        bytes: &[u8],
    ) -> Result<(), TestCaseError> {
        if let Ok(x) = serde_json::from_slice::<T>(bytes) {
            round_trips(&x)?;
        }
        Ok(())
    }
    one::<Status>(bytes)?;
    // Telemetry's floats may come from any decimal text: no exact round
    // trip (see nice_f64), but what decodes is finite and renders again.
    if let Ok(t) = serde_json::from_slice::<Telemetry>(bytes) {
        prop_assert!(t.cpu_pct.is_finite() && t.soc_temp_c.is_none_or(f32::is_finite));
        prop_assert!(serde_json::from_slice::<Telemetry>(&serde_json::to_vec(&t).unwrap()).is_ok());
    }
    one::<Event>(bytes)?;
    one::<CommandResult>(bytes)?;
    one::<Inventory>(bytes)?;
    one::<Desired>(bytes)?;
    one::<Reported>(bytes)?;
    one::<provision::Request>(bytes)?;
    one::<provision::Response>(bytes)?;
    Ok(())
}

// ---- properties ---------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn command_from_any_bytes_is_a_command_or_a_rejection(
        id in command_id(),
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        now in any::<u64>(),
    ) {
        if let Ok(c) = Command::decode(&id, &bytes, now) {
            prop_assert_eq!(&c.id, &id);
        }
    }

    #[test]
    fn command_round_trips(c in command()) {
        let back = Command::decode(&c.id, &c.encode(), 0);
        match c.expires_at {
            Some(0) => {
                let expired = matches!(back, Err(Rejection::Expired { .. }));
                prop_assert!(expired, "{:?}", back);
            }
            _ => prop_assert_eq!(back, Ok(c)),
        }
    }

    #[test]
    fn mutated_command_bytes_decode_or_are_rejected_with_a_reason(
        c in command(),
        edits in byte_edits(),
    ) {
        let bytes = apply(c.encode(), &edits);
        match Command::decode(&c.id, &bytes, 0) {
            Ok(back) => prop_assert_eq!(&back.id, &c.id),
            Err(r) => prop_assert!(!r.to_string().is_empty()),
        }
    }

    #[test]
    fn command_with_mutated_fields_decodes_or_names_the_problem(
        c in command(),
        edits in field_edits(),
    ) {
        let v = mutate_fields(serde_json::to_value(&c).unwrap(), &edits);
        let bytes = serde_json::to_vec(&v).unwrap();
        match Command::decode(&c.id, &bytes, 0) {
            Ok(back) => {
                prop_assert_eq!(&back.id, &c.id);
                // What decoded is what the JSON says.
                prop_assert_eq!(back.action.as_str(), v["action"].as_str().unwrap());
            }
            Err(Rejection::TooLarge { .. }) => prop_assert!(bytes.len() > MAX_COMMAND_BYTES),
            Err(r) => prop_assert!(!r.to_string().is_empty()),
        }
    }

    #[test]
    fn device_messages_round_trip(
        s in status(),
        t in telemetry(),
        r in command_result(),
        i in inventory(),
        kind in short_text(),
        message in short_text(),
        revision in any::<u64>(),
        settings in json_object(),
        ignored in json_object(),
        ts in any::<u64>(),
    ) {
        round_trips(&s)?;
        round_trips(&t)?;
        round_trips(&r)?;
        round_trips(&i)?;
        round_trips(&Event { ts, kind, message })?;
        round_trips(&Desired { revision, settings: settings.clone() })?;
        round_trips(&Reported { revision, applied: settings, ignored, ts })?;
    }

    #[test]
    fn telemetry_beyond_what_f32_holds_is_refused(
        t in telemetry(),
        field in prop_oneof![Just("cpu_pct"), Just("soc_temp_c")],
        big in prop_oneof![Just(3.5e38), Just(-1e39), Just(1e300)],
    ) {
        let mut v = serde_json::to_value(&t).unwrap();
        v[field] = json!(big);
        let e = serde_json::from_slice::<Telemetry>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        prop_assert!(e.to_string().contains("f32"), "{}", e);
    }

    #[test]
    fn any_bytes_decode_as_any_message_without_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        decode_as_every_message(&bytes)?;
    }

    #[test]
    fn mutated_messages_decode_or_fail_without_panic(
        s in status(),
        t in telemetry(),
        r in command_result(),
        i in inventory(),
        which in 0..4usize,
        edits in byte_edits(),
        fields in field_edits(),
    ) {
        let valid = match which {
            0 => serde_json::to_value(&s).unwrap(),
            1 => serde_json::to_value(&t).unwrap(),
            2 => serde_json::to_value(&r).unwrap(),
            _ => serde_json::to_value(&i).unwrap(),
        };
        decode_as_every_message(&apply(serde_json::to_vec(&valid).unwrap(), &edits))?;
        decode_as_every_message(&serde_json::to_vec(&mutate_fields(valid, &fields)).unwrap())?;
    }

    #[test]
    fn topics_round_trip_and_any_text_parses_or_is_none(
        t in topic(),
        text in "[a-z0-9/+#._-]{0,48}",
        junk in ".{0,64}",
    ) {
        prop_assert_eq!(Topic::parse(&t.render()), Some(t.clone()));
        for s in [text, junk, format!("edgebind/v2/{}", t.render())] {
            if let Some(p) = Topic::parse(&s) {
                prop_assert_eq!(p.render(), s.as_str());
            }
            let _ = provision::parse_request(&s);
        }
    }

    #[test]
    fn desired_settings_are_valid_only_in_range(key in prop_oneof![
        Just(settings::TELEMETRY_INTERVAL_S.to_owned()),
        Just(settings::LOG_LEVEL.to_owned()),
        "[a-z_]{0,24}",
    ], value in json_value()) {
        match settings::validate(&key, &value) {
            Ok(settings::Setting::TelemetryIntervalS(n)) => {
                let (lo, hi) = settings::TELEMETRY_INTERVAL_RANGE_S;
                prop_assert!((lo..=hi).contains(&n));
                prop_assert_eq!(value.as_u64(), Some(n));
            }
            Ok(settings::Setting::LogLevel(l)) => {
                prop_assert!(settings::LOG_LEVELS.contains(&l));
                prop_assert_eq!(value.as_str(), Some(l));
            }
            Err(settings::SettingError::UnknownKey) => prop_assert!(!settings::is_known(&key)),
            Err(e) => {
                prop_assert!(settings::is_known(&key));
                // The message quotes the value it refused.
                prop_assert!(e.to_string().contains(&value.to_string()));
            }
        }
    }

    #[test]
    fn arguments_check_against_any_schema_without_panic(
        spec in arg_specs(),
        args in json_object(),
    ) {
        if let Err(e) = validate_args(&spec, &args) {
            // Every refusal names an argument.
            prop_assert!(e.contains("argument \""), "{}", e);
        }
    }

    #[test]
    fn valid_arguments_survive_the_command_line(spec in arg_spec(), pick in any::<prop::sample::Index>(), n in any::<i64>()) {
        // A value the schema accepts, typed by an operator as text, parses to itself.
        let value = match &spec.ty {
            ArgType::String { allowed, .. } if !allowed.is_empty() => json!(allowed[pick.index(allowed.len())]),
            ArgType::String { .. } => json!(""),
            ArgType::Integer { min, max } => {
                let span = (*max as i128 - *min as i128 + 1) as u128;
                json!((*min as i128 + (n as u128 % span) as i128) as i64)
            }
            ArgType::Bool => json!(n % 2 == 0),
        };
        let schema = BTreeMap::from([("a".to_owned(), spec.clone())]);
        let args: Map<String, Value> = [("a".to_owned(), value.clone())].into_iter().collect();
        if validate_args(&schema, &args).is_ok() {
            prop_assert_eq!(parse_arg(&spec, &render_arg(&value)), value);
        }
    }

    #[test]
    fn action_names_parse_or_say_why(name in ".{0,70}") {
        match Action::new(name.clone()) {
            Ok(a) => {
                prop_assert_eq!(a.as_str(), name.as_str());
                prop_assert!(actions::check_name("x", &name).is_ok());
            }
            Err(e) => prop_assert!(e.contains("action name")),
        }
    }
}
