//! The agent's outbox and state recovery, against a real Mosquitto and real
//! agent processes: telemetry sampled while the broker is down arrives, in
//! order, also across a `kill -9` of the agent; a final result journaled
//! during an outage is published once the broker is back even when the
//! outbox file is gone; random bytes in the middle of every state file cost
//! only the damaged records and are reported, and no content of the state
//! files makes the agent refuse to start.
//!
//! The outage is the issue's scenario: [`OUTAGE_S`] (60 s) at 1 Hz (the
//! fastest the configuration allows); the kill -9 case takes half of it.
//! The drop policy of a full outbox is unit-tested in `agent/src/outbox.rs`
//! and `core.rs`.

#[path = "../src/agent_support.rs"]
mod agent_support;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use agent_support::{
    AGENT_DEADLINE, AgentBundle, AgentProcess, AgentSetup, Collector, Operator, eventually,
};
use edgebind_agent::outbox::{Class, OUTBOX_FILE_NAME, decode};
use edgebind_protocol::messages::{
    CommandResult, CommandStatus, Event, Telemetry, events, now_unix,
};
use edgebind_protocol::topics::{Kind, Topic};
use edgebind_protocol::{CommandId, DeviceId};
use edgebind_tests::{TestFleet, wait_for};

/// Length of the simulated outage, in samples at 1 Hz.
const OUTAGE_S: usize = 60;
/// Everything queued must be out well within this once the broker is back.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);

fn one_hz() -> AgentSetup {
    AgentSetup {
        telemetry_interval_s: 1,
        ..AgentSetup::default()
    }
}

/// Telemetry records in the agent's outbox file right now.
fn queued_samples(bundle: &AgentBundle) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(bundle.state_dir.join(OUTBOX_FILE_NAME)).unwrap_or_default();
    decode(&bytes)
        .records
        .into_iter()
        .filter(|r| r.class == Class::Telemetry)
        .map(|r| r.payload)
        .collect()
}

fn telemetry_topic(id: &DeviceId) -> String {
    Topic::Telemetry(id.clone()).render()
}

/// Samples received, each once (a sample on the wire when the link broke may
/// arrive twice: at least once), in arrival order.
fn samples(col: &Collector, id: &DeviceId) -> Vec<(Vec<u8>, Telemetry)> {
    let mut seen = HashSet::new();
    col.on(&telemetry_topic(id))
        .into_iter()
        .filter(|p| seen.insert(p.clone()))
        .map(|p| {
            let t = serde_json::from_slice(&p).expect("telemetry decodes");
            (p, t)
        })
        .collect()
}

/// In order, and no hole longer than `max_gap_s` between two samples.
fn assert_in_order_without_holes(s: &[(Vec<u8>, Telemetry)], max_gap_s: u64) {
    let ts: Vec<u64> = s.iter().map(|(_, t)| t.ts).collect();
    for w in ts.windows(2) {
        assert!(w[0] <= w[1], "samples out of order: {ts:?}");
        assert!(
            w[1] - w[0] <= max_gap_s,
            "a hole of {} s in the samples: {ts:?}",
            w[1] - w[0]
        );
    }
}

/// Send command `id` until it has a result `done` accepts: the agent may not
/// have subscribed yet, and a repeat of a known id is answered, never run
/// again.
fn send_until(
    op: &Operator,
    id: &str,
    action: &str,
    done: impl Fn(&CommandResult) -> bool,
) -> Option<CommandResult> {
    let deadline = std::time::Instant::now() + DRAIN_DEADLINE;
    while std::time::Instant::now() < deadline {
        op.send(id, action, "");
        let r = wait_for(Duration::from_secs(2), || {
            op.results(id).into_iter().find(|r| done(r))
        });
        if r.is_some() {
            return r;
        }
    }
    None
}

fn wait_drained(bundle: &AgentBundle, col: &Collector, up_at: u64) {
    eventually(
        "the outbox drained and live samples flowing again",
        DRAIN_DEADLINE,
        || {
            queued_samples(bundle).is_empty()
                && samples(col, &bundle.id)
                    .iter()
                    .any(|(_, t)| t.ts >= up_at + 2)
        },
    );
}

