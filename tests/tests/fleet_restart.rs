//! The fleet service can be killed at any moment and restarted without
//! losing anything it acknowledged, nor what devices sent while it was down.

mod fleet_support;

use std::collections::BTreeSet;
use std::time::Duration;

use edgebind_fleet::registry::Store;
use edgebind_protocol::DeviceId;
use edgebind_protocol::topics::Topic;
use edgebind_tests::{PubAckReason, QoS, TestClient, wait_until};
use fleet_support::{AgentTweaks, Fleet, LONG};
use serde_json::json;

fn telemetry(seq: u64) -> Vec<u8> {
    json!({
        "ts": seq, "cpu_pct": 1.0, "load_avg": [0.0, 0.0, 0.0],
        "mem_total_bytes": 100, "mem_used_bytes": 50,
        "disk_total_bytes": 10, "disk_used_bytes": 5, "uptime_s": seq
    })
    .to_string()
    .into_bytes()
}

fn stored_seqs(fleet: &Fleet, id: &DeviceId) -> BTreeSet<u64> {
    fleet
        .registry()
        .telemetry_history(id, 10_000)
        .unwrap()
        .into_iter()
        .map(|r| r.ts)
        .collect()
}

#[test]
fn killing_the_service_loses_nothing_acknowledged_or_sent_while_it_was_down() {
    let mut fleet = Fleet::start();
    fleet.start_service();
    let bundle = fleet.add_device("sim-1", &["sim"]);
    fleet.cli_ok(&["set", "sim-1", "log_level=debug"]);
    let id = DeviceId::new("sim-1").unwrap();
    // A simulated device: the bundle's certificate, MQTT 5, QoS 1 telemetry.
    let identity = edgebind_tests::Identity {
        principal: None,
        name: "sim-1".into(),
        dir: bundle.clone(),
        cert: bundle.join("device.crt"),
        key: bundle.join("device.key"),
        ca: bundle.join("ca.crt"),
        serial: String::new(),
    };
    let device = TestClient::connect(&identity, &fleet.env.broker).unwrap();
    let topic = Topic::Telemetry(id.clone()).render();
    let send = |range: std::ops::Range<u64>| {
        for seq in range {
            let ack = device
                .publish(&topic, &telemetry(seq), QoS::AtLeastOnce, false)
                .unwrap();
            assert!(
                matches!(
                    ack,
                    Some(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
                ),
                "{ack:?}"
            );
        }
    };

    send(0..200);
    assert!(
        wait_until(LONG, || stored_seqs(&fleet, &id).len() == 200),
        "first 200 stored"
    );
    let before = fleet.registry().device(&id).unwrap();

    // kill -9 in the middle of a stream.
    {
        let topic = topic.clone();
        let device = &device;
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                for seq in 200..400 {
                    device
                        .publish(&topic, &telemetry(seq), QoS::AtLeastOnce, false)
                        .unwrap();
                }
            });
            std::thread::sleep(Duration::from_millis(50));
            fleet.kill9_service();
            h.join().unwrap();
        });
    }
    // While the service is down the broker queues for its persistent session.
    send(400..500);
    let while_down = stored_seqs(&fleet, &id);
    assert!(while_down.len() < 500, "service is down");

    fleet.start_service();
    let all: BTreeSet<u64> = (0..500).collect();
    let complete = wait_until(LONG, || stored_seqs(&fleet, &id) == all);
    let stored = stored_seqs(&fleet, &id);
    let missing: Vec<_> = all.difference(&stored).collect();
    assert!(
        complete,
        "{} of 500 stored after restart, missing {missing:?}\nlog:\n{}",
        stored.len(),
        fleet.service_log()
    );

    // Everything the registry held before is still there.
    let after = fleet.registry().device(&id).unwrap();
    assert_eq!(after.board, before.board);
    assert_eq!(after.tags, before.tags);
    assert_eq!(after.cert, before.cert);
    assert_eq!(after.desired, before.desired);
    assert_eq!(after.desired_revision, 1);
    // Redelivered messages were not stored or counted twice.
    assert_eq!(after.telemetry_count, 500);
    assert_eq!(
        fleet
            .registry()
            .telemetry_history(&id, 10_000)
            .unwrap()
            .len(),
        500
    );
    assert_eq!(after.telemetry.unwrap()["ts"], 499);
    fleet.stop_service();
}

#[test]
fn a_service_killed_for_30_s_under_three_agents_loses_and_duplicates_no_sample() {
    let mut fleet = Fleet::start();
    fleet.start_service();
    let ids = ["agent-a", "agent-b", "agent-c"];
    let configs: Vec<_> = ids
        .iter()
        .map(|id| {
            let bundle = fleet.add_device(id, &[]);
            fleet.agent_config(&bundle, &AgentTweaks::default())
        })
        .collect();
    // The ground truth: an operator watching every sample as it passes the broker.
    let watcher = TestClient::connect(&fleet.env.pki.operator, &fleet.env.broker).unwrap();
    watcher
        .subscribe(&edgebind_protocol::topics::Kind::Telemetry.filter_all())
        .unwrap();
    let mut agents: Vec<_> = configs.iter().map(|c| fleet.spawn_agent(c)).collect();
    for id in ids {
        fleet.wait_device(id, LONG, "sending telemetry", |d| d.telemetry_count >= 2);
    }

    fleet.kill9_service();
    let down = std::time::Instant::now();
    // The outage itself: 30 s of samples at 1 Hz, queued by the broker.
    std::thread::sleep(Duration::from_secs(30));
    fleet.start_service();
    eprintln!("service down for {:?}", down.elapsed());
    for id in ids {
        let seen = fleet
            .registry()
            .device(&DeviceId::new(id).unwrap())
            .unwrap()
            .telemetry_count;
        fleet.wait_device(id, LONG, "more telemetry after the restart", |d| {
            d.telemetry_count >= seen + 3
        });
    }
    for agent in &mut agents {
        agent.terminate();
    }

    let observed = |id: &str| -> BTreeSet<u64> {
        let topic = Topic::Telemetry(DeviceId::new(id).unwrap()).render();
        watcher
            .received()
            .into_iter()
            .filter(|m| m.topic == topic)
            .map(|m| {
                serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()["ts"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    for id in ids {
        let device = DeviceId::new(id).unwrap();
        let want = observed(id);
        assert!(
            want.len() >= 36,
            "{id}: only {} samples observed",
            want.len()
        );
        let complete = wait_until(LONG, || stored_seqs(&fleet, &device).is_superset(&want));
        let stored = stored_seqs(&fleet, &device);
        let missing: Vec<_> = want.difference(&stored).collect();
        assert!(
            complete,
            "{id}: lost {missing:?}\nlog:\n{}",
            fleet.service_log()
        );
        let rows = fleet.registry().telemetry_history(&device, 10_000).unwrap();
        assert_eq!(rows.len(), stored.len(), "{id}: a sample stored twice");
        assert_eq!(
            fleet.registry().device(&device).unwrap().telemetry_count,
            rows.len() as u64,
            "{id}: a sample counted twice"
        );
    }
    fleet.stop_service();
}
