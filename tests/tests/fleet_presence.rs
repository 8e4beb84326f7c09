//! Devices appear online and offline in the registry, and their telemetry lands there.

mod fleet_support;

use std::time::{Duration, Instant};

use edgebind_fleet::registry::{Lifecycle, Store};
use edgebind_protocol::DeviceId;
use fleet_support::{AgentTweaks, Fleet, LONG, stderr};

#[test]
fn agent_shows_online_with_telemetry_then_offline_within_one_and_a_half_keepalives_of_kill9() {
    let mut fleet = Fleet::start();
    fleet.start_service();
    let bundle = fleet.add_device("dev-a", &["lab"]);
    let before = fleet.wait_device("dev-a", LONG, "registered", |d| {
        d.lifecycle == Lifecycle::Registered
    });
    assert!(!before.online);
    assert!(before.cert.is_some(), "device add records the certificate");

    let tweaks = AgentTweaks::default();
    let config = fleet.agent_config(&bundle, &tweaks);
    let mut agent = fleet.spawn_agent(&config);

    let d = fleet.wait_device("dev-a", LONG, "online", |d| d.online);
    assert_eq!(d.lifecycle, Lifecycle::Provisioned);
    assert!(
        d.agent_version.is_some(),
        "status carries the agent version"
    );
    assert!(d.last_seen.is_some());

    // Telemetry arrives every second: a few samples, with the latest kept.
    let d = fleet.wait_device("dev-a", LONG, "3 telemetry samples", |d| {
        d.telemetry_count >= 3
    });
    let latest = d.telemetry.expect("latest telemetry");
    assert!(latest.get("cpu_pct").is_some(), "{latest}");
    assert!(latest.get("mem_total_bytes").is_some(), "{latest}");
    let store = fleet.registry();
    let history = store
        .telemetry_history(&DeviceId::new("dev-a").unwrap(), 100)
        .unwrap();
    assert!(history.len() >= 3);

    // The list shows it online with CPU/memory.
    let table = fleet.cli_ok(&["devices"]);
    let row = table.lines().find(|l| l.starts_with("dev-a")).expect("row");
    assert!(
        row.contains("online") && row.contains("qemux86-64"),
        "{row}"
    );
    assert!(row.contains("MiB"), "memory column filled: {row}");
    let json: serde_json::Value =
        serde_json::from_str(&fleet.cli_ok(&["device", "list", "--json"])).unwrap();
    assert_eq!(json[0]["id"], "dev-a");
    assert_eq!(json[0]["online"], true);

    // kill -9: the broker publishes the will after 1.5 keep-alives.
    let killed = Instant::now();
    agent.kill9();
    let limit = Duration::from_secs_f64(tweaks.keep_alive_s as f64 * 1.5);
    fleet.wait_device("dev-a", limit + Duration::from_secs(5), "offline", |d| {
        !d.online
    });
    let took = killed.elapsed();
    eprintln!(
        "offline recorded {took:?} after kill -9 (keep-alive {}s)",
        tweaks.keep_alive_s
    );
    // Allow 1 s for the service's batch and our polling on a loaded machine.
    assert!(
        took <= limit + Duration::from_secs(1),
        "offline after {took:?}, more than 1.5 keep-alives ({limit:?}) + 1 s"
    );

    // A device that hangs with its connection open (SIGSTOP: no FIN, no
    // PINGREQ) is only noticed through the keep-alive. MQTT says 1.5
    // keep-alives; Mosquitto 2.0.11 measurably takes about 2 keep-alives
    // plus up to a second (same with mosquitto_sub -k 5 and no Edgebind code
    // involved), so the bound here is the broker's, with 3 s for the service
    // and a loaded machine.
    let mut agent = fleet.spawn_agent(&config);
    fleet.wait_device("dev-a", LONG, "online again", |d| d.online);
    let frozen = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(agent.child.id() as libc::pid_t, libc::SIGSTOP);
    }
    let hung_limit = Duration::from_secs(tweaks.keep_alive_s * 2 + 1);
    fleet.wait_device(
        "dev-a",
        hung_limit + Duration::from_secs(10),
        "offline",
        |d| !d.online,
    );
    let took = frozen.elapsed();
    eprintln!(
        "offline recorded {took:?} after SIGSTOP (keep-alive {}s)",
        tweaks.keep_alive_s
    );
    assert!(
        took <= hung_limit + Duration::from_secs(3),
        "offline after {took:?}: broker bound {hung_limit:?} + 3 s"
    );
    agent.kill9();

    // A clean restart comes back online; a clean stop goes offline at once.
    let mut agent = fleet.spawn_agent(&config);
    fleet.wait_device("dev-a", LONG, "online again", |d| d.online);
    let stopped = Instant::now();
    agent.terminate();
    fleet.wait_device("dev-a", LONG, "offline after SIGTERM", |d| !d.online);
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
    fleet.stop_service();
}

#[test]
fn messages_from_devices_not_in_the_registry_are_ignored_and_logged_once() {
    let mut fleet = Fleet::start();
    fleet.start_service();
    // A certificate from the fleet PKI but never registered.
    let stranger = fleet.env.pki.device("stranger");
    let client = edgebind_tests::TestClient::connect(&stranger, &fleet.env.broker).unwrap();
    let status = br#"{"state":"online","agent_version":"x","ts":1}"#;
    for _ in 0..3 {
        let ack = client
            .publish(
                "edgebind/v2/status/stranger",
                status,
                edgebind_tests::QoS::AtLeastOnce,
                false,
            )
            .unwrap();
        assert!(
            matches!(
                ack,
                Some(edgebind_tests::PubAckReason::Success)
                    | Some(edgebind_tests::PubAckReason::NoMatchingSubscribers)
            ),
            "{ack:?}"
        );
    }
    let logged =
        edgebind_tests::wait_until(LONG, || fleet.service_log().contains("not in the registry"));
    assert!(logged, "service log:\n{}", fleet.service_log());
    assert_eq!(
        fleet.service_log().matches("not in the registry").count(),
        1,
        "logged once"
    );
    let store = fleet.registry();
    assert!(store.device(&DeviceId::new("stranger").unwrap()).is_err());
    assert_eq!(store.stats().unwrap().devices, 0);
    fleet.stop_service();
}

/// Presence is honest: while the fleet service runs, `devices` shows it as
/// current; once the service stops, the same rows say their presence is
/// stale and since when (the device still "online" there is not known to be).
#[test]
fn presence_is_marked_stale_once_the_fleet_service_stops() {
    let mut fleet = Fleet::start();
    let bundle = fleet.add_device("dev-p", &[]);
    let config = fleet.agent_config(&bundle, &AgentTweaks::default());
    let _agent = fleet.spawn_agent(&config);
    fleet.start_service();
    fleet.wait_device("dev-p", LONG, "online", |d| d.online);

    let rows = |fleet: &Fleet| -> (serde_json::Value, String) {
        let out = fleet.cli(&["devices", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        (
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()[0].clone(),
            stderr(&out),
        )
    };
    let (row, note) = rows(&fleet);
    assert_eq!(row["online"], true);
    assert_eq!(row["presence_stale"], false, "{row}");
    assert!(!note.contains("stale"), "{note}");

    fleet.stop_service();
    let (row, note) = rows(&fleet);
    assert_eq!(row["presence_stale"], true, "{row}");
    assert!(
        note.contains("presence is stale") && note.contains("fleet serve"),
        "{note}"
    );
    let show = fleet.cli_ok(&["device", "show", "dev-p"]);
    assert!(show.contains("presence is stale"), "{show}");
}
