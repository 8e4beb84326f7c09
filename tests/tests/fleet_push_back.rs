//! Push-back and metrics: a burst well above what the broker may queue for
//! the fleet service ends with nothing dropped and nothing lost, because the
//! service throttles the fleet (a retained fleet-wide message the devices
//! obey) and lifts it when the backlog is gone; the Prometheus endpoint of
//! `fleet serve --metrics` answers and agrees with the registry.

mod fleet_support;

use edgebind_tests::metrics::{metric, scrape};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgebind_agent::throttle::Pacer;
use edgebind_fleet::registry::Store;
use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::now_unix;
use edgebind_protocol::throttle::{self, Throttle};
use edgebind_protocol::topics::{BROKER_RETAINED, BROKER_STORED, Topic};
use edgebind_tests::{PubAckReason, QoS, TestClient, wait_for, wait_until};
use fleet_support::{Fleet, LONG};
use serde_json::{Value, json};

fn telemetry(seq: u64) -> Vec<u8> {
    json!({
        "ts": seq, "cpu_pct": 1.0, "load_avg": [0.0, 0.0, 0.0],
        "mem_total_bytes": 100, "mem_used_bytes": 50,
        "disk_total_bytes": 10, "disk_used_bytes": 5, "uptime_s": seq
    })
    .to_string()
    .into_bytes()
}

fn identity(fleet: &Fleet, id: &str) -> edgebind_tests::Identity {
    let bundle = fleet.home().join("bundles").join(id);
    edgebind_tests::Identity {
        principal: None,
        name: id.into(),
        dir: bundle.clone(),
        cert: bundle.join("device.crt"),
        key: bundle.join("device.key"),
        ca: bundle.join("ca.crt"),
        serial: String::new(),
    }
}

/// Set one global option of the generated mosquitto.conf and restart it.
fn set_broker_option(fleet: &mut Fleet, key: &str, value: &str) {
    let conf = fleet.env.broker.dir().join(edgebind_broker::layout::CONF);
    let text = std::fs::read_to_string(&conf).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} in the generated config"))
        .to_owned();
    std::fs::write(&conf, text.replace(&line, &format!("{key} {value}"))).unwrap();
    fleet.env.broker.restart().unwrap();
    let pid = fleet.env.broker.pid().expect("broker running");
    std::fs::write(
        fleet.env.broker.dir().join(edgebind_broker::layout::PID),
        format!("{pid}\n"),
    )
    .unwrap();
}

/// A device that drains an outbox of telemetry flat out, obeying the
/// fleet-wide throttle with the agent's own pacer. Returns the number of
/// messages the broker acknowledged.
fn drain(
    client: &TestClient,
    topic: &str,
    seqs: std::ops::Range<u64>,
    pacer: &mut Pacer,
    seen: &mut usize,
    throttled: &AtomicBool,
) -> u64 {
    let mut acked = 0;
    for seq in seqs {
        loop {
            let got = client.received();
            for m in &got[*seen..] {
                if m.topic == throttle::TOPIC
                    && pacer.on_message(&m.payload, Instant::now()).is_ok()
                    && pacer.in_force(now_unix()).is_some()
                {
                    throttled.store(true, Ordering::Relaxed);
                }
            }
            *seen = got.len();
            if pacer.allowance(1, Instant::now(), now_unix()) >= 1 {
                pacer.spent(1, now_unix());
                break;
            }
            let wait = pacer
                .next_send_in(Instant::now(), now_unix())
                .unwrap_or_default();
            std::thread::sleep(wait.min(Duration::from_millis(100)));
        }
        let ack = client
            .publish(topic, &telemetry(seq), QoS::AtLeastOnce, false)
            .unwrap();
        assert_eq!(ack, Some(PubAckReason::Success), "the broker took #{seq}");
        acked += 1;
    }
    acked
}

/// Wait until the broker's `$SYS` readings show at least `want` messages
/// waiting (stored, not retained); returns the reading.
fn wait_for_backlog(fleet: &Fleet, want: u64) -> u64 {
    let principal = edgebind_protocol::Principal::from_cn("service:watch").unwrap();
    let dir = edgebind_certs::layout::identity_dir(fleet.home(), &principal);
    let watch = edgebind_tests::Identity::from_dir(
        &dir,
        edgebind_certs::layout::CLIENT_STEM,
        "service:watch",
    );
    let client = TestClient::connect(&watch, &fleet.env.broker).unwrap();
    client.subscribe(BROKER_STORED).unwrap();
    client.subscribe(BROKER_RETAINED).unwrap();
    let latest = |topic: &str| -> Option<u64> {
        let got = client.received();
        let m = got.iter().rev().find(|m| m.topic == topic)?;
        std::str::from_utf8(&m.payload).ok()?.trim().parse().ok()
    };
    let waiting = || Some(latest(BROKER_STORED)?.saturating_sub(latest(BROKER_RETAINED)?));
    let reached = wait_until(LONG, || waiting().is_some_and(|w| w >= want));
    let last = waiting().unwrap_or(0);
    client.disconnect();
    assert!(
        reached,
        "the broker never read {want} waiting (last reading {last})"
    );
    last
}

