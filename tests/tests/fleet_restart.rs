//! The fleet service can be killed at any moment and restarted without
//! losing anything it acknowledged, nor what devices sent while it was down.

mod fleet_support;

use std::collections::BTreeSet;
use std::time::Duration;

use edgebind_fleet::registry::Store;
use edgebind_protocol::DeviceId;
use edgebind_protocol::topics::Topic;
use edgebind_tests::{PubAckReason, QoS, TestClient, wait_until};
use fleet_support::{Fleet, LONG};
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
    assert!(after.telemetry_count >= 500, "{}", after.telemetry_count);
    assert_eq!(after.telemetry.unwrap()["ts"], 499);
    fleet.stop_service();
}
