//! The backend conformance suite: every behaviour of [`Store`], written once
//! against the trait. Each backend runs all of it through
//! [`conformance_tests!`](crate::conformance_tests) with a [`Fixture`] that
//! hands out stores on one fresh, empty registry (the SQLite run and the
//! run on a real PostgreSQL are in `tests/tests/registry_conformance.rs`).
//! A check that is added here runs on every backend, because the macro
//! lists every check.

#![allow(clippy::missing_panics_doc)]

use std::collections::BTreeSet;

use edgebind_protocol::messages::{
    Command, CommandResult, CommandStatus, Event, Presence, Reported, Status,
};
use edgebind_protocol::{CommandId, DeviceId, UnitSerial};
use serde_json::{Map, Value, json};

use super::*;

/// One fresh registry of one backend.
pub trait Fixture {
    /// Another store on the same registry (a second process, in effect).
    fn open(&self, retention: Retention) -> Box<dyn Store>;
}

/// Runs every check of this module as a `#[test]` of the calling module:
/// `conformance_tests!(|| MyFixture::new());`
#[macro_export]
macro_rules! conformance_tests {
    ($fixture:expr) => {
        $crate::conformance_tests!(@each $fixture;
            add_and_read_back_a_device,
            bad_inputs_are_clear_errors_and_change_nothing,
            duplicate_command_ids_insert_nothing,
            status_moves_online_offline_and_provisions_once,
            connects_and_disconnects_are_kept_in_the_presence_history,
            unknown_devices_are_reported_and_skipped,
            telemetry_keeps_latest_and_a_bounded_history,
            events_are_stored_latest_first,
            desired_settings_merge_bump_revision_and_track_convergence,
            queued_commands_wait_for_online_and_results_are_recorded,
            commands_seen_on_the_wire_and_orphan_results_enter_the_log,
            revoke_marks_device_drops_queue_and_rules_and_is_not_repeatable,
            selectors_by_tag_and_all,
            on_connect_rules_round_trip,
            two_stores_share_one_registry,
            a_batch_of_devices_is_added_whole_or_not_at_all,
            listing_pages_by_id_without_gaps_or_repeats,
            listing_filters_by_tag_state_presence_and_text,
            listing_refuses_an_empty_or_huge_page,
            a_final_result_survives_a_duplicate_delivery_in_a_later_batch,
            a_revocation_is_not_undone_by_a_concurrent_batch_writer,
            service_presence_is_recorded_per_service_and_replaced,
            a_redelivered_batch_stores_nothing_twice,
            a_connection_queues_its_commands_exactly_once,
            a_claim_belongs_to_one_holder_until_it_expires,
            a_manufactured_unit_is_recorded_with_its_device_or_not_at_all,
            a_reissue_replaces_certificate_and_record_together,
            an_import_merges_once_and_a_conflict_imports_nothing,
            an_allow_list_belongs_to_one_batch_and_is_added_whole_or_not_at_all,
            a_serial_is_provisioned_once_with_its_device,
            two_stores_racing_to_provision_one_serial_register_it_once,
            a_login_code_logs_in_once_and_not_after_it_expires,
            the_audit_log_keeps_every_entry_in_order_and_pages_back,
            the_overview_counts_states_expiring_certificates_and_pending_settings,
            renewals_keep_the_certificate_history_in_order,
            a_renewal_of_a_revoked_or_unknown_device_records_nothing,
            an_expired_unit_reprovisions_under_its_serial_and_nothing_else_does,
        );
    };
    (@each $fixture:expr; $($check:ident),+ $(,)?) => {
        $(
            #[test]
            fn $check() {
                let fixture = ($fixture)();
                $crate::registry::conformance::$check(&fixture);
            }
        )+
    };
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn cid(s: &str) -> CommandId {
    CommandId::new(s).unwrap()
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

/// Everything the trait can read back, to prove that a failed call changed nothing.
fn snapshot(store: &dyn Store) -> Vec<String> {
    let mut out = Vec::new();
    for d in store.devices(&Selector::All).unwrap() {
        out.push(format!("{d:?}"));
        out.push(format!("{:?}", store.commands_for(&d.id, 10_000).unwrap()));
        out.push(format!("{:?}", store.on_connect_rules(&d.id).unwrap()));
        out.push(format!(
            "{:?}",
            store.telemetry_history(&d.id, 10_000).unwrap()
        ));
        out.push(format!("{:?}", store.events(&d.id, 10_000).unwrap()));
    }
    let s = store.stats().unwrap();
    out.push(format!(
        "{} {} {} {} {}",
        s.devices, s.telemetry_rows, s.telemetry_received, s.events, s.commands
    ));
    out
}

fn online(device: &str, ts: u64) -> Update {
    Update::Status {
        device: id(device),
        status: Status {
            state: Presence::Online,
            session: None,
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

fn ids(devices: &[Device]) -> Vec<String> {
    devices.iter().map(|d| d.id.to_string()).collect()
}

pub fn two_stores_share_one_registry(registry: &dyn Fixture) {
    let mut writer = registry.open(Retention::default());
    let reader = registry.open(Retention::default());
    writer.add_device(&new_device("a", &[])).unwrap();
    writer.apply(&[telemetry("a", 1)]).unwrap();
    assert_eq!(reader.device(&id("a")).unwrap().telemetry_count, 1);
    // A device added by one is a duplicate for the other.
    assert!(matches!(
        reader.check_new_device(&id("a")).unwrap_err(),
        RegistryError::DuplicateDevice(_)
    ));
}

pub fn a_batch_of_devices_is_added_whole_or_not_at_all(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    let batch: Vec<NewDevice> = (0..250)
        .map(|i| new_device(&format!("dev-{i:04}"), &["factory"]))
        .collect();
    store.add_devices(&batch).unwrap();
    assert_eq!(store.stats().unwrap().devices, 250);
    let before = snapshot(store.as_ref());
    let clash = vec![new_device("new-1", &[]), new_device("dev-0100", &[])];
    assert!(matches!(
        store.add_devices(&clash).unwrap_err(),
        RegistryError::DuplicateDevice(d) if d.as_str() == "dev-0100"
    ));
    let twice = vec![new_device("new-2", &[]), new_device("new-2", &[])];
    assert!(matches!(
        store.add_devices(&twice).unwrap_err(),
        RegistryError::DuplicateDevice(_)
    ));
    assert_eq!(snapshot(store.as_ref()), before);
    let d = store.device(&id("dev-0249")).unwrap();
    assert_eq!(d.tags, ["factory".parse().unwrap()].into());
    assert_eq!(d.cert.unwrap().serial, "0a1b");
}

pub fn listing_pages_by_id_without_gaps_or_repeats(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    // Ids whose byte order differs from a locale's order ('-' vs '.' vs '_' vs digits).
    let names: Vec<String> = (0..23)
        .map(|i| format!("d{}{i:02}", ["-", ".", "_", "0", "a"][i % 5]))
        .collect();
    let batch: Vec<NewDevice> = names.iter().map(|n| new_device(n, &[])).collect();
    store.add_devices(&batch).unwrap();
    let mut expected = names.clone();
    expected.sort();
    let mut seen = Vec::new();
    let mut query = DeviceQuery {
        limit: 5,
        ..DeviceQuery::default()
    };
    let mut pages = 0;
    loop {
        let page = store.list_devices(&query).unwrap();
        pages += 1;
        assert!(page.devices.len() <= 5);
        seen.extend(ids(&page.devices));
        match page.next_after {
            Some(after) => query.after = Some(after),
            None => break,
        }
    }
    assert_eq!(seen, expected, "byte order, every device once");
    assert_eq!(pages, 5);
    // Exactly a full last page says there is nothing more.
    let all = store
        .list_devices(&DeviceQuery {
            limit: 23,
            ..DeviceQuery::default()
        })
        .unwrap();
    assert_eq!(all.devices.len(), 23);
    assert_eq!(all.next_after, None);
}

pub fn listing_filters_by_tag_state_presence_and_text(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&new_device("lab-1", &["lab"])).unwrap();
    store
        .add_device(&new_device("lab-2", &["lab", "eu"]))
        .unwrap();
    store.add_device(&new_device("field_1", &["eu"])).unwrap();
    store.add_device(&new_device("field-2", &[])).unwrap();
    store
        .apply(&[
            online("lab-1", 10),
            online("field_1", 10),
            offline("field_1", 20),
        ])
        .unwrap();
    store.revoke(&id("field-2")).unwrap();
    let list = |q: DeviceQuery| ids(&store.list_devices(&q).unwrap().devices);
    let q = DeviceQuery::default;
    assert_eq!(
        list(DeviceQuery {
            tag: Some("lab".parse().unwrap()),
            ..q()
        }),
        ["lab-1", "lab-2"]
    );
    assert_eq!(
        list(DeviceQuery {
            online: Some(true),
            ..q()
        }),
        ["lab-1"]
    );
    assert_eq!(
        list(DeviceQuery {
            lifecycle: Some(Lifecycle::Provisioned),
            online: Some(false),
            ..q()
        }),
        ["field_1"]
    );
    assert_eq!(
        list(DeviceQuery {
            lifecycle: Some(Lifecycle::Registered),
            ..q()
        }),
        ["lab-2"]
    );
    assert_eq!(
        list(DeviceQuery {
            lifecycle: Some(Lifecycle::Revoked),
            ..q()
        }),
        ["field-2"]
    );
    // Text is matched as typed: '_' is not a wildcard.
    assert_eq!(
        list(DeviceQuery {
            search: Some("_".into()),
            ..q()
        }),
        ["field_1"]
    );
    assert_eq!(
        list(DeviceQuery {
            search: Some("ab-".into()),
            tag: Some("eu".parse().unwrap()),
            ..q()
        }),
        ["lab-2"]
    );
    assert!(
        list(DeviceQuery {
            search: Some("%".into()),
            ..q()
        })
        .is_empty()
    );
    assert_eq!(
        list(DeviceQuery {
            after: Some(id("field_1")),
            ..q()
        }),
        ["lab-1", "lab-2"]
    );
}

pub fn listing_refuses_an_empty_or_huge_page(registry: &dyn Fixture) {
    let store = registry.open(Retention::default());
    for limit in [0, MAX_PAGE + 1] {
        let err = store
            .list_devices(&DeviceQuery {
                limit,
                ..DeviceQuery::default()
            })
            .unwrap_err();
        assert!(matches!(err, RegistryError::InvalidQuery(_)), "{err}");
    }
}

/// The batch writer decides on the state it loaded; a revocation committed
/// by another process meanwhile must not be overwritten by that decision.
pub fn a_revocation_is_not_undone_by_a_concurrent_batch_writer(registry: &dyn Fixture) {
    let mut writer = registry.open(Retention::default());
    let mut operator = registry.open(Retention::default());
    writer.add_device(&new_device("a", &[])).unwrap();
    let batches = 200u64;
    let ingest = std::thread::spawn(move || {
        for i in 1..=batches {
            writer
                .apply(&[online("a", i), telemetry("a", i), offline("a", i)])
                .unwrap();
        }
        writer
    });
    // Revoke while batches are being written.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while operator.device(&id("a")).unwrap().telemetry_count < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer made no progress"
        );
        std::thread::yield_now();
    }
    operator.revoke(&id("a")).unwrap();
    let writer = ingest.join().unwrap();
    let d = writer.device(&id("a")).unwrap();
    assert_eq!(d.telemetry_count, batches, "every batch committed");
    assert_eq!(d.lifecycle, Lifecycle::Revoked);
    assert!(d.revoked_at.is_some());
}

pub fn a_final_result_survives_a_duplicate_delivery_in_a_later_batch(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&new_device("a", &[])).unwrap();
    store.add_device(&new_device("b", &[])).unwrap();
    store
        .insert_commands(&[NewCommand {
            id: cid("r1"),
            device: id("a"),
            action: edgebind_protocol::actions::REBOOT,
            args: Map::new(),
            delivery: Delivery::Now,
            requested_by: None,
            expires_at: None,
            rule_id: None,
        }])
        .unwrap();
    let result = |device: &str, status, at| Update::CommandResult {
        device: id(device),
        result: CommandResult {
            id: cid("r1"),
            status,
            reason: None,
            output: None,
            facts: false,
            ts: at,
        },
        received_at: at,
    };
    store
        .apply(&[result("a", CommandStatus::Failed, 5)])
        .unwrap();
    store
        .apply(&[
            result("a", CommandStatus::Succeeded, 6),
            result("a", CommandStatus::Accepted, 7),
            // Another device cannot finish someone else's command.
            result("b", CommandStatus::Succeeded, 8),
        ])
        .unwrap();
    let c = store.command(&cid("r1")).unwrap();
    assert_eq!(c.state, CommandState::Failed);
    assert_eq!(c.finished_at, Some(5));
    assert_eq!(c.device, id("a"));
}

pub fn add_and_read_back_a_device(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
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

pub fn bad_inputs_are_clear_errors_and_change_nothing(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&new_device("rpi-1", &["lab"])).unwrap();
    let before = snapshot(store.as_ref());

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
            .add_on_connect(&ghost, edgebind_protocol::actions::REBOOT, &Map::new())
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
            action: edgebind_protocol::actions::PING,
            args: Map::new(),
            delivery: Delivery::Queued,
            requested_by: None,
            expires_at: None,
            rule_id: None,
        },
        NewCommand {
            id: cid("c2"),
            device: ghost.clone(),
            action: edgebind_protocol::actions::PING,
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
    assert_eq!(snapshot(store.as_ref()), before);
}

pub fn duplicate_command_ids_insert_nothing(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&new_device("a", &[])).unwrap();
    let c = |i: &str| NewCommand {
        id: cid(i),
        device: id("a"),
        action: edgebind_protocol::actions::PING,
        args: Map::new(),
        delivery: Delivery::Now,
        requested_by: Some("operator:t".into()),
        expires_at: None,
        rule_id: None,
    };
    store.insert_commands(&[c("c1")]).unwrap();
    let before = snapshot(store.as_ref());
    let err = store.insert_commands(&[c("c2"), c("c1")]).unwrap_err();
    assert!(matches!(err, RegistryError::DuplicateCommand(_)), "{err}");
    assert_eq!(snapshot(store.as_ref()), before);
}

