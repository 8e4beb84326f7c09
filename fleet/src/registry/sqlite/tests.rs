use std::collections::BTreeSet;

use edgebind_protocol::messages::{
    Command, CommandResult, CommandStatus, Event, Presence, Reported, Status,
};
use serde_json::json;

use super::*;

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn cid(s: &str) -> CommandId {
    CommandId::new(s).unwrap()
}

fn temp_store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("registry.db"), Retention::default()).unwrap();
    (dir, store)
}

fn new_device(s: &str, tags: &[&str]) -> NewDevice {
    NewDevice {
        id: id(s),
        board: "raspberrypi3-64".parse().unwrap(),
        tags: tags.iter().map(|t| t.parse().unwrap()).collect(),
        cert: Some(CertInfo {
            serial: "0a1b".into(),
            fingerprint_sha256: "ff".repeat(32),
            not_after: 2_000_000_000,
        }),
    }
}

/// Every row of every table, to prove that a failed call changed nothing.
fn dump(store: &SqliteStore) -> Vec<String> {
    let mut out = Vec::new();
    for table in [
        "devices",
        "device_tags",
        "telemetry",
        "events",
        "commands",
        "on_connect_rules",
    ] {
        let mut stmt = store
            .conn
            .prepare(&format!("SELECT * FROM {table} ORDER BY 1"))
            .unwrap();
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                let mut line = format!("{table}:");
                for i in 0..n {
                    let v: rusqlite::types::Value = r.get(i)?;
                    line.push_str(&format!(" {v:?}"));
                }
                Ok(line)
            })
            .unwrap();
        out.extend(rows.map(Result::unwrap));
    }
    out
}

fn online(device: &str, ts: u64) -> Update {
    Update::Status {
        device: id(device),
        status: Status {
            state: Presence::Online,
            agent_version: Some("0.1.0".into()),
            boot_id: Some("b1".into()),
            uptime_s: Some(5),
            addresses: vec!["10.0.2.15".into()],
            ts: Some(ts),
        },
        received_at: ts,
    }
}

fn offline(device: &str, at: u64) -> Update {
    Update::Status {
        device: id(device),
        status: Status::offline(),
        received_at: at,
    }
}

fn telemetry(device: &str, ts: u64) -> Update {
    Update::Telemetry {
        device: id(device),
        ts,
        payload: json!({"ts": ts, "cpu_pct": 12.5, "mem_used_bytes": 1000}).to_string(),
        received_at: ts,
    }
}

#[test]
fn open_creates_wal_file_and_records_schema_version() {
    let (dir, store) = temp_store();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let mode: String = store
        .conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(store);
    // Re-opening runs no migration twice.
    let again = SqliteStore::open(&dir.path().join("registry.db"), Retention::default()).unwrap();
    assert_eq!(again.schema_version().unwrap(), SCHEMA_VERSION);
}

#[test]
fn a_newer_schema_is_refused_with_the_file_named() {
    let (dir, store) = temp_store();
    store
        .conn
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(store);
    let path = dir.path().join("registry.db");
    let err = SqliteStore::open(&path, Retention::default()).unwrap_err();
    assert!(matches!(err, RegistryError::SchemaTooNew { .. }), "{err}");
    assert!(err.to_string().contains("registry.db"), "{err}");
}

#[test]
fn add_and_read_back_a_device() {
    let (_dir, mut store) = temp_store();
    let d = store
        .add_device(&new_device("rpi-1", &["lab", "eu"]))
        .unwrap();
    assert_eq!(d.lifecycle, Lifecycle::Registered);
    assert!(!d.online);
    let tags: BTreeSet<String> = d.tags.iter().map(|t| t.to_string()).collect();
    assert_eq!(tags, ["eu", "lab"].map(String::from).into());
    assert_eq!(store.device(&id("rpi-1")).unwrap(), d);
    assert_eq!(d.cert.unwrap().not_after, 2_000_000_000);
}

