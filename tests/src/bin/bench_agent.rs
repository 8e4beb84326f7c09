//! Footprint benchmark of the device agent (prints figures; not a test).
//!
//! Run: `cargo run --release -p edgebind-tests --bin bench_agent [-- PINGS]`
//!
//! Against a real Mosquitto with mTLS (throwaway PKI), it reports for the
//! release agent, connected and idle:
//! - resident memory (VmRSS) 10 s after it came online, and its peak (VmHWM);
//! - the stripped binary size;
//! - p50/p99 round trip of N sequential `ping` commands (operator publishes
//!   the command at QoS 1, waits for the `succeeded` result), beside the
//!   broker's own floor measured in the same run: the same client publishing
//!   at QoS 1 to a topic it is subscribed to.
//!
//! - the outbox (issue 11): idle RSS with it enabled and empty, its disk use
//!   per 1,000 queued samples (real samples from the agent's sampler, in the
//!   agent's own file format), and the drain rate of a simulated 10-minute
//!   outage at 1 Hz: 600 samples left in a second agent's outbox file before
//!   it starts, timed from its `online` status to the 600th sample received.
//!
//! Targets (issue 2): idle RSS <= 5 MiB; ping p50 <= 3x the broker floor.

#[path = "../agent_support.rs"]
mod agent_support;

use std::time::{Duration, Instant};

use agent_support::{AgentBundle, AgentProcess, AgentSetup, FastClient, FastEvent};
use edgebind_agent::outbox::{self, Class, OUTBOX_FILE_NAME, OutboxFile, Queue};
use edgebind_agent::telemetry::Sampler;
use edgebind_protocol::topics::{Kind, Topic};
use edgebind_protocol::{CommandId, DeviceId};
use edgebind_tests::{TestFleet, bin_path};

const DEFAULT_PINGS: usize = 1000;
const IDLE: Duration = Duration::from_secs(10);
const RTT_DEADLINE: Duration = Duration::from_secs(10);
/// A 10-minute outage at 1 Hz.
const OUTAGE_SAMPLES: u64 = 600;

