//! Remote actions through the real broker: each action round-trips, bad
//! commands are rejected while the agent keeps serving, a command id runs at
//! most once (also across an agent restart and a reboot), desired settings
//! are applied and reported.

#[path = "../src/agent_support.rs"]
mod agent_support;

use std::time::Duration;

use agent_support::{AGENT_DEADLINE, AgentBundle, AgentProcess, AgentSetup, Operator};
use edgebind_protocol::messages::{
    CommandStatus, Inventory, MAX_COMMAND_BYTES, Presence, Reported, Telemetry, now_unix,
};
use edgebind_protocol::topics::Topic;
use edgebind_tests::{QoS, TestFleet, wait_for};

/// A fleet with one running agent and an operator watching it.
struct Rig {
    _agent: AgentProcess,
    bundle: AgentBundle,
    op: Operator,
    fleet: TestFleet,
}

fn rig(id: &str, setup: AgentSetup) -> Rig {
    let fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, id, &setup);
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let agent = AgentProcess::spawn(&bundle.config);
    op.wait_status(|s, _| s.state == Presence::Online)
        .unwrap_or_else(|| panic!("agent not online; stderr:\n{}", agent.stderr()));
    Rig {
        _agent: agent,
        bundle,
        op,
        fleet,
    }
}

fn statuses(op: &Operator, id: &str) -> Vec<CommandStatus> {
    op.results(id).into_iter().map(|r| r.status).collect()
}