#[test]
fn bad_inputs_are_clear_errors_and_change_nothing() {
    let (_dir, mut store) = temp_store();
    store.add_device(&new_device("rpi-1", &["lab"])).unwrap();
    let before = dump(&store);

    let dup = store.add_device(&new_device("rpi-1", &[])).unwrap_err();
    assert!(matches!(dup, RegistryError::DuplicateDevice(_)), "{dup}");
    assert!(dup.to_string().contains("rpi-1"));
    assert!(store.check_new_device(&id("rpi-1")).is_err());

    let ghost = id("ghost");
    let errors = [
        store.device(&ghost).unwrap_err(),
        store.revoke(&ghost).unwrap_err(),
        store
            .set_desired(
                &ghost,
                &json!({"log_level": "debug"}).as_object().unwrap().clone(),
            )
            .unwrap_err(),
        store.mark_desired_published(&ghost, 3).unwrap_err(),
        store
            .set_certificate(
                &ghost,
                &CertInfo {
                    serial: "1".into(),
                    fingerprint_sha256: "2".into(),
                    not_after: 3,
                },
            )
            .unwrap_err(),
        store
            .add_on_connect(&ghost, Action::Reboot, &Map::new())
            .unwrap_err(),
        store.commands_for(&ghost, 10).unwrap_err(),
        store
            .devices(&Selector::Ids(vec![id("rpi-1"), ghost.clone()]))
            .unwrap_err(),
    ];
    for e in &errors {
        assert!(matches!(e, RegistryError::UnknownDevice(_)), "{e}");
        assert!(e.to_string().contains("ghost"), "{e}");
    }
    // A batch of commands where one targets an unknown device inserts none.
    let cmds = [
        NewCommand {
            id: cid("c1"),
            device: id("rpi-1"),
            action: Action::Ping,
            args: Map::new(),
            delivery: Delivery::Queued,
            requested_by: None,
            expires_at: None,
            rule_id: None,
        },
        NewCommand {
            id: cid("c2"),
            device: ghost.clone(),
            action: Action::Ping,
            args: Map::new(),
            delivery: Delivery::Queued,
            requested_by: None,
            expires_at: None,
            rule_id: None,
        },
    ];
    assert!(matches!(
        store.insert_commands(&cmds).unwrap_err(),
        RegistryError::UnknownDevice(_)
    ));
    // Invalid setting key: nothing written.
    let bad = json!({"Bad Key": 1}).as_object().unwrap().clone();
    assert!(matches!(
        store.set_desired(&id("rpi-1"), &bad).unwrap_err(),
        RegistryError::InvalidSetting { .. }
    ));
    assert!(matches!(
        store.remove_on_connect(42).unwrap_err(),
        RegistryError::UnknownRule(42)
    ));
    // Invalid ids and boards never get as far as the store.
    assert!("rpi/1".parse::<DeviceId>().is_err());
    assert!(matches!(
        "esp32".parse::<Board>().unwrap_err(),
        RegistryError::UnknownBoard { .. }
    ));
    assert_eq!(dump(&store), before);
}

#[test]
fn duplicate_command_ids_insert_nothing() {
    let (_dir, mut store) = temp_store();
    store.add_device(&new_device("a", &[])).unwrap();
    let c = |i: &str| NewCommand {
        id: cid(i),
        device: id("a"),
        action: Action::Ping,
        args: Map::new(),
        delivery: Delivery::Now,
        requested_by: Some("operator:t".into()),
        expires_at: None,
        rule_id: None,
    };
    store.insert_commands(&[c("c1")]).unwrap();
    let before = dump(&store);
    let err = store.insert_commands(&[c("c2"), c("c1")]).unwrap_err();
    assert!(matches!(err, RegistryError::DuplicateCommand(_)), "{err}");
    assert_eq!(dump(&store), before);
}

#[test]
fn status_moves_online_offline_and_provisions_once() {
    let (_dir, mut store) = temp_store();
    store.add_device(&new_device("a", &[])).unwrap();
    let r = store.apply(&[online("a", 100)]).unwrap();
    assert_eq!(r.connected, vec![id("a")]);
    let d = store.device(&id("a")).unwrap();
    assert!(d.online);
    assert_eq!(d.lifecycle, Lifecycle::Provisioned);
    assert_eq!(d.provisioned_at, Some(100));
    assert_eq!(d.last_seen, Some(100));
    assert_eq!(d.agent_version.as_deref(), Some("0.1.0"));

    // The same retained status replayed (service restart) is not a new connection.
    let r = store.apply(&[online("a", 100)]).unwrap();
    assert!(r.connected.is_empty());

    store.apply(&[offline("a", 190)]).unwrap();
    let d = store.device(&id("a")).unwrap();
    assert!(!d.online);
    assert_eq!(d.last_seen, Some(100), "a will does not count as seen");

    let r = store.apply(&[online("a", 200)]).unwrap();
    assert_eq!(r.connected, vec![id("a")]);
    let d = store.device(&id("a")).unwrap();
    assert_eq!(d.provisioned_at, Some(100));
}

#[test]
fn unknown_devices_are_reported_and_skipped() {
    let (_dir, mut store) = temp_store();
    store.add_device(&new_device("a", &[])).unwrap();
    let r = store
        .apply(&[
            telemetry("stranger", 1),
            telemetry("a", 1),
            online("stranger", 2),
        ])
        .unwrap();
    assert_eq!(r.applied, 1);
    assert_eq!(r.unknown_devices, [id("stranger")].into());
    assert_eq!(store.stats().unwrap().telemetry_rows, 1);
}

