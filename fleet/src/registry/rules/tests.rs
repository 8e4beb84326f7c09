use std::collections::BTreeSet;

use edgebind_protocol::messages::{Command, CommandResult, CommandStatus, Presence, Status};
use serde_json::json;

use super::*;

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn device(lifecycle: Lifecycle) -> Device {
    Device {
        id: id("d1"),
        board: "qemux86-64".parse().unwrap(),
        tags: BTreeSet::new(),
        lifecycle,
        registered_at: 10,
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
    }
}

fn online(ts: Option<u64>) -> Status {
    Status {
        state: Presence::Online,
        session: None,
        agent_version: Some("1.0".into()),
        boot_id: Some("boot-a".into()),
        uptime_s: None,
        addresses: vec!["10.0.0.2".into()],
        ts,
    }
}

fn offline() -> Status {
    Status {
        state: Presence::Offline,
        session: None,
        agent_version: None,
        boot_id: None,
        uptime_s: None,
        addresses: vec![],
        ts: None,
    }
}

fn sent(action: Option<&str>) -> CommandRecord {
    CommandRecord {
        action: action.map(str::to_owned),
        ..orphan_entry(&CommandId::new("c1").unwrap(), &id("d1"), 100)
    }
}

fn result(status: CommandStatus, output: Option<Value>) -> CommandResult {
    CommandResult {
        id: CommandId::new("c1").unwrap(),
        status,
        reason: None,
        output,
        facts: false,
        ts: 0,
    }
}

#[test]
fn first_connection_provisions_and_later_ones_keep_the_first_time() {
    let start = device(Lifecycle::Registered).state();
    let (s, new) = on_status(&start, &online(Some(50)), 60);
    assert!(new);
    assert_eq!(s.lifecycle, Lifecycle::Provisioned);
    assert_eq!(
        (s.provisioned_at, s.connected_at, s.last_seen),
        (Some(60), Some(50), Some(60))
    );
    assert!(s.online);
    let (s, _) = on_status(&s, &offline(), 70);
    assert!(!s.online);
    assert_eq!(
        s.last_seen,
        Some(60),
        "a will does not mean the device was heard"
    );
    let (s, new) = on_status(&s, &online(Some(80)), 90);
    assert!(new);
    assert_eq!(s.provisioned_at, Some(60));
    assert_eq!(s.connected_at, Some(80));
}

#[test]
fn a_replayed_retained_online_is_not_a_new_connection() {
    let (s, _) = on_status(
        &device(Lifecycle::Registered).state(),
        &online(Some(50)),
        60,
    );
    let (again, new) = on_status(&s, &online(Some(50)), 200);
    assert!(!new);
    assert_eq!(again.connected_at, Some(50));
    let (_, new) = on_status(&s, &online(None), 200);
    assert!(
        new,
        "without a ts it cannot be told apart from a new connection"
    );
}

#[test]
fn an_online_status_without_version_keeps_the_known_one() {
    let (s, _) = on_status(&device(Lifecycle::Registered).state(), &online(Some(1)), 1);
    let bare = Status {
        agent_version: None,
        boot_id: None,
        ..online(Some(2))
    };
    let (s, _) = on_status(&s, &bare, 2);
    assert_eq!(s.agent_version.as_deref(), Some("1.0"));
    assert_eq!(s.boot_id.as_deref(), Some("boot-a"));
}

#[test]
fn last_seen_never_moves_back() {
    let s = heard_from(&device(Lifecycle::Provisioned).state(), 100);
    assert_eq!(heard_from(&s, 90).last_seen, Some(100));
    assert_eq!(heard_from(&s, 110).last_seen, Some(110));
}