pub fn status_moves_online_offline_and_provisions_once(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
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

pub fn connects_and_disconnects_are_kept_in_the_presence_history(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&new_device("a", &[])).unwrap();
    store.add_device(&new_device("b", &[])).unwrap();
    assert!(store.presence_history(&id("a"), 10).unwrap().is_empty());
    // A connection, its retained status replayed, a telemetry sample, the
    // last will delivered twice, a new connection; b's in the same batches.
    store
        .apply(&[online("a", 100), online("b", 101), telemetry("a", 102)])
        .unwrap();
    store.apply(&[online("a", 100)]).unwrap();
    store
        .apply(&[offline("a", 150), offline("a", 151), offline("b", 152)])
        .unwrap();
    store.apply(&[online("a", 200)]).unwrap();
    let change = |at, online| PresenceChange { at, online };
    assert_eq!(
        store.presence_history(&id("a"), 10).unwrap(),
        vec![change(200, true), change(150, false), change(100, true)],
        "latest first, each change once"
    );
    assert_eq!(
        store.presence_history(&id("a"), 1).unwrap(),
        vec![change(200, true)]
    );
    assert_eq!(
        store.presence_history(&id("b"), 10).unwrap(),
        vec![change(152, false), change(101, true)]
    );
    assert!(matches!(
        store.presence_history(&id("nope"), 10),
        Err(RegistryError::UnknownDevice(_))
    ));

    // Only the newest PRESENCE_PER_DEVICE are kept.
    let flaps: Vec<Update> = (0..PRESENCE_PER_DEVICE as u64)
        .flat_map(|i| [online("b", 1_000 + 2 * i), offline("b", 1_001 + 2 * i)])
        .collect();
    store.apply(&flaps).unwrap();
    let kept = store.presence_history(&id("b"), 10_000).unwrap();
    assert_eq!(kept.len(), PRESENCE_PER_DEVICE as usize);
    assert_eq!(
        kept[0],
        change(1_001 + 2 * (PRESENCE_PER_DEVICE as u64 - 1), false)
    );
}

