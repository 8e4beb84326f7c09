//! The agent's presence on the broker: retained `online`, the `offline` will
//! on a crash, a clean `offline` on SIGTERM, telemetry at the configured
//! period, and coming back by itself after a broker restart.

#[path = "../src/agent_support.rs"]
mod agent_support;

use std::time::Duration;

use agent_support::{AGENT_DEADLINE, AgentBundle, AgentProcess, AgentSetup, Operator};
use edgebind_protocol::messages::{Presence, Telemetry, now_unix};
use edgebind_protocol::topics::Topic;
use edgebind_tests::{TestClient, TestFleet, wait_for, wait_until};

#[test]
fn agent_comes_online_with_a_retained_status_and_its_will_fires_when_killed() {
    let fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-a", &AgentSetup::default());
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let mut agent = AgentProcess::spawn(&bundle.config);

    let online = op
        .wait_status(|s, _| s.state == Presence::Online)
        .unwrap_or_else(|| panic!("no online status; agent stderr:\n{}", agent.stderr()));
    assert_eq!(
        online.agent_version.as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert!(online.boot_id.as_deref().is_some_and(|b| !b.is_empty()));
    assert!(online.uptime_s.is_some());

    // A late subscriber gets it as a retained message. (One connection per
    // CN: the first operator connection must go before the next one comes.)
    let topic = op.status_topic();
    drop(op);
    let late = TestClient::connect(&fleet.pki.operator, &fleet.broker).unwrap();
    late.subscribe(&topic).unwrap();
    let retained = late
        .wait_for_topic(&topic, AGENT_DEADLINE)
        .expect("retained status");
    assert!(retained.retain);
    assert!(String::from_utf8_lossy(&retained.payload).contains("online"));

    agent.kill9();
    let will = late
        .wait_for_message(AGENT_DEADLINE, |m| {
            m.topic == topic && String::from_utf8_lossy(&m.payload).contains("offline")
        })
        .unwrap_or_else(|| panic!("no will after kill -9; broker log:\n{}", fleet.broker.log()));
    let will: edgebind_protocol::messages::Status = serde_json::from_slice(&will.payload).unwrap();
    assert_eq!(will.ts, None, "the will, not a clean offline");
    drop(late);
    let later = TestClient::connect(&fleet.pki.operator, &fleet.broker).unwrap();
    later.subscribe(&topic).unwrap();
    let m = later
        .wait_for_topic(&topic, AGENT_DEADLINE)
        .expect("retained will");
    assert!(m.retain && String::from_utf8_lossy(&m.payload).contains("offline"));
}

#[test]
fn sigterm_publishes_offline_and_exits_zero() {
    let fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-t", &AgentSetup::default());
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let mut agent = AgentProcess::spawn(&bundle.config);
    op.wait_status(|s, _| s.state == Presence::Online)
        .unwrap_or_else(|| panic!("no online status; agent stderr:\n{}", agent.stderr()));

    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(AGENT_DEADLINE)
        .expect("agent exits on SIGTERM");
    assert_eq!(status.code(), Some(0), "stderr:\n{}", agent.stderr());
    // The clean offline carries a timestamp; the will does not.
    let offline = op
        .wait_status(|s, _| s.state == Presence::Offline)
        .expect("offline status on SIGTERM");
    assert!(
        offline.ts.is_some(),
        "offline came from the agent, not the will"
    );
    // A clean DISCONNECT: the broker logs it as such.
    assert!(
        fleet.broker.log().contains("Client dev-t disconnected"),
        "broker log:\n{}",
        fleet.broker.log()
    );
}

#[test]
fn telemetry_arrives_at_the_configured_period() {
    let fleet = TestFleet::start();
    let setup = AgentSetup {
        telemetry_interval_s: 2,
        ..AgentSetup::default()
    };
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-tm", &setup);
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let agent = AgentProcess::spawn(&bundle.config);
    let topic = Topic::Telemetry(bundle.id.clone()).render();

    let samples: Vec<Telemetry> = wait_for(Duration::from_secs(30), || {
        let got: Vec<Telemetry> = op
            .client
            .received()
            .into_iter()
            .filter(|m| m.topic == topic)
            .map(|m| serde_json::from_slice(&m.payload).expect("telemetry decodes"))
            .collect();
        (got.len() >= 4).then_some(got)
    })
    .unwrap_or_else(|| {
        panic!(
            "fewer than 4 telemetry samples; stderr:\n{}",
            agent.stderr()
        )
    });

    let span = samples[3].ts - samples[0].ts;
    // Three periods of 2 s, with one second of timestamp resolution either way.
    assert!((4..=8).contains(&span), "3 periods took {span} s");
    let s = &samples[3];
    assert!(s.mem_total_bytes > 0 && s.mem_used_bytes > 0);
    assert!(s.disk_total_bytes > 0, "disk of the state dir is reported");
    assert!(s.uptime_s > 0);
    assert!((0.0..=100.0).contains(&s.cpu_pct));
}

#[test]
fn after_a_broker_restart_the_agent_comes_back_online_by_itself() {
    let mut fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-r", &AgentSetup::default());
    let agent = AgentProcess::spawn(&bundle.config);
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let first = op
        .wait_status(|s, _| s.state == Presence::Online)
        .unwrap_or_else(|| panic!("no online status; agent stderr:\n{}", agent.stderr()));
    let first_ts = first.ts.expect("online has ts");
    // Let the clock pass the first status' second so the next one is newer.
    assert!(wait_until(Duration::from_secs(3), || now_unix() > first_ts));
    drop(op);

    fleet.broker.restart().expect("broker restarts");
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    op.wait_status(|s, _| s.state == Presence::Online && s.ts.is_some_and(|t| t > first_ts))
        .unwrap_or_else(|| {
            panic!(
                "agent did not come back online; agent stderr:\n{}",
                agent.stderr()
            )
        });
    // And it serves commands again.
    op.send("after-restart", "ping", "");
    op.wait_result(
        "after-restart",
        edgebind_protocol::messages::CommandStatus::Succeeded,
    )
    .expect("ping answered after the broker restart");
}

#[test]
fn an_agent_kicked_by_a_duplicate_connection_reconnects_by_itself() {
    let fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-dup", &AgentSetup::default());
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let agent = AgentProcess::spawn(&bundle.config);
    op.wait_status(|s, _| s.state == Presence::Online)
        .unwrap_or_else(|| panic!("agent not online; stderr:\n{}", agent.stderr()));
    op.client.clear();

    // Another connection with the same certificate: the broker accepts it
    // and closes the agent's session (the agent's will fires).
    let same = edgebind_tests::Identity {
        principal: None,
        name: bundle.id.to_string(),
        dir: bundle.dir.clone(),
        cert: bundle.dir.join("device.crt"),
        key: bundle.dir.join("device.key"),
        ca: bundle.dir.join("ca.crt"),
        serial: String::new(),
    };
    let intruder = TestClient::connect(&same, &fleet.broker).expect("duplicate connects");
    op.wait_status(|s, _| s.state == Presence::Offline)
        .expect("the kicked agent's will");
    // The agent reconnects after its backoff, taking the session back.
    op.wait_status(|s, _| s.state == Presence::Online)
        .unwrap_or_else(|| panic!("agent did not come back; stderr:\n{}", agent.stderr()));
    assert!(
        intruder.wait_disconnected(AGENT_DEADLINE),
        "the duplicate was closed in turn"
    );
    let log = agent.stderr();
    assert!(log.contains("connection to broker lost"), "{log}");
    assert!(log.matches("connected to broker").count() >= 2, "{log}");
}

#[test]
fn without_a_broker_the_agent_keeps_retrying_and_still_stops_promptly() {
    let mut fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-nb", &AgentSetup::default());
    fleet.broker.stop();
    let mut agent = AgentProcess::spawn(&bundle.config);
    assert!(
        wait_until(AGENT_DEADLINE, || agent
            .stderr()
            .matches("cannot connect to broker")
            .count()
            >= 3),
        "retries are logged:\n{}",
        agent.stderr()
    );
    let asked = std::time::Instant::now();
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(AGENT_DEADLINE).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", agent.stderr());
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
}

#[test]
fn systemd_gets_ready_watchdog_and_stopping_notifications() {
    use std::os::unix::net::UnixDatagram;
    let fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-sd", &AgentSetup::default());
    let sock_path = bundle.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let sock_env = sock_path.to_str().unwrap().to_owned();
    let mut agent = AgentProcess::spawn_with_env(
        &bundle.config,
        &[
            ("NOTIFY_SOCKET", sock_env.as_str()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    // Collect datagrams until `done(all so far)` holds.
    let mut read_until = |done: &dyn Fn(&str) -> bool, seen: &mut String| {
        wait_until(AGENT_DEADLINE, || {
            if let Ok(n) = sock.recv(&mut buf) {
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                seen.push('\n');
            }
            done(seen)
        })
    };
    assert!(
        read_until(&|s| s.contains("READY=1"), &mut seen),
        "{seen}\n{}",
        agent.stderr()
    );
    assert!(
        read_until(&|s| s.contains("STATUS=connected"), &mut seen),
        "{seen}"
    );
    // Every WATCHDOG_USEC / 2 = 200 ms from the main loop.
    assert!(
        read_until(&|s| s.matches("WATCHDOG=1").count() >= 3, &mut seen),
        "{seen}"
    );
    agent.signal(libc::SIGTERM);
    assert!(
        read_until(&|s| s.contains("STOPPING=1"), &mut seen),
        "{seen}"
    );
    assert_eq!(
        agent.wait_exit(AGENT_DEADLINE).and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn a_broker_certificate_without_the_configured_name_is_not_trusted() {
    let fleet = TestFleet::start();
    let setup = AgentSetup {
        server_name: Some("broker.elsewhere.example".into()),
        ..AgentSetup::default()
    };
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-name", &setup);
    let agent = AgentProcess::spawn(&bundle.config);
    assert!(
        wait_until(AGENT_DEADLINE, || agent
            .stderr()
            .matches("cannot connect to broker")
            .count()
            >= 2),
        "{}",
        agent.stderr()
    );
    let log = agent.stderr();
    assert!(log.contains("certificate not valid for name"), "{log}");
    assert!(!log.contains("connected to broker broker="), "{log}");
}