#[test]
fn revoking_takes_the_device_offline_once() {
    let mut d = device(Lifecycle::Provisioned);
    d.online = true;
    let s = revoke(&d, 500).unwrap();
    assert_eq!(
        (s.lifecycle, s.revoked_at, s.online),
        (Lifecycle::Revoked, Some(500), false)
    );
    d.lifecycle = Lifecycle::Revoked;
    assert!(matches!(revoke(&d, 600), Err(RegistryError::Revoked(_))));
    assert!(matches!(
        merge_desired(&d, &Map::new()),
        Err(RegistryError::Revoked(_))
    ));
}

#[test]
fn only_queued_commands_are_rejected_on_revocation_or_sent() {
    let queued = CommandRecord {
        state: CommandState::Queued,
        ..sent(Some("ping"))
    };
    let rejected = reject_for_revocation(&queued, 9).unwrap();
    assert_eq!(rejected.state, CommandState::Rejected);
    assert_eq!(rejected.reason.as_deref(), Some("device revoked"));
    assert!(reject_for_revocation(&sent(Some("ping")), 9).is_none());
    assert_eq!(mark_sent(&queued, 7).unwrap().sent_at, Some(7));
    assert!(
        mark_sent(&sent(Some("ping")), 7).is_none(),
        "never sent twice"
    );
}

#[test]
fn a_final_command_state_is_never_overwritten() {
    let done = command_result(
        Some(&sent(Some("ping"))),
        &id("d1"),
        &result(CommandStatus::Succeeded, None),
        200,
    )
    .command
    .unwrap();
    assert_eq!(done.state, CommandState::Succeeded);
    for late in [
        CommandStatus::Accepted,
        CommandStatus::Failed,
        CommandStatus::Succeeded,
    ] {
        let effect = command_result(Some(&done), &id("d1"), &result(late, None), 300);
        assert_eq!(effect.command, None, "{late:?} after succeeded");
    }
}

#[test]
fn accepted_then_final_records_both_times() {
    let accepted = command_result(
        Some(&sent(Some("reboot"))),
        &id("d1"),
        &result(CommandStatus::Accepted, None),
        150,
    )
    .command
    .unwrap();
    assert_eq!(
        (accepted.state, accepted.accepted_at),
        (CommandState::Accepted, Some(150))
    );
    let failed = command_result(
        Some(&accepted),
        &id("d1"),
        &CommandResult {
            reason: Some("busy".into()),
            ..result(CommandStatus::Failed, None)
        },
        160,
    )
    .command
    .unwrap();
    assert_eq!(failed.state, CommandState::Failed);
    assert_eq!(
        (failed.accepted_at, failed.finished_at),
        (Some(150), Some(160))
    );
    assert_eq!(failed.reason.as_deref(), Some("busy"));
}

#[test]
fn a_result_never_moves_another_devices_command() {
    let effect = command_result(
        Some(&sent(Some("ping"))),
        &id("intruder"),
        &result(CommandStatus::Succeeded, None),
        1,
    );
    assert_eq!(effect.command, None);
}

#[test]
fn an_orphan_result_gets_a_log_entry_and_the_command_later_its_action() {
    let effect = command_result(None, &id("d1"), &result(CommandStatus::Succeeded, None), 5);
    assert!(effect.new_entry);
    let entry = effect.command.unwrap();
    assert_eq!(
        (entry.state, entry.action.clone()),
        (CommandState::Succeeded, None)
    );
    let cmd = Command {
        id: entry.id.clone(),
        action: edgebind_protocol::actions::PING,
        args: Map::new(),
        expires_at: None,
    };
    let learned = command_seen(Some(&entry), &id("d1"), &cmd, 6).unwrap();
    assert_eq!(learned.action.as_deref(), Some("ping"));
    assert_eq!(learned.state, CommandState::Succeeded, "state kept");
    assert!(command_seen(Some(&learned), &id("d1"), &cmd, 7).is_none());
}