fn main() {
    let pings: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(DEFAULT_PINGS);
    let profile = if cfg!(debug_assertions) {
        "debug (run with --release for real figures)"
    } else {
        "release"
    };
    let agent_bin = bin_path("edgebind-agent");
    println!("edgebind-agent footprint benchmark ({profile} build)");
    println!("binary: {}", agent_bin.display());
    println!("stripped binary size: {}", human(stripped_size(&agent_bin)));

    let fleet = TestFleet::start();
    let bundle = AgentBundle::new(
        &fleet.pki,
        &fleet.broker,
        "bench-dev",
        &AgentSetup::default(),
    );
    // One connection per CN: the operator uses only this client.
    let op = FastClient::connect(&fleet.pki.operator, &fleet.broker);
    let status = Topic::Status(bundle.id.clone()).render();
    op.subscribe(&status);
    op.subscribe(&Kind::CmdResult.filter_for(&bundle.id));
    let agent = AgentProcess::spawn_with_env(&bundle.config, &[("EDGEBIND_LOG", "warn")]);
    assert!(
        op.wait_message(&status, b"online", Duration::from_secs(60)),
        "agent not online; stderr:\n{}",
        agent.stderr()
    );
    std::thread::sleep(IDLE);
    let (rss, hwm) = memory(agent.pid());
    println!(
        "idle RSS after {}s connected: {} (peak {}); target <= 5 MiB: {}",
        IDLE.as_secs(),
        human(rss),
        human(hwm),
        verdict(rss <= 5 * 1024 * 1024)
    );
    let queued = outbox_records(&bundle.state_dir);
    println!(
        "agent outbox: idle RSS with the outbox enabled and empty ({queued} records queued): {}; target <= 5 MiB: {}",
        human(rss),
        verdict(rss <= 5 * 1024 * 1024 && queued == 0)
    );

    // Broker floor: QoS 1 publish to our own subscription, same client.
    let floor_dev = DeviceId::new("bench-floor").unwrap();
    op.subscribe(&Kind::Cmd.filter_for(&floor_dev));
    let floor = measure(pings, |i| {
        let topic =
            Topic::Cmd(floor_dev.clone(), CommandId::new(format!("f{i}")).unwrap()).render();
        op.publish(&topic, b"{}");
        assert!(
            op.wait_message(&topic, b"", RTT_DEADLINE),
            "floor message {i} not delivered"
        );
    });

    // Agent: ping -> accepted, succeeded.
    let rtt = measure(pings, |i| {
        let id = CommandId::new(format!("ping-{i}")).unwrap();
        let cmd = Topic::Cmd(bundle.id.clone(), id.clone()).render();
        let result = Topic::CmdResult(bundle.id.clone(), id.clone()).render();
        op.publish(
            &cmd,
            format!(r#"{{"id":"{id}","action":"ping"}}"#).as_bytes(),
        );
        assert!(
            op.wait_message(&result, b"succeeded", RTT_DEADLINE),
            "no result for {id}; agent stderr:\n{}",
            agent.stderr()
        );
    });
    let (rss_after, hwm_after) = memory(agent.pid());

    println!("round trips over {pings} sequential messages (ms):");
    println!(
        "  broker floor (QoS 1 to own subscription): {}",
        floor.line()
    );
    println!("  agent ping (command -> succeeded result): {}", rtt.line());
    let ratio = rtt.p50 / floor.p50;
    println!(
        "  ping p50 / floor p50 = {ratio:.2}x; target <= 3x: {}",
        verdict(ratio <= 3.0)
    );
    println!(
        "RSS after the pings: {} (peak {})",
        human(rss_after),
        human(hwm_after)
    );

    // Disk use of queued samples, in the agent's own format.
    let scratch = tempfile::tempdir().expect("tempdir");
    let per_1000 = fill_outbox(scratch.path(), &bundle.id, 1000);
    println!(
        "agent outbox: 1000 samples = {} KiB on disk ({} bytes per sample)",
        per_1000 / 1024,
        per_1000 / 1000
    );

    // Drain after a 10-minute outage: the queue is on disk before the agent
    // starts, as after a power cycle in the middle of an outage.
    let drain = AgentBundle::new(
        &fleet.pki,
        &fleet.broker,
        "bench-drain",
        &AgentSetup::default(),
    );
    let status = Topic::Status(drain.id.clone()).render();
    let telemetry = Topic::Telemetry(drain.id.clone()).render();
    op.subscribe(&status);
    op.subscribe(&telemetry);
    std::fs::create_dir_all(&drain.state_dir).unwrap();
    let bytes = fill_outbox(&drain.state_dir, &drain.id, OUTAGE_SAMPLES);
    let agent = AgentProcess::spawn_with_env(&drain.config, &[("EDGEBIND_LOG", "warn")]);
    assert!(
        op.wait_message(&status, b"online", Duration::from_secs(60)),
        "drain agent not online; stderr:\n{}",
        agent.stderr()
    );
    let t = Instant::now();
    let mut got = 0;
    while got < OUTAGE_SAMPLES {
        let ev = op.wait(
            Duration::from_secs(60),
            |e| matches!(e, FastEvent::Message { topic, .. } if *topic == telemetry),
        );
        assert!(
            ev.is_some(),
            "only {got} of {OUTAGE_SAMPLES} queued samples arrived; stderr:\n{}",
            agent.stderr()
        );
        got += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "agent outbox: drained {OUTAGE_SAMPLES} samples (10-minute outage at 1 Hz, {} KiB) in {:.2} s = {:.0} samples/s",
        bytes / 1024,
        secs,
        OUTAGE_SAMPLES as f64 / secs
    );
    let (rss, hwm) = memory(agent.pid());
    println!(
        "agent outbox: RSS after draining: {} (peak {})",
        human(rss),
        human(hwm)
    );
}

/// Write `n` real telemetry samples of `device` into `dir`'s outbox file, as
/// the agent queues them while offline (one second apart); returns the
/// file's size.
fn fill_outbox(dir: &std::path::Path, device: &DeviceId, n: u64) -> u64 {
    let mut sampler = Sampler::new(dir);
    let topic = Topic::Telemetry(device.clone()).render();
    let (mut file, _) = OutboxFile::open(dir, 1 << 30).expect("open outbox");
    let mut queue = Queue::new(u64::MAX, vec![], 0);
    let start = edgebind_protocol::messages::now_unix() - n;
    for i in 0..n {
        let sample = sampler.sample(start + i);
        let payload = serde_json::to_vec(&sample).unwrap();
        let (r, _) = queue.push(Class::Telemetry, start + i, topic.clone(), payload);
        file.append(&outbox::encode_data(&r)).expect("append");
    }
    file.sync().expect("sync");
    std::fs::metadata(dir.join(OUTBOX_FILE_NAME))
        .map(|m| m.len())
        .unwrap_or(0)
}

fn outbox_records(dir: &std::path::Path) -> usize {
    let bytes = std::fs::read(dir.join(OUTBOX_FILE_NAME)).unwrap_or_default();
    outbox::decode(&bytes).records.len()
}

struct Stats {
    p50: f64,
    p99: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn line(&self) -> String {
        format!(
            "p50 {:.3}  p99 {:.3}  min {:.3}  max {:.3}",
            self.p50, self.p99, self.min, self.max
        )
    }
}

fn measure(n: usize, mut one: impl FnMut(usize)) -> Stats {
    let mut ms: Vec<f64> = (0..n)
        .map(|i| {
            let t = Instant::now();
            one(i);
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    Stats {
        p50: ms[n / 2],
        p99: ms[(n * 99 / 100).min(n - 1)],
        min: ms[0],
        max: ms[n - 1],
    }
}

/// VmRSS and VmHWM of `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Size after `strip` (the release profile already strips; this makes the
/// figure honest for other profiles too).
fn stripped_size(bin: &std::path::Path) -> u64 {
    let tmp = std::env::temp_dir().join(format!("edgebind-agent-stripped-{}", std::process::id()));
    let size = std::fs::copy(bin, &tmp)
        .ok()
        .and_then(|_| std::process::Command::new("strip").arg(&tmp).status().ok())
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&tmp).ok())
        .or_else(|| std::fs::metadata(bin).ok())
        .map(|m| m.len())
        .unwrap_or(0);
    let _ = std::fs::remove_file(&tmp);
    size
}

fn human(bytes: u64) -> String {
    format!("{:.2} MiB ({} KiB)", bytes as f64 / 1048576.0, bytes / 1024)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}
