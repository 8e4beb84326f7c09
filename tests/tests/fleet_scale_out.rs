//! Several `fleet serve` instances share one broker and one PostgreSQL
//! registry (MQTT 5 shared subscriptions): the work is split, a `kill -9`
//! of one instance under load loses and duplicates nothing, and what a
//! connection queues (on-connect rules, inventory) happens once however
//! many instances there are.

mod fleet_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edgebind_fleet::registry::{Delivery, Store};
use edgebind_protocol::DeviceId;
use edgebind_protocol::topics::Topic;
use edgebind_tests::{PubAckReason, QoS, TestClient, wait_until};
use fleet_support::{AgentTweaks, Fleet, LONG, Proc};
use serde_json::json;

const DEVICES: usize = 3;
const PER_DEVICE: u64 = 600;

fn telemetry(seq: u64) -> Vec<u8> {
    json!({
        "ts": seq, "cpu_pct": 1.0, "load_avg": [0.0, 0.0, 0.0],
        "mem_total_bytes": 100, "mem_used_bytes": 50,
        "disk_total_bytes": 10, "disk_used_bytes": 5, "uptime_s": seq
    })
    .to_string()
    .into_bytes()
}

fn device_identity(bundle: &std::path::Path, id: &str) -> edgebind_tests::Identity {
    edgebind_tests::Identity {
        principal: None,
        name: id.into(),
        dir: bundle.to_owned(),
        cert: bundle.join("device.crt"),
        key: bundle.join("device.key"),
        ca: bundle.join("ca.crt"),
        serial: String::new(),
    }
}

/// Messages an instance committed, from the line it logs at an orderly stop.
fn committed_by(instance: &mut Proc) -> u64 {
    instance.terminate();
    let log = instance.log();
    let line = log
        .lines()
        .find(|l| l.contains("stopped after"))
        .unwrap_or_else(|| panic!("no orderly stop:\n{log}"));
    line.split("stopped after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line:?}"))
}

#[test]
fn two_instances_share_the_ingest_and_a_kill9_of_one_loses_and_duplicates_nothing() {
    let fleet = Fleet::start_on_postgres();
    let mut a = fleet.start_instance("fleet", 1);
    let mut b = fleet.start_instance("fleet-2", 1);

    let ids: Vec<String> = (0..DEVICES).map(|i| format!("sim-{i}")).collect();
    let clients: Vec<(DeviceId, TestClient)> = ids
        .iter()
        .map(|id| {
            let bundle = fleet.add_device(id, &["sim"]);
            let client =
                TestClient::connect(&device_identity(&bundle, id), &fleet.env.broker).unwrap();
            (DeviceId::new(id.as_str()).unwrap(), client)
        })
        .collect();

    // Each device streams PER_DEVICE samples as fast as the broker takes them;
    // halfway through, instance 2 is killed, and systemd-like it is back 2 s later.
    let half = Instant::now();
    let b_after = std::thread::scope(|scope| {
        for (id, client) in &clients {
            scope.spawn(move || {
                let topic = Topic::Telemetry(id.clone()).render();
                for seq in 0..PER_DEVICE {
                    let ack = client
                        .publish(&topic, &telemetry(seq), QoS::AtLeastOnce, false)
                        .unwrap();
                    assert_eq!(ack, Some(PubAckReason::Success), "{id} #{seq}");
                }
            });
        }
        let store = fleet.store();
        let stored =
            |store: &dyn Store| -> u64 { store.stats().map(|s| s.telemetry_received).unwrap_or(0) };
        assert!(
            wait_until(LONG, || stored(store.as_ref())
                >= DEVICES as u64 * PER_DEVICE / 2),
            "half the samples never arrived"
        );
        b.kill9();
        let killed_at = stored(store.as_ref());
        std::thread::sleep(Duration::from_secs(2)); // systemd's RestartSec
        let b2 = fleet.start_instance("fleet-2", 2);
        (b2, killed_at)
    });
    let (mut b2, killed_at) = b_after;
    eprintln!(
        "instance 2 killed with {killed_at} of {} stored, {:?} into the stream",
        DEVICES as u64 * PER_DEVICE,
        half.elapsed()
    );

    let store = fleet.store();
    let all = DEVICES as u64 * PER_DEVICE;
    let complete = wait_until(LONG, || {
        store.stats().map(|s| s.telemetry_received).unwrap_or(0) >= all
    });
    let stats = store.stats().unwrap();
    assert!(
        complete,
        "only {} of {all} samples stored",
        stats.telemetry_received
    );
    for (id, _) in &clients {
        let rows = store.telemetry_history(id, 10_000).unwrap();
        let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
        for r in &rows {
            *seen.entry(r.ts).or_default() += 1;
        }
        let missing: Vec<u64> = (0..PER_DEVICE).filter(|s| !seen.contains_key(s)).collect();
        let doubled: Vec<u64> = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(s, _)| *s)
            .collect();
        assert!(missing.is_empty(), "{id}: lost {missing:?}");
        assert!(doubled.is_empty(), "{id}: stored twice {doubled:?}");
        assert_eq!(
            store.device(id).unwrap().telemetry_count,
            PER_DEVICE,
            "{id}: counted once"
        );
    }
    assert_eq!(stats.telemetry_rows, all);
    assert_eq!(stats.telemetry_received, all, "nothing counted twice");

    // Both instances really took part (the broker split the stream).
    let by_b2 = committed_by(&mut b2);
    let by_a = committed_by(&mut a);
    eprintln!("committed: instance 1 {by_a}, instance 2 after its restart {by_b2}");
    assert!(by_a > 0, "instance 1 took no share");
    assert!(
        by_b2 > 0,
        "instance 2 got nothing back after its restart (its share must wait in its session)"
    );
}