#[test]
fn telemetry_sampled_while_the_broker_is_down_arrives_in_order() {
    let mut fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-out", &one_hz());
    let col = Collector::start(
        &fleet.pki.service,
        &fleet.broker,
        &bundle.id,
        &[Kind::Telemetry],
    );
    let agent = AgentProcess::spawn(&bundle.config);
    eventually("first samples", AGENT_DEADLINE, || {
        samples(&col, &bundle.id).len() >= 2
    });

    fleet.broker.stop();
    let down_at = now_unix();
    eventually("samples queued on disk", DRAIN_DEADLINE, || {
        queued_samples(&bundle).len() >= OUTAGE_S
    });
    let queued = queued_samples(&bundle);
    fleet.broker.restart().expect("broker back");
    let up_at = now_unix();
    wait_drained(&bundle, &col, up_at);

    let s = samples(&col, &bundle.id);
    let got: HashSet<&Vec<u8>> = s.iter().map(|(p, _)| p).collect();
    let lost = queued.iter().filter(|p| !got.contains(p)).count();
    eprintln!(
        "outage of {} s: {} samples queued offline, {lost} of them lost; {} received in all",
        up_at - down_at,
        queued.len(),
        s.len()
    );
    assert_eq!(lost, 0, "agent log:\n{}", agent.stderr());
    // Sampling went on through the outage: no hole, and in order.
    assert_in_order_without_holes(&s, 3);
}

#[test]
fn samples_queued_before_a_kill_9_during_the_outage_arrive_too() {
    let mut fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-k9", &one_hz());
    let col = Collector::start(
        &fleet.pki.service,
        &fleet.broker,
        &bundle.id,
        &[Kind::Telemetry],
    );
    let mut agent = AgentProcess::spawn(&bundle.config);
    eventually("first samples", AGENT_DEADLINE, || {
        samples(&col, &bundle.id).len() >= 2
    });

    fleet.broker.stop();
    eventually("samples queued on disk", DRAIN_DEADLINE, || {
        queued_samples(&bundle).len() >= OUTAGE_S / 2
    });
    agent.kill9();
    let before_kill = queued_samples(&bundle);
    let mut agent = AgentProcess::spawn(&bundle.config);
    eventually("the restarted agent queues more", DRAIN_DEADLINE, || {
        queued_samples(&bundle).len() >= before_kill.len() + OUTAGE_S / 2
    });
    fleet.broker.restart().expect("broker back");
    let up_at = now_unix();
    wait_drained(&bundle, &col, up_at);

    let s = samples(&col, &bundle.id);
    let got: HashSet<&Vec<u8>> = s.iter().map(|(p, _)| p).collect();
    let lost = before_kill.iter().filter(|p| !got.contains(p)).count();
    eprintln!(
        "{} samples on disk at the kill -9, {lost} of them lost; {} received in all",
        before_kill.len(),
        s.len()
    );
    assert_eq!(
        lost,
        0,
        "of {} samples on disk at the kill; agent log:\n{}",
        before_kill.len(),
        agent.stderr()
    );
    // The restart costs a sample or two (start-up, first sample after 1 s).
    assert_in_order_without_holes(&s, 5);
    agent.kill9();
}

#[test]
fn a_final_result_journaled_during_an_outage_is_published_after_a_kill_and_restart() {
    let mut fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-res", &AgentSetup::default());
    let boot_file = bundle.dir.join("boot_id");
    std::fs::write(&boot_file, "boot-one\n").unwrap();
    let boot_env = [("EDGEBIND_BOOT_ID_FILE", boot_file.to_str().unwrap())];
    let col = Collector::start(
        &fleet.pki.service,
        &fleet.broker,
        &bundle.id,
        &[Kind::CmdResult],
    );
    let mut agent = AgentProcess::spawn_with_env(&bundle.config, &boot_env);
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    send_until(&op, "r1", "reboot", |r| r.status == CommandStatus::Accepted)
        .unwrap_or_else(|| panic!("no accepted; agent log:\n{}", agent.stderr()));
    eventually("the reboot ran", AGENT_DEADLINE, || bundle.reboots() == 1);
    drop(op);
    agent.kill9();

    // The device is back in a new boot while the broker is down: `succeeded`
    // is decided and journaled with nobody to tell.
    fleet.broker.stop();
    std::fs::write(&boot_file, "boot-two\n").unwrap();
    let mut agent = AgentProcess::spawn_with_env(&bundle.config, &boot_env);
    let journal = bundle.state_dir.join("commands.jsonl");
    eventually("succeeded journaled", AGENT_DEADLINE, || {
        std::fs::read_to_string(&journal).is_ok_and(|j| j.contains("succeeded"))
    });
    agent.kill9();
    // Even without the outbox file, the journal knows the result was never
    // acknowledged.
    std::fs::remove_file(bundle.state_dir.join(OUTBOX_FILE_NAME)).unwrap();

    let agent = AgentProcess::spawn_with_env(&bundle.config, &boot_env);
    fleet.broker.restart().expect("broker back");
    let topic = Topic::CmdResult(bundle.id.clone(), CommandId::new("r1").unwrap()).render();
    eventually("succeeded published", DRAIN_DEADLINE, || {
        col.on(&topic).iter().any(|p| {
            serde_json::from_slice::<CommandResult>(p)
                .is_ok_and(|r| r.status == CommandStatus::Succeeded)
        })
    });
    assert_eq!(bundle.reboots(), 1, "never rebooted twice");
    drop(agent);
}

