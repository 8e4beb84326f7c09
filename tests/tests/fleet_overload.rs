//! Overload is never silent: when Mosquitto drops messages it already
//! acknowledged to devices (a full queue), the fleet service reads the
//! broker's counter, logs it loudly and `edgebind fleet stats` shows it; the
//! service may read the `$SYS` counters it needs (dropped, stored and
//! retained messages) and nothing else of `$SYS`.

mod fleet_support;

use std::time::Duration;

use edgebind_fleet::registry::Store;
use edgebind_protocol::DeviceId;
use edgebind_protocol::topics::{BROKER_COUNTERS, BROKER_DROPPED, Topic};
use edgebind_tests::{PubAckReason, QoS, TestClient, wait_for, wait_until};
use fleet_support::{Fleet, LONG};
use serde_json::{Value, json};

/// Rewrite global options of the generated mosquitto.conf and restart it.
fn broker_with(fleet: &mut Fleet, options: &[(&str, &str)]) {
    let conf = fleet.env.broker.dir().join(edgebind_broker::layout::CONF);
    let mut text = std::fs::read_to_string(&conf).unwrap();
    for (key, value) in options {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in the generated config"))
            .to_owned();
        text = text.replace(&line, &format!("{key} {value}"));
    }
    std::fs::write(&conf, text).unwrap();
    fleet.env.broker.restart().unwrap();
    let pid = fleet.env.broker.pid().expect("broker running");
    std::fs::write(
        fleet.env.broker.dir().join(edgebind_broker::layout::PID),
        format!("{pid}\n"),
    )
    .unwrap();
}

fn telemetry(seq: u64) -> Vec<u8> {
    json!({
        "ts": seq, "cpu_pct": 1.0, "load_avg": [0.0, 0.0, 0.0],
        "mem_total_bytes": 100, "mem_used_bytes": 50,
        "disk_total_bytes": 10, "disk_used_bytes": 5, "uptime_s": seq
    })
    .to_string()
    .into_bytes()
}

#[test]
fn a_broker_drop_is_counted_and_reported_never_silent() {
    let mut fleet = Fleet::start();
    broker_with(
        &mut fleet,
        &[("max_queued_messages", "50"), ("sys_interval", "1")],
    );
    let bundle = fleet.add_device("sim-1", &[]);
    // The service's session exists, then the service is away: its queue fills.
    fleet.start_service();
    fleet.kill9_service();
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
    let topic = Topic::Telemetry(DeviceId::new("sim-1").unwrap()).render();
    const SENT: u64 = 200;
    for seq in 0..SENT {
        let ack = device
            .publish(&topic, &telemetry(seq), QoS::AtLeastOnce, false)
            .unwrap();
        assert_eq!(ack, Some(PubAckReason::Success), "the broker took #{seq}");
    }

    fleet.start_service();
    let stats =
        || -> Value { serde_json::from_str(&fleet.cli_ok(&["fleet", "stats", "--json"])).unwrap() };
    wait_for(LONG, || {
        stats()["broker_dropped"].as_u64().filter(|d| *d > 0)
    })
    .unwrap_or_else(|| panic!("no drop reported; log:\n{}", fleet.service_log()));
    // Every acknowledged sample is either stored or counted as dropped.
    let store = fleet.registry();
    let id = DeviceId::new("sim-1").unwrap();
    assert!(
        wait_until(LONG, || {
            let stored = store.device(&id).unwrap().telemetry_count;
            let dropped = stats()["broker_dropped"].as_u64().unwrap_or(0);
            stored + dropped == SENT
        }),
        "stored {} + dropped {} != {SENT}",
        store.device(&id).unwrap().telemetry_count,
        stats()["broker_dropped"]
    );
    // The first reading can be a retained $SYS value from a tick while the
    // burst was still arriving (seen: 76 of ~150); once stored + dropped
    // add up, the counter is the settled one.
    let dropped = stats()["broker_dropped"].as_u64().unwrap_or(0);
    assert!(
        dropped >= SENT - 60,
        "about 150 must have been dropped, {dropped} reported"
    );
    let log = fleet.service_log();
    assert!(log.contains("dropped"), "the service log says so:\n{log}");
    let text = fleet.cli_ok(&["fleet", "stats"]);
    assert!(
        text.contains("broker dropped") && text.contains("acknowledged device data may be lost"),
        "{text}"
    );
    fleet.stop_service();
}

#[test]
fn the_service_reads_its_counters_and_no_other_sys_topic() {
    let mut fleet = Fleet::start();
    broker_with(&mut fleet, &[("sys_interval", "1")]);
    let service = TestClient::connect(&fleet.env.pki.service, &fleet.env.broker).unwrap();
    service.subscribe("$SYS/#").unwrap();
    let operator = TestClient::connect(&fleet.env.pki.operator, &fleet.env.broker).unwrap();
    operator.subscribe("$SYS/#").unwrap();
    operator.subscribe(BROKER_DROPPED).unwrap();
    assert!(
        service
            .wait_for_topic(BROKER_DROPPED, Duration::from_secs(20))
            .is_some(),
        "the service gets the counter"
    );
    // Two more publication rounds of every $SYS topic.
    std::thread::sleep(Duration::from_secs(3));
    let topics: std::collections::BTreeSet<String> =
        service.received().into_iter().map(|m| m.topic).collect();
    let wanted: std::collections::BTreeSet<String> =
        BROKER_COUNTERS.iter().map(|t| (*t).to_owned()).collect();
    assert_eq!(topics, wanted);
    assert!(operator.received().is_empty(), "{:?}", operator.received());
}