#[test]
fn only_a_succeeded_result_carrying_facts_becomes_the_inventory() {
    let inv = json!({"agent_version": "1.0"});
    let facts = |status| CommandResult {
        facts: true,
        ..result(status, Some(inv.clone()))
    };
    // Whatever the action is called: the rule looks at the result only.
    for action in ["inventory", "site-survey"] {
        let ok = command_result(
            Some(&sent(Some(action))),
            &id("d1"),
            &facts(CommandStatus::Succeeded),
            1,
        );
        assert_eq!(ok.inventory, Some(inv.clone()), "{action}");
    }
    let failed = command_result(
        Some(&sent(Some("inventory"))),
        &id("d1"),
        &facts(CommandStatus::Failed),
        1,
    );
    assert_eq!(failed.inventory, None);
    let plain = command_result(
        Some(&sent(Some("inventory"))),
        &id("d1"),
        &result(CommandStatus::Succeeded, Some(inv.clone())),
        1,
    );
    assert_eq!(
        plain.inventory, None,
        "an output without facts: true is not stored"
    );
}

#[test]
fn a_timed_out_result_is_a_final_failure_with_its_reason() {
    let r = CommandResult {
        reason: Some("timed out after 2 s".into()),
        ..result(CommandStatus::TimedOut, None)
    };
    let e = command_result(Some(&sent(Some("selftest"))), &id("d1"), &r, 1);
    let c = e.command.unwrap();
    assert_eq!(c.state, CommandState::Failed);
    assert_eq!(c.reason.as_deref(), Some("timed out after 2 s"));
}

#[test]
fn desired_settings_merge_and_null_removes() {
    let mut d = device(Lifecycle::Provisioned);
    d.desired.insert("log_level".into(), json!("info"));
    d.desired_revision = 3;
    let mut changes = Map::new();
    changes.insert("log_level".into(), Value::Null);
    changes.insert("telemetry_interval_s".into(), json!(5));
    let next = merge_desired(&d, &changes).unwrap();
    assert_eq!(next.revision, 4);
    assert_eq!(
        Value::Object(next.settings),
        json!({"telemetry_interval_s": 5})
    );
    d.desired_published_revision = 4;
    assert_eq!(
        published_revision(&d, 2),
        4,
        "a late publish never lowers it"
    );
}

#[test]
fn new_devices_are_refused_whole_on_any_duplicate() {
    let new = |s: &str| NewDevice {
        id: id(s),
        board: "qemux86-64".parse().unwrap(),
        tags: BTreeSet::new(),
        cert: None,
    };
    assert!(check_new_devices(&[new("a"), new("b")], &[]).is_ok());
    assert!(matches!(
        check_new_devices(&[new("a"), new("a")], &[]),
        Err(RegistryError::DuplicateDevice(d)) if d.as_str() == "a"
    ));
    assert!(matches!(
        check_new_devices(&[new("a")], &[id("a")]),
        Err(RegistryError::DuplicateDevice(_))
    ));
}

#[test]
fn a_queued_command_waits_and_others_are_on_their_way() {
    let c = NewCommand {
        id: CommandId::new("c9").unwrap(),
        device: id("d1"),
        action: edgebind_protocol::actions::REBOOT,
        args: Map::new(),
        delivery: Delivery::Queued,
        requested_by: None,
        expires_at: None,
        rule_id: None,
    };
    let queued = new_command(&c, 42);
    assert_eq!((queued.state, queued.sent_at), (CommandState::Queued, None));
    let now = new_command(
        &NewCommand {
            delivery: Delivery::Now,
            ..c
        },
        42,
    );
    assert_eq!((now.state, now.sent_at), (CommandState::Sent, Some(42)));
}