/// The retained throttle as a device sees it on connecting.
fn retained_throttle(fleet: &Fleet, id: &str) -> Option<Throttle> {
    let probe = TestClient::connect(&identity(fleet, id), &fleet.env.broker).unwrap();
    probe.subscribe(throttle::TOPIC).unwrap();
    let got = probe.wait_for_topic(throttle::TOPIC, Duration::from_secs(5));
    probe.disconnect();
    got.map(|m| Throttle::decode(&m.payload).expect("a valid throttle"))
}

#[test]
fn with_push_back_a_burst_above_the_queue_ends_with_nothing_dropped_or_lost() {
    const DEVICES: u64 = 20;
    // While the service is away, then once it is back: 20,000 in all.
    const QUEUED_FIRST: u64 = 550;
    const AFTER: u64 = 450;
    let mut fleet = Fleet::start();
    // A second service principal reads the broker's counters for the test
    // (connecting as the service's own would take over its session).
    fleet.cli_ok(&["pki", "issue", "service", "watch"]);
    // A budget whose queue (16,000 messages) is smaller than the burst: push
    // back at 8,000, at 50 messages a second per device.
    let out = fleet.cli_ok(&[
        "broker",
        "config",
        "--budget-devices",
        "20",
        "--budget-telemetry-interval-s",
        "1",
        "--budget-outage-s",
        "400",
        "--budget-ingest-per-s",
        "2000",
    ]);
    assert!(
        out.contains("max_queued_messages 16000") && out.contains("push-back at 8000"),
        "{out}"
    );
    set_broker_option(&mut fleet, "sys_interval", "1");
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("sim-{i}")).collect();
    for id in &ids {
        fleet.add_device(id, &[]);
    }
    // The service's session exists, then it is away while the devices drain.
    fleet.start_service();
    fleet.kill9_service();

    let throttled = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let service_back = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = ids
        .iter()
        .map(|id| {
            let client = TestClient::connect(&identity(&fleet, id), &fleet.env.broker).unwrap();
            client.subscribe(throttle::TOPIC).unwrap();
            let topic = Topic::Telemetry(DeviceId::new(id.as_str()).unwrap()).render();
            let (throttled, acked, back) = (throttled.clone(), acked.clone(), service_back.clone());
            std::thread::spawn(move || {
                let mut pacer = Pacer::new(Instant::now());
                let mut seen = 0;
                let n = drain(
                    &client,
                    &topic,
                    0..QUEUED_FIRST,
                    &mut pacer,
                    &mut seen,
                    &throttled,
                );
                acked.fetch_add(n, Ordering::Relaxed);
                while !back.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let n = drain(
                    &client,
                    &topic,
                    QUEUED_FIRST..QUEUED_FIRST + AFTER,
                    &mut pacer,
                    &mut seen,
                    &throttled,
                );
                acked.fetch_add(n, Ordering::Relaxed);
                client.disconnect();
            })
        })
        .collect();
    assert!(
        wait_until(LONG, || acked.load(Ordering::Relaxed)
            == DEVICES * QUEUED_FIRST),
        "the first part of the burst was acknowledged"
    );
    // 11,000 wait at the broker, over the push-back mark. The service drains
    // faster than the devices publish, so what it must see is the broker's
    // reading of the backlog (the retained copy its subscription brings):
    // wait until the broker has published one.
    let queued = DEVICES * QUEUED_FIRST;
    let backlog = wait_for_backlog(&fleet, queued);
    assert!(backlog >= queued, "the broker reads {backlog} waiting");
    // The service comes back and the devices go on flat out.
    fleet.start_service();
    service_back.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let sent = DEVICES * (QUEUED_FIRST + AFTER);
    assert_eq!(acked.load(Ordering::Relaxed), sent);
    assert!(
        throttled.load(Ordering::Relaxed),
        "the devices were throttled; log:\n{}",
        fleet.service_log()
    );

    // Every acknowledged message is in the registry, and the broker dropped none.
    let store = fleet.registry();
    let stored = || -> u64 {
        ids.iter()
            .map(|id| {
                store
                    .device(&DeviceId::new(id.as_str()).unwrap())
                    .unwrap()
                    .telemetry_count
            })
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(120), || stored() == sent),
        "stored {} of {sent}; log:\n{}",
        stored(),
        fleet.service_log()
    );
    let stats =
        || -> Value { serde_json::from_str(&fleet.cli_ok(&["fleet", "stats", "--json"])).unwrap() };
    let dropped = wait_for(LONG, || stats()["broker_dropped"].as_u64())
        .expect("the service read the broker's counter");
    assert_eq!(dropped, 0, "log:\n{}", fleet.service_log());
    // The backlog is gone: the throttle is lifted (the retained message replaced).
    assert!(
        wait_until(LONG, || retained_throttle(&fleet, "sim-0")
            .is_some_and(|t| !t.active)),
        "the throttle was not lifted: {:?}; log:\n{}",
        retained_throttle(&fleet, "sim-0"),
        fleet.service_log()
    );
    let log = fleet.service_log();
    assert!(log.contains("throttling the fleet"), "{log}");
    assert!(wait_until(LONG, || {
        stats()["services"][0]["push_back"] == json!(false)
            && stats()["services"][0]["broker_waiting"].as_u64().is_some()
    }));
    fleet.stop_service();
}