#[test]
fn a_connection_queues_its_on_connect_commands_once_with_two_instances() {
    let fleet = Fleet::start_on_postgres();
    let _a = fleet.start_instance("fleet", 1);
    let _b = fleet.start_instance("fleet-2", 1);
    let bundle = fleet.add_device("dev-oc", &[]);
    fleet.cli_ok(&["send", "dev-oc", "ping", "--on-connect"]);
    let out = fleet.cli_ok(&["send", "dev-oc", "ping", "--queue", "--json"]);
    let queued: serde_json::Value = serde_json::from_str(&out).unwrap();
    let queued_id = queued[0]["command"].as_str().unwrap().to_owned();
    let config = fleet.agent_config(&bundle, &AgentTweaks::default());
    let id = DeviceId::new("dev-oc").unwrap();
    let store = fleet.store();
    let finished = |delivery: Delivery| {
        store
            .commands_for(&id, 100)
            .unwrap()
            .into_iter()
            .filter(|c| c.delivery == delivery && c.finished_at.is_some())
            .count()
    };
    let all_of = |delivery: Delivery| {
        store
            .commands_for(&id, 100)
            .unwrap()
            .into_iter()
            .filter(|c| c.delivery == delivery)
            .count()
    };

    for connection in 1..=3usize {
        let mut agent = fleet.spawn_agent(&config);
        fleet.wait_device("dev-oc", LONG, "online", |d| d.online);
        assert!(
            wait_until(LONG, || finished(Delivery::OnConnect) == connection
                && finished(Delivery::Auto) == connection),
            "connection {connection}: on-connect ping and inventory not run; log:\n{}",
            store
                .commands_for(&id, 100)
                .unwrap()
                .iter()
                .map(|c| format!("{} {:?} {:?}\n", c.id, c.delivery, c.state))
                .collect::<String>()
        );
        agent.terminate();
        fleet.wait_device("dev-oc", LONG, "offline", |d| !d.online);
    }
    // Exactly one of each per connection, and the queued ping ran once.
    assert_eq!(all_of(Delivery::OnConnect), 3);
    assert_eq!(all_of(Delivery::Auto), 3);
    let cid = edgebind_protocol::CommandId::new(queued_id).unwrap();
    let q = store.command(&cid).unwrap();
    assert!(q.finished_at.is_some(), "{q:?}");
    assert_eq!(all_of(Delivery::Queued), 1);
}
