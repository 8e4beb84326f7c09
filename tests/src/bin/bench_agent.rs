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
//! Targets (issue 2): idle RSS <= 5 MiB; ping p50 <= 3x the broker floor.

#[path = "../agent_support.rs"]
mod agent_support;

use std::time::{Duration, Instant};

use agent_support::{AgentBundle, AgentProcess, AgentSetup, FastClient};
use edgebind_protocol::topics::{Kind, Topic};
use edgebind_protocol::{CommandId, DeviceId};
use edgebind_tests::{TestFleet, bin_path};

const DEFAULT_PINGS: usize = 1000;
const IDLE: Duration = Duration::from_secs(10);
const RTT_DEADLINE: Duration = Duration::from_secs(10);

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