/// Overwrite `n` bytes in the middle of `path` with bytes that are not UTF-8
/// and not JSON (what a power cut on flash can leave).
fn garble_middle(path: &Path, n: usize) {
    let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(bytes.len() > 2, "{} is too short to garble", path.display());
    let at = bytes.len() / 2;
    let mut x = 0x9e37_79b9u32;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let b = 0x80 | (x as u8);
        if at + i < bytes.len() {
            bytes[at + i] = b;
        } else {
            bytes.push(b);
        }
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn random_bytes_in_every_state_file_are_skipped_reported_and_the_agent_serves() {
    let mut fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-bad", &one_hz());
    let col = Collector::start(
        &fleet.pki.service,
        &fleet.broker,
        &bundle.id,
        &[Kind::Events],
    );
    let mut agent = AgentProcess::spawn(&bundle.config);
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    for id in ["p1", "p2", "p3"] {
        send_until(&op, id, "ping", |r| r.status.is_final())
            .unwrap_or_else(|| panic!("no answer to {id}; agent log:\n{}", agent.stderr()));
    }
    drop(op);
    // Queue something in the outbox, then stop the agent hard.
    fleet.broker.stop();
    eventually("samples queued on disk", DRAIN_DEADLINE, || {
        queued_samples(&bundle).len() >= 4
    });
    agent.kill9();
    let state = &bundle.state_dir;
    std::fs::write(
        state.join("settings.json"),
        r#"{"revision": 3, "settings": {"telemetry_interval_s": 1, "log_level": "debug"}}"#,
    )
    .unwrap();
    for file in ["commands.jsonl", "settings.json", OUTBOX_FILE_NAME] {
        garble_middle(&state.join(file), 64);
    }

    let mut agent = AgentProcess::spawn(&bundle.config);
    fleet.broker.restart().expect("broker back");
    let topic = Topic::Events(bundle.id.clone()).render();
    let recovered = || {
        col.on(&topic)
            .iter()
            .filter_map(|p| serde_json::from_slice::<Event>(p).ok())
            .find(|e| e.kind == events::STATE_RECOVERED)
    };
    eventually("a state_recovered event", DRAIN_DEADLINE, || {
        recovered().is_some()
    });
    let event = recovered().unwrap();
    for file in ["commands.jsonl", "settings.json", OUTBOX_FILE_NAME] {
        assert!(event.message.contains(file), "{file}: {}", event.message);
    }
    assert!(
        agent.wait_exit(Duration::from_millis(10)).is_none(),
        "the agent exited; log:\n{}",
        agent.stderr()
    );
    let op = Operator::watch(&fleet.pki, &fleet.broker, &bundle.id);
    let r = send_until(&op, "p4", "ping", |r| r.status.is_final())
        .unwrap_or_else(|| panic!("no answer after recovery; log:\n{}", agent.stderr()));
    assert_eq!(r.status, CommandStatus::Succeeded);
    // Answered ids are still known: a redelivered one is not run again.
    let log = agent.stderr();
    assert!(log.contains("skipped"), "{log}");
}

/// Whole files of random bytes (not just a damaged middle): `--check` runs
/// every start-up step, reading and repairing the state files included.
#[test]
fn whatever_the_state_files_contain_the_agent_starts() {
    let fleet = TestFleet::start();
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "dev-fuzz", &one_hz());
    std::fs::create_dir_all(&bundle.state_dir).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..12 {
        for file in ["commands.jsonl", "settings.json", OUTBOX_FILE_NAME] {
            let len = (next() % 4096) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            std::fs::write(bundle.state_dir.join(file), bytes).unwrap();
        }
        let out = std::process::Command::new(edgebind_tests::bin_path("edgebind-agent"))
            .arg("--config")
            .arg(&bundle.config)
            .arg("--check")
            .output()
            .expect("run edgebind-agent --check");
        assert!(
            out.status.success(),
            "round {round}: refused to start: {:?}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