#[test]
fn the_metrics_endpoint_answers_and_agrees_with_the_registry() {
    let mut fleet = Fleet::start();
    set_broker_option(&mut fleet, "sys_interval", "1");
    fleet.add_device("sim-1", &[]);
    fleet.add_device("sim-2", &[]);
    let port = edgebind_tests::cli::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    fleet.start_service_with(&["--metrics", &addr]);
    let device = TestClient::connect(&identity(&fleet, "sim-1"), &fleet.env.broker).unwrap();
    let id = DeviceId::new("sim-1").unwrap();
    device
        .publish(
            &Topic::Status(id.clone()).render(),
            br#"{"state":"online","agent_version":"0.1.0","ts":5}"#,
            QoS::AtLeastOnce,
            true,
        )
        .unwrap();
    const SAMPLES: u64 = 50;
    for seq in 0..SAMPLES {
        device
            .publish(
                &Topic::Telemetry(id.clone()).render(),
                &telemetry(seq),
                QoS::AtLeastOnce,
                false,
            )
            .unwrap();
    }
    // The same sample again: stored once, counted as a duplicate.
    device
        .publish(
            &Topic::Telemetry(id.clone()).render(),
            &telemetry(0),
            QoS::AtLeastOnce,
            false,
        )
        .unwrap();
    let store = fleet.registry();
    assert!(wait_until(LONG, || store
        .device(&id)
        .unwrap()
        .telemetry_count
        == SAMPLES));
    let text = wait_for(LONG, || {
        let t = scrape(port);
        (metric(&t, "edgebind_messages_committed_total{kind=\"telemetry\"}") == Some(51.0)
            && metric(&t, "edgebind_devices{state=\"online\"}") == Some(1.0)
            && metric(&t, "edgebind_broker_dropped_messages").is_some_and(|d| d >= 0.0))
        .then_some(t)
    })
    .unwrap_or_else(|| {
        panic!(
            "metrics never agreed:\n{}\nservice log:\n{}",
            scrape(port),
            fleet.service_log()
        )
    });
    let overview = store.overview(now_unix()).unwrap();
    let stored = store.device(&id).unwrap().telemetry_count as f64;
    let duplicated = metric(
        &text,
        "edgebind_messages_duplicated_total{kind=\"telemetry\"}",
    );
    let committed = metric(
        &text,
        "edgebind_messages_committed_total{kind=\"telemetry\"}",
    );
    assert_eq!(
        committed.zip(duplicated).map(|(c, d)| c - d),
        Some(stored),
        "{text}"
    );
    assert_eq!(duplicated, Some(1.0), "{text}");
    assert_eq!(
        metric(
            &text,
            "edgebind_messages_received_total{kind=\"telemetry\"}"
        ),
        Some(51.0)
    );
    for (state, n) in [
        ("online", overview.online),
        ("never_seen", overview.never_seen),
        ("offline", overview.offline),
        ("revoked", overview.revoked),
    ] {
        assert_eq!(
            metric(&text, &format!("edgebind_devices{{state=\"{state}\"}}")),
            Some(n as f64),
            "{state}: {text}"
        );
    }
    assert_eq!(overview.never_seen, 1, "sim-2 never connected");
    assert_eq!(metric(&text, "edgebind_registry_errors_total"), Some(0.0));
    assert_eq!(metric(&text, "edgebind_lag_messages"), Some(0.0));
    assert!(text.contains("edgebind_commit_seconds_bucket"), "{text}");
    assert!(
        text.contains("# TYPE edgebind_messages_committed counter"),
        "{text}"
    );
    fleet.stop_service();
    // A non-loopback address is refused before anything starts.
    let out = fleet.cli(&["fleet", "serve", "--metrics", "0.0.0.0:9464"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loopback"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