#[test]
fn presence_is_fresh_only_with_a_connected_service_and_a_recent_heartbeat() {
    let svc = |connected, since, seen_at| ServicePresence {
        name: "fleet".into(),
        connected,
        since,
        seen_at,
        broker_dropped: None,
        lag: 0,
        broker_waiting: None,
        oldest_uncommitted_s: None,
        push_back: false,
    };
    assert_eq!(
        presence_view(&[], 1000),
        PresenceView {
            fresh: false,
            as_of: None
        }
    );
    let up = svc(true, 500, 990);
    assert_eq!(
        presence_view(std::slice::from_ref(&up), 1000),
        PresenceView {
            fresh: true,
            as_of: Some(990)
        }
    );
    // Killed: the record still says connected, the heartbeat stopped at 990.
    assert!(!presence_view(std::slice::from_ref(&up), 990 + 3 * SERVICE_HEARTBEAT_S + 1).fresh);
    // Stopped cleanly at 995: stale at once, as of then.
    assert_eq!(
        presence_view(&[svc(false, 995, 995)], 996),
        PresenceView {
            fresh: false,
            as_of: Some(995)
        }
    );
    // One of two instances is enough.
    assert!(presence_view(&[svc(false, 10, 10), up], 1000).fresh);
}

fn unit(serial: &str, device: &str, cert: &str) -> ManufacturingRecord {
    ManufacturingRecord {
        serial: serial.into(),
        device: id(device),
        cert_serial: cert.into(),
        cert_fingerprint_sha256: format!("{cert}-fp"),
        station: "s".into(),
        operator: "o".into(),
        made_at: 1,
        image_sha256: None,
    }
}

fn new_unit_device(device: &str, cert: &str) -> NewDevice {
    NewDevice {
        id: id(device),
        board: "qemux86-64".parse().unwrap(),
        tags: BTreeSet::new(),
        cert: Some(crate::registry::CertInfo {
            serial: cert.into(),
            fingerprint_sha256: format!("{cert}-fp"),
            not_after: 5,
        }),
    }
}

#[test]
fn a_unit_is_made_once_and_a_revoked_id_is_refused_as_revoked() {
    let r = unit("SN1", "d1", "c1");
    check_new_unit(&r, None, None).unwrap();
    assert!(matches!(
        check_new_unit(&r, Some(&r), None),
        Err(RegistryError::DuplicateUnit { .. })
    ));
    assert!(matches!(
        check_new_unit(&r, None, Some(&device(Lifecycle::Revoked))),
        Err(RegistryError::Revoked(_))
    ));
    assert!(matches!(
        check_new_unit(&r, None, Some(&device(Lifecycle::Provisioned))),
        Err(RegistryError::DuplicateDevice(_))
    ));
}

#[test]
fn an_import_step_is_nothing_when_identical_and_a_conflict_otherwise() {
    let new = new_unit_device("d1", "c1");
    let r = unit("SN1", "d1", "c1");
    assert_eq!(
        import_step(&new, &r, None, None, None).unwrap(),
        ImportStep::DeviceAndRecord
    );
    assert_eq!(
        import_step(&new, &r, Some(&r), None, None).unwrap(),
        ImportStep::Nothing
    );
    let mut here = device(Lifecycle::Registered);
    here.cert = new.cert.clone();
    assert_eq!(
        import_step(&new, &r, None, Some(&here), None).unwrap(),
        ImportStep::RecordOnly
    );
    let other_cert = unit("SN1", "d1", "c2");
    let err = import_step(&new, &r, Some(&other_cert), None, None).unwrap_err();
    assert!(err.to_string().contains("certificate c2"), "{err}");
    let err = import_step(&new, &r, None, None, Some(&unit("SN0", "d1", "c1"))).unwrap_err();
    assert!(err.to_string().contains("\"SN0\""), "{err}");
    here.cert = None;
    assert!(import_step(&new, &r, None, Some(&here), None).is_err());
    // A record that does not match its own device entry.
    assert!(import_step(&new, &unit("SN1", "d2", "c1"), None, None, None).is_err());
}