#[test]
fn telemetry_keeps_latest_and_a_bounded_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open(
        &dir.path().join("r.db"),
        Retention {
            telemetry_per_device: 5,
            ..Retention::default()
        },
    )
    .unwrap();
    store.add_device(&new_device("a", &[])).unwrap();
    store.add_device(&new_device("b", &[])).unwrap();
    for chunk in (1..=23).collect::<Vec<u64>>().chunks(4) {
        let batch: Vec<Update> = chunk
            .iter()
            .flat_map(|t| [telemetry("a", *t), telemetry("b", *t + 100)])
            .collect();
        store.apply(&batch).unwrap();
    }
    let a = store.device(&id("a")).unwrap();
    assert_eq!(a.telemetry_count, 23);
    assert_eq!(a.telemetry_at, Some(23));
    assert_eq!(a.telemetry.unwrap()["ts"], 23);
    let hist = store.telemetry_history(&id("a"), 100).unwrap();
    let ts: Vec<u64> = hist.iter().map(|r| r.ts).collect();
    assert_eq!(ts, vec![23, 22, 21, 20, 19]);
    let stats = store.stats().unwrap();
    assert_eq!(stats.telemetry_rows, 10);
    assert_eq!(stats.telemetry_received, 46);
}

#[test]
fn events_are_stored_latest_first() {
    let (_dir, mut store) = temp_store();
    store.add_device(&new_device("a", &[])).unwrap();
    let ev = |ts: u64, msg: &str| Update::Event {
        device: id("a"),
        event: Event {
            ts,
            kind: "boot".into(),
            message: msg.into(),
        },
        received_at: ts,
    };
    store.apply(&[ev(1, "first"), ev(2, "second")]).unwrap();
    let events = store.events(&id("a"), 10).unwrap();
    assert_eq!(events[0].message, "second");
    assert_eq!(events.len(), 2);
}

#[test]
fn desired_settings_merge_bump_revision_and_track_convergence() {
    let (_dir, mut store) = temp_store();
    store.add_device(&new_device("a", &[])).unwrap();
    let d1 = store
        .set_desired(
            &id("a"),
            json!({"telemetry_interval_s": 5, "log_level": "debug"})
                .as_object()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(d1.revision, 1);
    let d2 = store
        .set_desired(&id("a"), json!({"log_level": null}).as_object().unwrap())
        .unwrap();
    assert_eq!(d2.revision, 2);
    assert_eq!(
        d2.settings,
        *json!({"telemetry_interval_s": 5}).as_object().unwrap()
    );

    assert_eq!(
        store.unpublished_desired().unwrap(),
        vec![(id("a"), d2.clone())]
    );
    store.mark_desired_published(&id("a"), 2).unwrap();
    assert!(store.unpublished_desired().unwrap().is_empty());
    assert!(!store.device(&id("a")).unwrap().converged());

    store
        .apply(&[Update::Reported {
            device: id("a"),
            reported: Reported {
                revision: 2,
                applied: json!({"telemetry_interval_s": 5, "log_level": "info"})
                    .as_object()
                    .unwrap()
                    .clone(),
                ignored: Map::new(),
                ts: 50,
            },
            received_at: 50,
        }])
        .unwrap();
    let d = store.device(&id("a")).unwrap();
    assert_eq!(d.reported.as_ref().unwrap().revision, 2);
    assert!(d.converged());
}

#[test]
fn queued_commands_wait_for_online_and_results_are_recorded() {
    let (_dir, mut store) = temp_store();
    store.add_device(&new_device("a", &[])).unwrap();
    store
        .insert_commands(&[NewCommand {
            id: cid("q1"),
            device: id("a"),
            action: Action::Inventory,
            args: Map::new(),
            delivery: Delivery::Queued,
            requested_by: Some("operator:t".into()),
            expires_at: None,
            rule_id: None,
        }])
        .unwrap();
    assert!(
        store.deliverable_queued().unwrap().is_empty(),
        "device offline"
    );
    assert_eq!(store.queued_for(&id("a")).unwrap().len(), 1);
    store.apply(&[online("a", 10)]).unwrap();
    let q = store.deliverable_queued().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].state, CommandState::Queued);
    store.mark_sent(&[cid("q1")], 11).unwrap();
    assert!(store.deliverable_queued().unwrap().is_empty());

    let result = |status, output: Option<Value>| Update::CommandResult {
        device: id("a"),
        result: CommandResult {
            id: cid("q1"),
            status,
            reason: None,
            output,
            ts: 12,
        },
        received_at: 12,
    };
    store
        .apply(&[
            result(CommandStatus::Accepted, None),
            result(
                CommandStatus::Succeeded,
                Some(json!({"agent_version": "0.1.0", "kernel": "6.1"})),
            ),
            // A late duplicate must not turn a final state back.
            result(CommandStatus::Accepted, None),
        ])
        .unwrap();
    let c = store.command(&cid("q1")).unwrap();
    assert_eq!(c.state, CommandState::Succeeded);
    assert_eq!(c.sent_at, Some(11));
    assert_eq!(c.accepted_at, Some(12));
    assert_eq!(c.finished_at, Some(12));
    let d = store.device(&id("a")).unwrap();
    assert_eq!(d.inventory.unwrap()["kernel"], "6.1");
}