pub fn unknown_devices_are_reported_and_skipped(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
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

pub fn telemetry_keeps_latest_and_a_bounded_history(registry: &dyn Fixture) {
    let mut store = registry.open(Retention {
        telemetry_per_device: 5,
        ..Retention::default()
    });
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

pub fn events_are_stored_latest_first(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
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

pub fn desired_settings_merge_bump_revision_and_track_convergence(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
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

pub fn queued_commands_wait_for_online_and_results_are_recorded(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&new_device("a", &[])).unwrap();
    store
        .insert_commands(&[NewCommand {
            id: cid("q1"),
            device: id("a"),
            action: edgebind_protocol::actions::INVENTORY,
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
            // An inventory answer is the device's facts.
            facts: output.is_some(),
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

pub fn commands_seen_on_the_wire_and_orphan_results_enter_the_log(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&new_device("a", &[])).unwrap();
    let seen = Update::CommandSeen {
        device: id("a"),
        command: Command {
            id: cid("w1"),
            action: edgebind_protocol::actions::PING,
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
            facts: false,
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

pub fn revoke_marks_device_drops_queue_and_rules_and_is_not_repeatable(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&new_device("a", &[])).unwrap();
    store
        .add_on_connect(&id("a"), edgebind_protocol::actions::REBOOT, &Map::new())
        .unwrap();
    store
        .insert_commands(&[NewCommand {
            id: cid("q1"),
            device: id("a"),
            action: edgebind_protocol::actions::PING,
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
    let before = snapshot(store.as_ref());
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
    assert_eq!(snapshot(store.as_ref()), before);
}

pub fn selectors_by_tag_and_all(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
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

pub fn on_connect_rules_round_trip(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&new_device("a", &[])).unwrap();
    let rule = store
        .add_on_connect(
            &id("a"),
            edgebind_protocol::actions::INVENTORY,
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

pub fn service_presence_is_recorded_per_service_and_replaced(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    assert!(store.services().unwrap().is_empty());
    let up = ServicePresence {
        name: "fleet".into(),
        connected: true,
        since: 100,
        seen_at: 130,
        broker_dropped: Some(96_284),
        lag: 1200,
        broker_waiting: Some(54_000),
        oldest_uncommitted_s: Some(7),
        push_back: true,
    };
    store.record_service(&up).unwrap();
    store
        .record_service(&ServicePresence {
            name: "fleet-2".into(),
            connected: false,
            since: 90,
            seen_at: 90,
            broker_dropped: None,
            lag: 0,
            broker_waiting: None,
            oldest_uncommitted_s: None,
            push_back: false,
        })
        .unwrap();
    let down = ServicePresence {
        connected: false,
        since: 140,
        seen_at: 140,
        ..up.clone()
    };
    store.record_service(&down).unwrap();
    let other = registry.open(Retention::default());
    let got = other.services().unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], down);
    assert_eq!(got[1].name, "fleet-2");
    assert_eq!((got[1].broker_dropped, got[1].lag), (None, 0));
    assert_eq!(
        (
            got[1].broker_waiting,
            got[1].oldest_uncommitted_s,
            got[1].push_back
        ),
        (None, None, false)
    );
}

pub fn a_redelivered_batch_stores_nothing_twice(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&new_device("a", &[])).unwrap();
    store.add_device(&new_device("b", &[])).unwrap();
    let ev = |ts: u64, msg: &str| Update::Event {
        device: id("a"),
        event: Event {
            ts,
            kind: "boot".into(),
            message: msg.into(),
        },
        received_at: ts,
    };
    let first: Vec<Update> = (1..=5)
        .map(|t| telemetry("a", t))
        .chain([telemetry("b", 1), ev(1, "up")])
        .collect();
    let report = store.apply(&first).unwrap();
    assert_eq!(report.duplicates, 0);
    // The same messages again (a crash before the acknowledgement), mixed
    // with new ones and with a repeat inside the batch itself.
    let mut again = first.clone();
    again.extend([
        telemetry("a", 6),
        telemetry("a", 6),
        ev(2, "up"),
        ev(1, "up"),
    ]);
    let report = store.apply(&again).unwrap();
    assert_eq!(report.duplicates, 7 + 1 + 1, "{report:?}");
    assert_eq!(
        (report.duplicate_telemetry, report.duplicate_events),
        (7, 2),
        "{report:?}"
    );
    let a = store.device(&id("a")).unwrap();
    assert_eq!(a.telemetry_count, 6);
    assert_eq!(a.telemetry_at, Some(6));
    let ts: Vec<u64> = store
        .telemetry_history(&id("a"), 100)
        .unwrap()
        .iter()
        .map(|r| r.ts)
        .collect();
    assert_eq!(ts, vec![6, 5, 4, 3, 2, 1]);
    assert_eq!(store.events(&id("a"), 10).unwrap().len(), 2);
    let stats = store.stats().unwrap();
    assert_eq!((stats.telemetry_rows, stats.telemetry_received), (7, 7));
    // A different sample with the same timestamp is a different message.
    let other = Update::Telemetry {
        device: id("a"),
        ts: 6,
        payload: json!({"ts": 6, "cpu_pct": 99.0}).to_string(),
        received_at: 6,
    };
    assert_eq!(store.apply(&[other]).unwrap().duplicates, 0);
    assert_eq!(store.device(&id("a")).unwrap().telemetry_count, 7);
}

pub fn a_connection_queues_its_commands_exactly_once(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&new_device("a", &[])).unwrap();
    store
        .add_on_connect(&id("a"), edgebind_protocol::actions::PING, &Map::new())
        .unwrap();
    let policy = ConnectPolicy {
        inventory: true,
        requested_by: Some("service:fleet".into()),
    };
    let report = store.apply_with(&[online("a", 100)], &policy).unwrap();
    assert_eq!(report.queued_on_connect, 2);
    let queued = store.queued_for(&id("a")).unwrap();
    let actions: BTreeSet<_> = queued.iter().map(|c| c.action.clone().unwrap()).collect();
    assert_eq!(
        actions,
        ["inventory".to_string(), "ping".to_string()].into()
    );
    assert!(queued.iter().all(|c| c.state == CommandState::Queued));

    // The same `online` again, from another store (a second service
    // instance, or a redelivery after a crash): nothing more.
    let mut other = registry.open(Retention::default());
    let report = other.apply_with(&[online("a", 100)], &policy).unwrap();
    assert_eq!(report.queued_on_connect, 0);
    assert_eq!(store.commands_for(&id("a"), 100).unwrap().len(), 2);
    // Even after the device dropped and the old message arrives late.
    other.apply_with(&[offline("a", 150)], &policy).unwrap();
    other.apply_with(&[online("a", 100)], &policy).unwrap();
    assert_eq!(store.commands_for(&id("a"), 100).unwrap().len(), 2);

    // A new connection is new work.
    let report = store.apply_with(&[online("a", 200)], &policy).unwrap();
    assert_eq!(report.queued_on_connect, 2);
    assert_eq!(store.commands_for(&id("a"), 100).unwrap().len(), 4);

    // A revoked device is asked nothing.
    store.revoke(&id("a")).unwrap();
    let report = store.apply_with(&[online("a", 300)], &policy).unwrap();
    assert_eq!(report.queued_on_connect, 0);
}

pub fn a_claim_belongs_to_one_holder_until_it_expires(registry: &dyn Fixture) {
    let mut a = registry.open(Retention::default());
    let mut b = registry.open(Retention::default());
    assert!(a.claim("cmd/x", "service:fleet", 1).unwrap());
    assert!(!b.claim("cmd/x", "service:fleet-2", 1).unwrap());
    assert!(
        a.claim("cmd/x", "service:fleet", 1).unwrap(),
        "the holder renews"
    );
    assert!(
        b.claim("cmd/y", "service:fleet-2", 60).unwrap(),
        "another item is free"
    );
    // After the claim expires (ttl 1 s, whole seconds) the other takes it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !b.claim("cmd/x", "service:fleet-2", 60).unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "the claim never expired"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!a.claim("cmd/x", "service:fleet", 60).unwrap());
}

fn unit_record(serial: &str, device: &str, cert: &str) -> ManufacturingRecord {
    ManufacturingRecord {
        serial: serial.into(),
        device: id(device),
        cert_serial: cert.into(),
        cert_fingerprint_sha256: format!("{cert}-fp"),
        station: "line-1".into(),
        operator: "alice".into(),
        made_at: 1_700_000_000,
        image_sha256: Some("ab".repeat(32)),
    }
}

fn unit_device(device: &str, cert: &str) -> NewDevice {
    NewDevice {
        cert: Some(CertInfo {
            serial: cert.into(),
            fingerprint_sha256: format!("{cert}-fp"),
            not_after: 2_000_000_000,
        }),
        ..new_device(device, &["factory"])
    }
}

/// Everything including the manufacturing records.
fn full_snapshot(store: &dyn Store) -> (Vec<String>, Vec<ManufacturingRecord>) {
    (snapshot(store), store.manufacturing_records().unwrap())
}

pub fn a_manufactured_unit_is_recorded_with_its_device_or_not_at_all(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    let rec = unit_record("SN-001", "sn-001", "c1");
    let dev = store
        .add_manufactured(&unit_device("sn-001", "c1"), &rec)
        .unwrap();
    assert_eq!(dev.lifecycle, Lifecycle::Registered);
    assert_eq!(dev.cert.unwrap().serial, "c1");
    assert_eq!(
        store.manufacturing_record("SN-001").unwrap(),
        Some(rec.clone())
    );
    assert_eq!(store.manufacturing_record("SN-999").unwrap(), None);
    // A second store (another process) sees it.
    let other = registry.open(Retention::default());
    assert_eq!(other.manufacturing_records().unwrap(), vec![rec.clone()]);

    let before = full_snapshot(store.as_ref());
    // The same serial again, even with another device: refused.
    let err = store
        .add_manufactured(
            &unit_device("sn-001-b", "c2"),
            &unit_record("SN-001", "sn-001-b", "c2"),
        )
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::DuplicateUnit { serial, device } if serial == "SN-001" && device.as_str() == "sn-001"),
        "{err}"
    );
    // Another serial with a taken id: refused, no record written.
    let err = store
        .add_manufactured(
            &unit_device("sn-001", "c3"),
            &unit_record("SN-002", "sn-001", "c3"),
        )
        .unwrap_err();
    assert!(matches!(err, RegistryError::DuplicateDevice(_)), "{err}");
    // A revoked id is refused as revoked.
    store.add_device(&new_device("gone", &[])).unwrap();
    store.revoke(&id("gone")).unwrap();
    let before_revoked = full_snapshot(store.as_ref());
    let err = store
        .add_manufactured(
            &unit_device("gone", "c4"),
            &unit_record("SN-003", "gone", "c4"),
        )
        .unwrap_err();
    assert!(matches!(err, RegistryError::Revoked(_)), "{err}");
    assert_eq!(full_snapshot(store.as_ref()), before_revoked);
    assert_eq!(before.1, store.manufacturing_records().unwrap());
    // Listing is by serial.
    store
        .add_manufactured(&unit_device("a-0", "c5"), &unit_record("AAA", "a-0", "c5"))
        .unwrap();
    let serials: Vec<String> = store
        .manufacturing_records()
        .unwrap()
        .into_iter()
        .map(|r| r.serial)
        .collect();
    assert_eq!(serials, ["AAA", "SN-001"]);
}

pub fn a_reissue_replaces_certificate_and_record_together(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store
        .add_manufactured(&unit_device("u-1", "c1"), &unit_record("U1", "u-1", "c1"))
        .unwrap();
    let again = ManufacturingRecord {
        made_at: 1_700_000_100,
        ..unit_record("U1", "u-1", "c9")
    };
    let cert = unit_device("u-1", "c9").cert.unwrap();
    store.record_reissue(&again, &cert).unwrap();
    assert_eq!(store.device(&id("u-1")).unwrap().cert, Some(cert.clone()));
    assert_eq!(store.manufacturing_records().unwrap(), vec![again.clone()]);

    let before = full_snapshot(store.as_ref());
    let err = store
        .record_reissue(&unit_record("U2", "u-1", "c8"), &cert)
        .unwrap_err();
    assert!(matches!(err, RegistryError::UnknownUnit(_)), "{err}");
    assert_eq!(full_snapshot(store.as_ref()), before);
    store.add_device(&new_device("u-2", &[])).unwrap();
    let before = full_snapshot(store.as_ref());
    let err = store
        .record_reissue(&unit_record("U1", "u-2", "c8"), &cert)
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::ManufacturingConflict { .. }),
        "{err}"
    );
    assert_eq!(full_snapshot(store.as_ref()), before);
    store.revoke(&id("u-1")).unwrap();
    let before = full_snapshot(store.as_ref());
    let err = store
        .record_reissue(&unit_record("U1", "u-1", "c7"), &cert)
        .unwrap_err();
    assert!(matches!(err, RegistryError::Revoked(_)), "{err}");
    assert_eq!(full_snapshot(store.as_ref()), before);
}

pub fn an_import_merges_once_and_a_conflict_imports_nothing(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    let units: Vec<(NewDevice, ManufacturingRecord)> = (0..3)
        .map(|i| {
            let d = format!("unit-{i}");
            let c = format!("c{i}");
            (unit_device(&d, &c), unit_record(&format!("S{i}"), &d, &c))
        })
        .collect();
    // unit-2 is already registered here with the same certificate.
    store.add_device(&units[2].0).unwrap();
    let report = store.import_manufactured(&units).unwrap();
    assert_eq!(report.added, ["S0", "S1"]);
    assert_eq!(report.recorded, ["S2"]);
    assert!(report.unchanged.is_empty());
    assert_eq!(store.manufacturing_records().unwrap().len(), 3);
    assert_eq!(
        store.device(&id("unit-1")).unwrap().tags,
        ["factory".parse().unwrap()].into()
    );
    // Again: nothing changes.
    let before = full_snapshot(store.as_ref());
    let report = store.import_manufactured(&units).unwrap();
    assert_eq!(report.unchanged, ["S0", "S1", "S2"]);
    assert_eq!(full_snapshot(store.as_ref()), before);

    // A new unit and a conflicting one in one import: neither is imported.
    let fresh = (
        unit_device("unit-9", "c9"),
        unit_record("S9", "unit-9", "c9"),
    );
    let reissued = (
        unit_device("unit-1", "cx"),
        unit_record("S1", "unit-1", "cx"),
    );
    let err = store
        .import_manufactured(&[fresh.clone(), reissued])
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::ManufacturingConflict { serial, .. } if serial == "S1"),
        "{err}"
    );
    assert!(err.to_string().contains("certificate"), "{err}");
    assert_eq!(full_snapshot(store.as_ref()), before);
    // A device registered here with another certificate, under a new serial.
    let taken = (
        unit_device("unit-0", "cz"),
        unit_record("S7", "unit-0", "cz"),
    );
    let err = store
        .import_manufactured(&[fresh.clone(), taken])
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::ManufacturingConflict { serial, .. } if serial == "S7"),
        "{err}"
    );
    // The same device under two serials.
    let moved = (
        unit_device("unit-0", "c0"),
        unit_record("S8", "unit-0", "c0"),
    );
    let err = store.import_manufactured(&[moved]).unwrap_err();
    assert!(err.to_string().contains("\"S0\""), "{err}");
    // Twice in one import.
    let err = store
        .import_manufactured(&[fresh.clone(), fresh.clone()])
        .unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    assert_eq!(full_snapshot(store.as_ref()), before);
}

fn sn(s: &str) -> UnitSerial {
    UnitSerial::new(s).unwrap()
}

fn unit(device: &str, key: &str) -> ProvisionedUnit {
    ProvisionedUnit {
        device: id(device),
        key_sha256: key.to_owned(),
        chain_pem: format!("chain of {device}"),
        at: 1_700_000_000,
    }
}

pub fn an_allow_list_belongs_to_one_batch_and_is_added_whole_or_not_at_all(registry: &dyn Fixture) {
    let mut s = registry.open(Retention::default());
    let report = s
        .allow_serials(&id("line-1"), &[sn("SN-1"), sn("SN-2"), sn("SN-1")])
        .unwrap();
    assert_eq!(report.added, [sn("SN-1"), sn("SN-2")]);
    let again = s
        .allow_serials(&id("line-1"), &[sn("SN-2"), sn("SN-3")])
        .unwrap();
    assert_eq!(again.added, [sn("SN-3")]);
    assert_eq!(again.already, [sn("SN-2")]);
    // A serial on another batch's list fails the whole call.
    let err = s
        .allow_serials(&id("line-2"), &[sn("SN-9"), sn("SN-1")])
        .unwrap_err();
    assert!(matches!(err, RegistryError::OtherBatch { .. }), "{err}");
    assert!(s.claim_serial(&sn("SN-9")).unwrap().is_none());
    let list: Vec<_> = s
        .claim_serials(&id("line-1"))
        .unwrap()
        .into_iter()
        .map(|e| e.serial)
        .collect();
    assert_eq!(list, [sn("SN-1"), sn("SN-2"), sn("SN-3")]);
    let e = s.claim_serial(&sn("SN-1")).unwrap().unwrap();
    assert_eq!(e.batch, id("line-1"));
    assert!(e.provisioned.is_none());
    assert!(s.claim_serials(&id("line-2")).unwrap().is_empty());
    // Serials differing in case are different units.
    assert!(s.claim_serial(&sn("sn-1")).unwrap().is_none());
}

pub fn a_serial_is_provisioned_once_with_its_device(registry: &dyn Fixture) {
    let mut s = registry.open(Retention::default());
    s.allow_serials(&id("line-1"), &[sn("SN-1"), sn("SN-2")])
        .unwrap();
    let b = id("line-1");
    // Not on the list, or on it for another batch: nothing registered.
    let err = s
        .add_provisioned(
            &new_device("sn-7", &[]),
            &b,
            &sn("SN-7"),
            &unit("sn-7", "k7"),
        )
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotAllowed { .. }), "{err}");
    let err = s
        .add_provisioned(
            &new_device("sn-1", &[]),
            &id("line-2"),
            &sn("SN-1"),
            &unit("sn-1", "k1"),
        )
        .unwrap_err();
    assert!(matches!(err, RegistryError::OtherBatch { .. }), "{err}");
    assert!(matches!(
        s.device(&id("sn-1")),
        Err(RegistryError::UnknownDevice(_))
    ));

    let d = s
        .add_provisioned(
            &new_device("sn-1", &["lab"]),
            &b,
            &sn("SN-1"),
            &unit("sn-1", "k1"),
        )
        .unwrap();
    assert_eq!(d.id, id("sn-1"));
    let e = s.claim_serial(&sn("SN-1")).unwrap().unwrap();
    assert_eq!(e.provisioned, Some(unit("sn-1", "k1")));
    // A replay, with any key or id, registers nothing more.
    let err = s
        .add_provisioned(
            &new_device("sn-1b", &[]),
            &b,
            &sn("SN-1"),
            &unit("sn-1b", "k2"),
        )
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::AlreadyProvisioned { .. }),
        "{err}"
    );
    assert!(matches!(
        s.device(&id("sn-1b")),
        Err(RegistryError::UnknownDevice(_))
    ));
    // Another serial cannot take an id that exists; its entry stays open.
    let err = s
        .add_provisioned(
            &new_device("sn-1", &[]),
            &b,
            &sn("SN-2"),
            &unit("sn-1", "k3"),
        )
        .unwrap_err();
    assert!(matches!(err, RegistryError::DuplicateDevice(_)), "{err}");
    assert!(
        s.claim_serial(&sn("SN-2"))
            .unwrap()
            .unwrap()
            .provisioned
            .is_none()
    );
    // A revoked id is never provisioned again.
    s.add_device(&new_device("gone", &[])).unwrap();
    s.revoke(&id("gone")).unwrap();
    let err = s
        .add_provisioned(
            &new_device("gone", &[]),
            &b,
            &sn("SN-2"),
            &unit("gone", "k4"),
        )
        .unwrap_err();
    assert!(matches!(err, RegistryError::Revoked(_)), "{err}");
    // Another store sees the same.
    let other = registry.open(Retention::default());
    assert_eq!(
        other
            .claim_serial(&sn("SN-1"))
            .unwrap()
            .unwrap()
            .provisioned,
        Some(unit("sn-1", "k1"))
    );
}