#[test]
fn telemetry_is_trimmed_once_it_grew_a_tenth_past_the_window() {
    // Up to the window nothing is trimmed, however it arrives.
    assert!(!telemetry_trim_due(1000, 1000, 1000));
    assert!(!telemetry_trim_due(400, 1, 1000));
    // The first sample past the window trims.
    assert!(telemetry_trim_due(1001, 1, 1000));
    assert!(telemetry_trim_due(1050, 100, 1000));
    // Then once per 100 (a tenth of 1000) more, one sample at a time...
    let trims = (1002..=2001)
        .filter(|t| telemetry_trim_due(*t, 1, 1000))
        .count();
    assert_eq!(trims, 10);
    // ...and a batch that crosses a multiple trims too.
    assert!(telemetry_trim_due(1210, 20, 1000));
    assert!(!telemetry_trim_due(1190, 20, 1000));
    // Small windows trim on every batch past them.
    assert!((6..30).all(|t| telemetry_trim_due(t, 1, 5)));
    // So the stored history never passes keep + keep / 10.
    let (keep, mut stored, mut total) = (1000u64, 0u64, 0u64);
    for added in [7u64, 300, 1, 1, 99, 250, 1, 3].iter().cycle().take(500) {
        total += added;
        stored += added;
        if telemetry_trim_due(total, *added, keep as u32) {
            stored = stored.min(keep);
        }
        assert!(
            stored <= keep + keep / 10 + 300,
            "stored {stored} at total {total}"
        );
    }
}

#[test]
fn only_an_expired_live_device_re_provisions_under_its_own_serial() {
    use super::super::{CertInfo, ClaimSerial, ProvisionedUnit};
    let batch = id("line-1");
    let serial = UnitSerial::new("SN-1").unwrap();
    let entry = ClaimSerial {
        serial: serial.clone(),
        batch: batch.clone(),
        allowed_at: 1,
        provisioned: Some(ProvisionedUnit {
            device: id("d1"),
            key_sha256: "k1".into(),
            chain_pem: "chain".into(),
            at: 5,
        }),
    };
    let mut d = device(Lifecycle::Provisioned);
    d.cert = Some(CertInfo {
        serial: "aa".into(),
        fingerprint_sha256: "f".into(),
        not_after: 1000,
    });
    let check = |entry: Option<&ClaimSerial>, d: Option<&Device>, asked: &str, now| {
        check_reprovision(&batch, &serial, entry, d, &id(asked), now)
    };
    // Expired, or within the skew margin of it: allowed.
    assert!(check(Some(&entry), Some(&d), "d1", 1001).is_ok());
    assert!(check(Some(&entry), Some(&d), "d1", 1000 - REPROVISION_SKEW_S).is_ok());
    // Still valid beyond the margin: that device renews itself.
    let err = check(Some(&entry), Some(&d), "d1", 999 - REPROVISION_SKEW_S).unwrap_err();
    assert!(
        matches!(&err, RegistryError::NoReprovision { why, .. } if why.contains("renews over its own connection")),
        "{err}"
    );
    // Revoked: never.
    let mut revoked = d.clone();
    revoked.lifecycle = Lifecycle::Revoked;
    assert!(matches!(
        check(Some(&entry), Some(&revoked), "d1", 5000),
        Err(RegistryError::Revoked(_))
    ));
    // The serial names its device for good: another id is refused.
    assert!(matches!(
        check(Some(&entry), Some(&d), "d2", 5000),
        Err(RegistryError::NoReprovision { .. })
    ));
    // Not on the list, on another batch's, never provisioned, no device row.
    assert!(matches!(
        check(None, Some(&d), "d1", 5000),
        Err(RegistryError::NotAllowed { .. })
    ));
    let other = ClaimSerial {
        batch: id("line-2"),
        ..entry.clone()
    };
    assert!(matches!(
        check(Some(&other), Some(&d), "d1", 5000),
        Err(RegistryError::OtherBatch { .. })
    ));
    let fresh = ClaimSerial {
        provisioned: None,
        ..entry.clone()
    };
    assert!(matches!(
        check(Some(&fresh), Some(&d), "d1", 5000),
        Err(RegistryError::NoReprovision { .. })
    ));
    assert!(matches!(
        check(Some(&entry), None, "d1", 5000),
        Err(RegistryError::UnknownDevice(_))
    ));
}