#[test]
fn commands_seen_on_the_wire_and_orphan_results_enter_the_log() {
    let (_dir, mut store) = temp_store();
    store.add_device(&new_device("a", &[])).unwrap();
    let seen = Update::CommandSeen {
        device: id("a"),
        command: Command {
            id: cid("w1"),
            action: Action::Ping,
            args: Map::new(),
            expires_at: None,
        },
        received_at: 5,
    };
    let orphan = Update::CommandResult {
        device: id("a"),
        result: CommandResult {
            id: cid("o1"),
            status: CommandStatus::Rejected,
            reason: Some("unknown action".into()),
            output: None,
            ts: 6,
        },
        received_at: 6,
    };
    store.apply(&[seen, orphan]).unwrap();
    assert_eq!(
        store.command(&cid("w1")).unwrap().action.as_deref(),
        Some("ping")
    );
    let o = store.command(&cid("o1")).unwrap();
    assert_eq!(o.state, CommandState::Rejected);
    assert_eq!(o.action, None);
    assert_eq!(o.reason.as_deref(), Some("unknown action"));
    assert_eq!(store.commands_for(&id("a"), 10).unwrap().len(), 2);
}

#[test]
fn revoke_marks_device_drops_queue_and_rules_and_is_not_repeatable() {
    let (_dir, mut store) = temp_store();
    store.add_device(&new_device("a", &[])).unwrap();
    store
        .add_on_connect(&id("a"), Action::Reboot, &Map::new())
        .unwrap();
    store
        .insert_commands(&[NewCommand {
            id: cid("q1"),
            device: id("a"),
            action: Action::Ping,
            args: Map::new(),
            delivery: Delivery::Queued,
            requested_by: None,
            expires_at: None,
            rule_id: None,
        }])
        .unwrap();
    let d = store.revoke(&id("a")).unwrap();
    assert_eq!(d.lifecycle, Lifecycle::Revoked);
    assert!(d.revoked_at.is_some());
    assert_eq!(
        store.command(&cid("q1")).unwrap().state,
        CommandState::Rejected
    );
    assert!(store.on_connect_rules(&id("a")).unwrap().is_empty());
    let before = dump(&store);
    assert!(matches!(
        store.revoke(&id("a")).unwrap_err(),
        RegistryError::Revoked(_)
    ));
    assert!(matches!(
        store
            .set_desired(&id("a"), json!({"log_level": "info"}).as_object().unwrap())
            .unwrap_err(),
        RegistryError::Revoked(_)
    ));
    assert_eq!(dump(&store), before);
}

#[test]
fn selectors_by_tag_and_all() {
    let (_dir, mut store) = temp_store();
    store.add_device(&new_device("b", &["lab"])).unwrap();
    store.add_device(&new_device("a", &["lab", "eu"])).unwrap();
    store.add_device(&new_device("c", &[])).unwrap();
    let ids = |sel| -> Vec<String> {
        store
            .devices(&sel)
            .unwrap()
            .into_iter()
            .map(|d| d.id.to_string())
            .collect()
    };
    assert_eq!(ids(Selector::All), ["a", "b", "c"]);
    assert_eq!(ids(Selector::Tag("lab".parse().unwrap())), ["a", "b"]);
    assert_eq!(
        ids(Selector::Tag("none".parse().unwrap())),
        Vec::<String>::new()
    );
}

#[test]
fn on_connect_rules_round_trip() {
    let (_dir, mut store) = temp_store();
    store.add_device(&new_device("a", &[])).unwrap();
    let rule = store
        .add_on_connect(
            &id("a"),
            Action::Inventory,
            json!({"x": 1}).as_object().unwrap(),
        )
        .unwrap();
    assert_eq!(
        store.on_connect_rules(&id("a")).unwrap(),
        vec![rule.clone()]
    );
    store.remove_on_connect(rule.id).unwrap();
    assert!(store.on_connect_rules(&id("a")).unwrap().is_empty());
}

#[test]
fn two_connections_share_the_file() {
    let (dir, mut writer) = temp_store();
    let reader = SqliteStore::open(&dir.path().join("registry.db"), Retention::default()).unwrap();
    writer.add_device(&new_device("a", &[])).unwrap();
    writer.apply(&[telemetry("a", 1)]).unwrap();
    assert_eq!(reader.device(&id("a")).unwrap().telemetry_count, 1);
}