pub fn two_stores_racing_to_provision_one_serial_register_it_once(registry: &dyn Fixture) {
    let mut s = registry.open(Retention::default());
    s.allow_serials(&id("line-1"), &[sn("SN-1")]).unwrap();
    let results: Vec<std::result::Result<Device, RegistryError>> = std::thread::scope(|scope| {
        let racers: Vec<_> = (0..4)
            .map(|i| {
                let mut store = registry.open(Retention::default());
                scope.spawn(move || {
                    store.add_provisioned(
                        &new_device(&format!("sn-1-{i}"), &[]),
                        &id("line-1"),
                        &sn("SN-1"),
                        &unit(&format!("sn-1-{i}"), &format!("k{i}")),
                    )
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let won: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(
                r,
                RegistryError::AlreadyProvisioned { .. } | RegistryError::Backend { .. }
            ),
            "{r}"
        );
    }
    let registered = s.devices(&Selector::All).unwrap();
    assert_eq!(registered.len(), 1, "{registered:?}");
}

pub fn a_login_code_logs_in_once_and_not_after_it_expires(registry: &dyn Fixture) {
    let mut a = registry.open(Retention::default());
    let mut b = registry.open(Retention::default());
    let code = |hash: &str, expires_at| LoginCode {
        hash: hash.into(),
        operator: "alice".into(),
        created_at: 1000,
        expires_at,
        used_at: None,
    };
    a.add_login_code(&code("h1", 2000)).unwrap();
    a.add_login_code(&code("h2", 2000)).unwrap();
    assert!(
        a.add_login_code(&code("h1", 3000)).is_err(),
        "a hash is stored once"
    );
    assert!(matches!(
        b.redeem_login_code("nope", 1500),
        Err(RegistryError::LoginRefused { .. })
    ));
    assert_eq!(b.redeem_login_code("h1", 1500).unwrap(), "alice");
    assert!(
        matches!(
            a.redeem_login_code("h1", 1501),
            Err(RegistryError::LoginRefused { why }) if why.contains("used")
        ),
        "the second store sees the code used"
    );
    assert!(matches!(
        a.redeem_login_code("h2", 2000),
        Err(RegistryError::LoginRefused { why }) if why.contains("expired")
    ));
    assert_eq!(
        a.redeem_login_code("h2", 1999).unwrap(),
        "alice",
        "a refused attempt does not use the code up"
    );
}

pub fn the_audit_log_keeps_every_entry_in_order_and_pages_back(registry: &dyn Fixture) {
    let mut a = registry.open(Retention::default());
    let b = registry.open(Retention::default());
    let entry = |n: u64| AuditEntry {
        seq: 0,
        at: 1000 + n,
        actor: "operator:alice".into(),
        action: "set".into(),
        target: format!("dev-{n}"),
        detail: format!("revision {n}"),
    };
    let seqs: Vec<i64> = (0..5).map(|n| a.record_audit(&entry(n)).unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let latest = b.audit_log(3, None).unwrap();
    assert_eq!(
        latest.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(),
        ["dev-4", "dev-3", "dev-2"]
    );
    assert_eq!(latest[0].seq, seqs[4]);
    assert_eq!(latest[0].actor, "operator:alice");
    let older = b.audit_log(10, Some(latest[2].seq)).unwrap();
    assert_eq!(
        older.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>(),
        ["revision 1", "revision 0"]
    );
}

pub fn the_overview_counts_states_expiring_certificates_and_pending_settings(
    registry: &dyn Fixture,
) {
    let mut store = registry.open(Retention::default());
    assert_eq!(store.overview(0).unwrap(), Overview::default());
    for d in ["on", "off", "new", "gone"] {
        store.add_device(&new_device(d, &[])).unwrap();
    }
    store
        .apply(&[online("on", 100), online("off", 100), online("gone", 100)])
        .unwrap();
    store.apply(&[offline("off", 110)]).unwrap();
    store.revoke(&id("gone")).unwrap();
    let mut changes = Map::new();
    changes.insert("log_level".into(), json!("debug"));
    store.set_desired(&id("on"), &changes).unwrap();
    let o = store.overview(2_000_000_001).unwrap();
    assert_eq!(
        (o.total, o.online, o.offline, o.never_seen, o.revoked),
        (4, 1, 1, 1, 1)
    );
    assert_eq!(
        o.cert_expiring, 3,
        "every non-revoked one expires before then"
    );
    assert_eq!(o.settings_pending, 1);
    assert_eq!(store.overview(1_000).unwrap().cert_expiring, 0);
}

fn renewed(device: &str, serial: &str, key: &str, at: u64) -> CertRecord {
    CertRecord {
        device: id(device),
        serial: serial.into(),
        fingerprint_sha256: format!("{serial}-fp"),
        not_after: at + 90,
        issued_at: at,
        origin: CertOrigin::Renewed,
        state: CertState::Pending,
        key_sha256: Some(key.into()),
        chain_pem: Some(format!("chain of {serial}")),
        confirmed_at: None,
        superseded_at: None,
        retired_at: None,
    }
}

fn states(history: &[CertRecord]) -> Vec<(String, CertState)> {
    history
        .iter()
        .map(|r| (r.serial.clone(), r.state))
        .collect()
}

pub fn renewals_keep_the_certificate_history_in_order(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&unit_device("dev-a", "a0")).unwrap();
    store.add_device(&unit_device("dev-b", "b0")).unwrap();
    // Before any renewal: the row's certificate, current.
    let h = store.cert_history(&id("dev-a")).unwrap();
    assert_eq!(states(&h), [("a0".to_owned(), CertState::Current)]);

    // Renewal 1 signed, not confirmed: the row still names a0.
    assert!(
        store
            .record_renewal(&renewed("dev-a", "a1", "k1", 100))
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.device(&id("dev-a")).unwrap().cert.unwrap().serial,
        "a0"
    );
    // A second one before the first was confirmed abandons the first.
    assert_eq!(
        store
            .record_renewal(&renewed("dev-a", "a2", "k2", 200))
            .unwrap(),
        ["a1"]
    );
    let changed = store.confirm_certificate(&id("dev-a"), "a2", 250).unwrap();
    assert_eq!(changed.len(), 2);
    let dev = store.device(&id("dev-a")).unwrap();
    assert_eq!(dev.cert.unwrap().serial, "a2");
    // Confirming again changes nothing; an abandoned one cannot be confirmed.
    assert!(
        store
            .confirm_certificate(&id("dev-a"), "a2", 260)
            .unwrap()
            .is_empty()
    );
    assert!(store.confirm_certificate(&id("dev-a"), "a1", 260).is_err());
    assert!(
        store
            .confirm_certificate(&id("dev-a"), "nope", 260)
            .is_err()
    );

    // Renewal 3, confirmed: a2 is previous too.
    store
        .record_renewal(&renewed("dev-a", "a3", "k3", 300))
        .unwrap();
    store.confirm_certificate(&id("dev-a"), "a3", 350).unwrap();
    // Seen by another store on the same registry.
    let other = registry.open(Retention::default());
    let h = other.cert_history(&id("dev-a")).unwrap();
    assert_eq!(
        states(&h),
        [
            ("a0".to_owned(), CertState::Previous),
            ("a1".to_owned(), CertState::Abandoned),
            ("a2".to_owned(), CertState::Previous),
            ("a3".to_owned(), CertState::Current),
        ]
    );
    assert_eq!(h[3].key_sha256.as_deref(), Some("k3"));
    assert_eq!(h[3].chain_pem.as_deref(), Some("chain of a3"));
    assert_eq!(h[3].confirmed_at, Some(350));
    assert_eq!(h[2].superseded_at, Some(350));
    let status = RenewalStatus::of(&h);
    assert_eq!((status.renewals, status.pending), (3, None));

    // Grace: a0 superseded at 250, a2 at 350.
    let due = store.due_retirements(300).unwrap();
    assert_eq!(
        due.iter().map(|r| r.serial.as_str()).collect::<Vec<_>>(),
        ["a0"]
    );
    store.mark_retired(&["a0".to_owned()], 400).unwrap();
    let due = store.due_retirements(1000).unwrap();
    assert_eq!(
        due.iter().map(|r| r.serial.as_str()).collect::<Vec<_>>(),
        ["a2"]
    );
    let h = store.cert_history(&id("dev-a")).unwrap();
    assert_eq!(
        (h[0].state, h[0].retired_at),
        (CertState::Retired, Some(400))
    );
    // The other device was never touched.
    assert_eq!(
        states(&store.cert_history(&id("dev-b")).unwrap()),
        [("b0".to_owned(), CertState::Current)]
    );

    // Reissued by hand afterwards: the history shows it as current.
    store
        .set_certificate(
            &id("dev-a"),
            &CertInfo {
                serial: "a4".into(),
                fingerprint_sha256: "a4-fp".into(),
                not_after: 9_999,
            },
        )
        .unwrap();
    let h = store.cert_history(&id("dev-a")).unwrap();
    let last = h.last().unwrap();
    assert_eq!(
        (last.serial.as_str(), last.state, last.origin),
        ("a4", CertState::Current, CertOrigin::Reissued)
    );
    assert!(h.iter().filter(|r| r.state == CertState::Current).count() == 1);
}

pub fn a_renewal_of_a_revoked_or_unknown_device_records_nothing(registry: &dyn Fixture) {
    let mut store = registry.open(Retention::default());
    store.add_device(&unit_device("dev-a", "a0")).unwrap();
    assert!(matches!(
        store.record_renewal(&renewed("dev-x", "x1", "k", 1)),
        Err(RegistryError::UnknownDevice(_))
    ));
    store
        .record_renewal(&renewed("dev-a", "a1", "k1", 100))
        .unwrap();
    store.revoke(&id("dev-a")).unwrap();
    assert!(matches!(
        store.record_renewal(&renewed("dev-a", "a2", "k2", 200)),
        Err(RegistryError::Revoked(_))
    ));
    assert!(matches!(
        store.confirm_certificate(&id("dev-a"), "a1", 300),
        Err(RegistryError::Revoked(_))
    ));
    let h = store.cert_history(&id("dev-a")).unwrap();
    assert_eq!(
        states(&h),
        [
            ("a0".to_owned(), CertState::Current),
            ("a1".to_owned(), CertState::Pending)
        ]
    );
    assert_eq!(
        store.device(&id("dev-a")).unwrap().cert.unwrap().serial,
        "a0"
    );
}

pub fn an_expired_unit_reprovisions_under_its_serial_and_nothing_else_does(registry: &dyn Fixture) {
    let mut s = registry.open(Retention::default());
    let b = id("line-1");
    s.allow_serials(&b, &[sn("SN-1"), sn("SN-2")]).unwrap();
    let expiring = |device: &str, serial: &str, not_after: u64| NewDevice {
        cert: Some(CertInfo {
            serial: serial.into(),
            fingerprint_sha256: format!("{serial}-fp"),
            not_after,
        }),
        ..new_device(device, &[])
    };
    s.add_provisioned(
        &expiring("sn-1", "a0", 1_000),
        &b,
        &sn("SN-1"),
        &unit("sn-1", "k1"),
    )
    .unwrap();
    s.add_provisioned(
        &expiring("sn-2", "b0", 9_000),
        &b,
        &sn("SN-2"),
        &unit("sn-2", "k2"),
    )
    .unwrap();
    s.record_renewal(&renewed("sn-1", "a1", "kr", 500)).unwrap();
    let new_cert = |device: &str, serial: &str, key: &str| CertRecord {
        origin: CertOrigin::Reprovisioned,
        state: CertState::Current,
        not_after: 50_000,
        ..renewed(device, serial, key, 2_000)
    };
    let before = full_snapshot(s.as_ref());
    // Still valid (sn-2 until 9000), another serial's id, another batch, a
    // serial not on the list: refused, nothing changed.
    for (batch, serial, device, err) in [
        ("line-1", "SN-2", "sn-2", "valid for"),
        ("line-1", "SN-2", "sn-1", "for good"),
        ("line-2", "SN-1", "sn-1", "line-1"),
        ("line-1", "SN-9", "sn-9", "not on the allow-list"),
    ] {
        let got = s
            .reprovision(
                &id(batch),
                &sn(serial),
                &unit(device, "k9"),
                &new_cert(device, "zz", "k9"),
                2_000,
            )
            .unwrap_err()
            .to_string();
        assert!(got.contains(err), "{serial} as {device}: {got}");
    }
    assert_eq!(full_snapshot(s.as_ref()), before);

    // sn-1's certificate expired at 1000: re-provisioned at 2000.
    let superseded = s
        .reprovision(
            &b,
            &sn("SN-1"),
            &unit("sn-1", "k5"),
            &new_cert("sn-1", "a2", "k5"),
            2_000,
        )
        .unwrap();
    assert_eq!(superseded, ["a0", "a1"]);
    let dev = s.device(&id("sn-1")).unwrap();
    assert_eq!(dev.cert.unwrap().serial, "a2");
    let h = s.cert_history(&id("sn-1")).unwrap();
    assert_eq!(
        states(&h),
        [
            ("a0".to_owned(), CertState::Retired),
            ("a1".to_owned(), CertState::Abandoned),
            ("a2".to_owned(), CertState::Current),
        ]
    );
    assert_eq!(h[2].origin, CertOrigin::Reprovisioned);
    assert_eq!(h[0].retired_at, Some(2_000));
    // The serial now names the new key and chain (a repeat gets it again).
    let e = s.claim_serial(&sn("SN-1")).unwrap().unwrap();
    assert_eq!(e.provisioned.unwrap().key_sha256, "k5");
    // The new certificate is valid: asking once more is refused.
    assert!(
        s.reprovision(
            &b,
            &sn("SN-1"),
            &unit("sn-1", "k6"),
            &new_cert("sn-1", "a3", "k6"),
            3_000
        )
        .is_err()
    );
    // A revoked device never re-provisions, even expired.
    s.revoke(&id("sn-2")).unwrap();
    let err = s
        .reprovision(
            &b,
            &sn("SN-2"),
            &unit("sn-2", "k7"),
            &new_cert("sn-2", "b1", "k7"),
            20_000,
        )
        .unwrap_err();
    assert!(matches!(err, RegistryError::Revoked(_)), "{err}");
    // Another store sees the same.
    let other = registry.open(Retention::default());
    assert_eq!(
        other.device(&id("sn-1")).unwrap().cert.unwrap().serial,
        "a2"
    );
}