#[test]
fn ping_and_inventory_round_trip_with_accepted_then_succeeded() {
    let r = rig("dev-p", AgentSetup::default());
    r.op.send("p1", "ping", "");
    let done =
        r.op.wait_result("p1", CommandStatus::Succeeded)
            .expect("ping succeeded");
    assert_eq!(
        statuses(&r.op, "p1"),
        [CommandStatus::Accepted, CommandStatus::Succeeded]
    );
    assert_eq!(done.output.unwrap()["pong"], true);

    r.op.send("i1", "inventory", "");
    let inv =
        r.op.wait_result("i1", CommandStatus::Succeeded)
            .expect("inventory succeeded");
    let inv: Inventory = serde_json::from_value(inv.output.expect("inventory output")).unwrap();
    assert_eq!(inv.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(inv.kernel.is_some_and(|k| !k.is_empty()));
    assert!(inv.boot_id.is_some());
}

#[test]
fn reboot_runs_the_configured_method_once_and_is_accepted() {
    let r = rig("dev-rb", AgentSetup::default());
    r.op.send("rb1", "reboot", "");
    r.op.wait_result("rb1", CommandStatus::Accepted)
        .expect("reboot accepted");
    assert!(
        wait_for(AGENT_DEADLINE, || (r.bundle.reboots() == 1).then_some(())).is_some(),
        "the reboot command ran"
    );
    // `succeeded` only comes with a new boot id (see the reboot test below).
    assert!(!statuses(&r.op, "rb1").iter().any(|s| s.is_final()));
}

#[test]
fn restart_agent_reports_success_then_exits_75_for_systemd() {
    let fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-rs", &AgentSetup::default());
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let mut agent = AgentProcess::spawn(&bundle.config);
    op.wait_status(|s, _| s.state == Presence::Online)
        .unwrap_or_else(|| panic!("agent not online; stderr:\n{}", agent.stderr()));
    op.send("rs1", "restart-agent", "");
    let status = agent.wait_exit(AGENT_DEADLINE).expect("agent exits");
    assert_eq!(status.code(), Some(75), "stderr:\n{}", agent.stderr());
    op.wait_result("rs1", CommandStatus::Succeeded)
        .expect("succeeded published before exiting");
    assert_eq!(
        statuses(&op, "rs1"),
        [CommandStatus::Accepted, CommandStatus::Succeeded]
    );
    // What systemd would do: start it again. The id is not run twice.
    op.client.clear();
    let again = AgentProcess::spawn(&bundle.config);
    op.wait_status(|s, _| s.state == Presence::Online)
        .unwrap_or_else(|| panic!("not back online; stderr:\n{}", again.stderr()));
    op.send("rs1", "restart-agent", "");
    op.send("after", "ping", "");
    op.wait_result("after", CommandStatus::Succeeded)
        .expect("serving");
    // SAFETY: signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(again.pid() as libc::pid_t, 0) == 0 };
    assert!(
        alive,
        "a redelivered restart-agent must not restart it again"
    );
    assert_eq!(
        statuses(&op, "rs1"),
        [CommandStatus::Succeeded],
        "the recorded result is repeated"
    );
}

#[test]
fn malformed_unknown_expired_and_oversized_commands_are_rejected_while_serving() {
    let r = rig("dev-bad", AgentSetup::default());
    let expired = format!(
        r#"{{"id":"c-exp","action":"ping","expires_at":{}}}"#,
        now_unix() - 60
    );
    let mut oversized = br#"{"id":"c-big","action":"ping","args":{"pad":""#.to_vec();
    oversized.resize(MAX_COMMAND_BYTES + 1024, b'x');
    oversized.extend_from_slice(br#""}}"#);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("c-mal", b"{this is not json".to_vec(), "malformed"),
        (
            "c-unk",
            br#"{"id":"c-unk","action":"format-disk"}"#.to_vec(),
            "format-disk",
        ),
        ("c-exp", expired.into_bytes(), "expired"),
        ("c-big", oversized, "limited to"),
        ("c-bin", vec![0xff, 0xfe, 0x00, 0x01], "malformed"),
    ];
    for (id, payload, why) in &cases {
        r.op.send_raw(id, payload);
        let rej =
            r.op.wait_result(id, CommandStatus::Rejected)
                .unwrap_or_else(|| panic!("{id} not rejected"));
        let reason = rej.reason.unwrap_or_default();
        assert!(
            reason.contains(why),
            "{id}: reason {reason:?} lacks {why:?}"
        );
        assert_eq!(statuses(&r.op, id), [CommandStatus::Rejected], "{id}");
        // Still serving after each one.
        let ping = format!("{id}-then-ping");
        r.op.send(&ping, "ping", "");
        r.op.wait_result(&ping, CommandStatus::Succeeded)
            .unwrap_or_else(|| panic!("agent stopped serving after {id}"));
    }
    assert_eq!(r.bundle.reboots(), 0);
}

#[test]
fn a_redelivered_command_id_runs_once_also_after_an_agent_restart() {
    let fleet = TestFleet::start();
    let bundle = AgentBundle::new(
        &fleet.pki,
        &fleet.broker,
        "dev-once",
        &AgentSetup::default(),
    );
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let mut agent = AgentProcess::spawn(&bundle.config);
    op.wait_status(|s, _| s.state == Presence::Online)
        .unwrap_or_else(|| panic!("agent not online; stderr:\n{}", agent.stderr()));

    op.send("once", "reboot", "");
    op.wait_result("once", CommandStatus::Accepted)
        .expect("accepted");
    assert!(wait_for(AGENT_DEADLINE, || (bundle.reboots() == 1).then_some(())).is_some());

    // The same id again, to the same process: answered, not run.
    op.client.clear();
    op.send("once", "reboot", "");
    op.wait_result("once", CommandStatus::Accepted)
        .expect("answer repeated");

    // Crash and come back (same boot): still not run.
    agent.kill9();
    let agent = AgentProcess::spawn(&bundle.config);
    op.wait_status(|s, r| s.state == Presence::Online && !r)
        .unwrap_or_else(|| panic!("agent not online again; stderr:\n{}", agent.stderr()));
    op.client.clear();
    op.send("once", "reboot", "");
    op.wait_result("once", CommandStatus::Accepted)
        .expect("answer repeated after restart");
    // Give a second run every chance to show up before counting.
    op.send("barrier", "ping", "");
    op.wait_result("barrier", CommandStatus::Succeeded)
        .expect("serving");
    assert_eq!(bundle.reboots(), 1, "reboot ran exactly once");
}

#[test]
fn a_reboot_is_reported_succeeded_once_the_device_is_back_with_a_new_boot_id() {
    let fleet = TestFleet::start();
    let bundle = AgentBundle::new(
        &fleet.pki,
        &fleet.broker,
        "dev-boot",
        &AgentSetup::default(),
    );
    let boot_file = bundle.dir.join("boot_id");
    std::fs::write(&boot_file, "boot-1\n").unwrap();
    let boot_env = boot_file.to_str().unwrap().to_owned();
    let env = [("EDGEBIND_BOOT_ID_FILE", boot_env.as_str())];
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let mut agent = AgentProcess::spawn_with_env(&bundle.config, &env);
    op.wait_status(|s, _| s.boot_id.as_deref() == Some("boot-1"))
        .unwrap_or_else(|| panic!("agent not online; stderr:\n{}", agent.stderr()));
    op.send("rb", "reboot", "");
    op.wait_result("rb", CommandStatus::Accepted)
        .expect("accepted");
    assert!(wait_for(AGENT_DEADLINE, || (bundle.reboots() == 1).then_some(())).is_some());

    // "Reboot": the process dies, the device comes back with a new boot id.
    agent.kill9();
    std::fs::write(&boot_file, "boot-2\n").unwrap();
    let _agent = AgentProcess::spawn_with_env(&bundle.config, &env);
    let done = op
        .wait_result("rb", CommandStatus::Succeeded)
        .expect("succeeded after the reboot");
    let out = done.output.expect("output names the boots");
    assert_eq!(out["previous_boot_id"], "boot-1");
    assert_eq!(out["boot_id"], "boot-2");
    // A late redelivery of the same reboot does not reboot again.
    op.send("rb", "reboot", "");
    op.send("barrier", "ping", "");
    op.wait_result("barrier", CommandStatus::Succeeded)
        .expect("serving");
    assert_eq!(bundle.reboots(), 1);
}

#[test]
fn desired_settings_change_the_telemetry_period_and_are_reported() {
    let r = rig("dev-set", AgentSetup::default()); // 60 s telemetry by config
    let desired =
        br#"{"revision":1,"settings":{"telemetry_interval_s":1,"log_level":"debug","bogus":1}}"#;
    let topic = Topic::Desired(r.bundle.id.clone()).render();
    r.op.client
        .publish(&topic, desired, QoS::AtLeastOnce, true)
        .expect("publish desired");
    let reported_topic = Topic::Reported(r.bundle.id.clone()).render();
    let rep =
        r.op.client
            .wait_for_topic(&reported_topic, AGENT_DEADLINE)
            .expect("reported");
    let rep: Reported = serde_json::from_slice(&rep.payload).unwrap();
    assert_eq!(rep.revision, 1);
    assert_eq!(rep.applied["telemetry_interval_s"], 1);
    assert!(rep.ignored.contains_key("bogus"));
    // Telemetry now flows every second although the file says 60.
    let tele = Topic::Telemetry(r.bundle.id.clone()).render();
    let samples = wait_for(Duration::from_secs(15), || {
        let n =
            r.op.client
                .received()
                .iter()
                .filter(|m| m.topic == tele)
                .count();
        (n >= 3).then_some(n)
    });
    assert!(samples.is_some(), "telemetry at the desired 1 s period");
    let m = r.op.client.wait_for_topic(&tele, AGENT_DEADLINE).unwrap();
    let _: Telemetry = serde_json::from_slice(&m.payload).unwrap();
    // Persisted under the state directory for the next start.
    assert!(r.bundle.state_dir.join("settings.json").is_file());
    drop(r.fleet);
}

#[test]
fn a_command_sent_while_the_agent_is_down_runs_when_it_comes_back() {
    let fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-q", &AgentSetup::default());
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let mut agent = AgentProcess::spawn(&bundle.config);
    op.wait_status(|s, _| s.state == Presence::Online)
        .unwrap_or_else(|| panic!("agent not online; stderr:\n{}", agent.stderr()));
    agent.kill9();
    op.wait_status(|s, _| s.state == Presence::Offline)
        .expect("offline");

    // The persistent session queues it at the broker.
    op.send("queued", "ping", "");
    let back = AgentProcess::spawn(&bundle.config);
    op.wait_result("queued", CommandStatus::Succeeded)
        .unwrap_or_else(|| panic!("queued command not run; stderr:\n{}", back.stderr()));
    assert!(
        back.stderr().contains("session_present=true"),
        "{}",
        back.stderr()
    );
}
