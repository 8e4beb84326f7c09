//! Reconnect storm benchmark: N simulated devices (`edgebind-sim`: each the
//! real agent with its own registered identity, in this process) connected
//! to a real Mosquitto; the broker's raw mutual-TLS accept capacity is
//! measured first in the same run; then the broker is stopped, kept down for
//! `--outage` seconds and started again, and the bench prints how long until
//! every device is back, the connection attempts per second over time (peak
//! and spread), failed handshakes and devices that never came back.
//!
//! ```text
//! cargo run --release -p edgebind-tests --bin bench_storm -- \
//!     [--devices 5000] [--outage 3] [--fanout] [--kill-service]
//!     [--accept-share 0.8] [--window S]
//! ```
//! Before the storm the bench publishes the fleet's retained reconnect hint
//! (`edgebind_protocol::reconnect`) as the fleet service would: the window
//! for N devices at `--accept-share` of the accept rate just measured
//! (`--window S` sets it; `--window 0` publishes none, the agents' own
//! backoff alone).
//! `--fanout` also sends one `ping` to every device (`edgebind send --all`,
//! the real CLI) and prints when the last result was recorded.
//! `--kill-service` runs `edgebind fleet serve` with the devices sending
//! telemetry every `--telemetry-interval` seconds, kills it with SIGKILL,
//! starts it again 2 s later and prints the time until ingest caught up and
//! the samples lost (acknowledged by the broker, never in the registry).
//!
//! Every part ends with one line starting `bench_storm:` with the figures.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edgebind_fleet::mqtt::BrokerEndpoint;
use edgebind_fleet::ops::FleetHome;
use edgebind_sim::{SimOptions, Simulation, Snapshot, accept, identities, usage};
use edgebind_tests::{Broker, TestPki, bin_path, spawn_tied};

struct Args {
    devices: usize,
    outage_s: f64,
    telemetry_interval_s: u64,
    concurrency: usize,
    fanout: bool,
    kill_service: bool,
    accept_share: f64,
    window_s: Option<u32>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        devices: 5000,
        outage_s: 3.0,
        telemetry_interval_s: 300,
        concurrency: 64,
        fanout: false,
        kill_service: false,
        accept_share: 0.8,
        window_s: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().context("missing value");
        match flag.as_str() {
            "--devices" => a.devices = value()?.parse()?,
            "--outage" => a.outage_s = value()?.parse()?,
            "--telemetry-interval" => a.telemetry_interval_s = value()?.parse()?,
            "--concurrency" => a.concurrency = value()?.parse()?,
            "--fanout" => a.fanout = true,
            "--accept-share" => a.accept_share = value()?.parse()?,
            "--window" => a.window_s = Some(value()?.parse()?),
            "--kill-service" => a.kill_service = true,
            "--bench" => {}
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// Snapshots every 250 ms, taken on a thread of its own from before the
/// broker stops until `done`.
struct Recorder {
    samples: Vec<(f64, Snapshot)>,
}

fn start_recorder(
    counters: std::sync::Arc<edgebind_sim::Counters>,
    start: Instant,
    deadline: Duration,
    done: impl Fn(&Snapshot) -> bool + Send + 'static,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Recorder> {
    std::thread::spawn(move || {
        let mut samples = Vec::new();
        loop {
            let s = counters.snapshot();
            samples.push((start.elapsed().as_secs_f64(), s));
            let finished = armed.load(std::sync::atomic::Ordering::Relaxed) && done(&s);
            if finished || start.elapsed() >= deadline {
                return Recorder { samples };
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    })
}

impl Recorder {
    /// `count` (cumulative) per whole second since the start.
    fn per_second(&self, count: impl Fn(&Snapshot) -> u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut prev = self.samples.first().map(|(_, s)| count(s)).unwrap_or(0);
        let mut second = 1.0;
        for (t, s) in &self.samples {
            while *t >= second {
                out.push(count(s) - prev);
                prev = count(s);
                second += 1.0;
            }
        }
        if let Some((_, s)) = self.samples.last()
            && count(s) > prev
        {
            out.push(count(s) - prev);
        }
        out
    }
}

fn series(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}

/// Mean and standard deviation of the non-zero seconds.
fn spread(v: &[u64]) -> (f64, f64) {
    let busy: Vec<f64> = v.iter().filter(|a| **a > 0).map(|a| *a as f64).collect();
    let n = busy.len().max(1) as f64;
    let mean = busy.iter().sum::<f64>() / n;
    let sd = (busy.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n).sqrt();
    (mean, sd)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let n = args.devices;
    let files = usage::raise_open_files()?;
    println!(
        "bench_storm: {n} simulated devices in this process, open-file limit {files}, broker outage {} s",
        args.outage_s
    );
    let pki = TestPki::new();
    // The broker inherits the raised open-file limit.
    let mut broker = Broker::start(&pki)?;
    let home = FleetHome::new(pki.home());
    let mut store = home.open_registry()?;

    let t = Instant::now();
    let out = pki.home().join("sim-bundles");
    let ids = identities::create(&home, store.as_mut(), "storm", n, None, &out, |_| {})?;
    let reg_s = t.elapsed().as_secs_f64();
    println!(
        "registered {n} identities (certificate, bundle, registry row, one broker policy refresh) in {reg_s:.1} s = {:.0}/s",
        n as f64 / reg_s
    );

    let endpoint = BrokerEndpoint {
        host: broker.host().into(),
        port: broker.port(),
    };
    let cap = accept::measure(&ids, &endpoint, n, args.concurrency, 2)?;
    let raw = cap.time_for(n as u64);
    println!(
        "raw mTLS accept: {} connections ({} failed) in {:.1} s = {:.0}/s with {} in flight; {n} take {:.1} s",
        cap.connections,
        cap.failures,
        cap.seconds,
        cap.per_s,
        cap.concurrency,
        raw.as_secs_f64()
    );

    let window_s = args.window_s.unwrap_or_else(|| {
        edgebind_protocol::reconnect::window_for(n as u64, cap.per_s * args.accept_share)
    });
    if window_s > 0 {
        publish_window(&pki, &broker, window_s)?;
    }
    println!(
        "reconnect window: {window_s} s ({})",
        match args.window_s {
            Some(0) => "none: the agents' own backoff".to_owned(),
            Some(_) => "set by --window".to_owned(),
            None => format!(
                "{n} devices at {:.0}/s, {:.0} % of the measured accept rate",
                cap.per_s * args.accept_share,
                args.accept_share * 100.0
            ),
        }
    );

    let opts = SimOptions {
        telemetry_interval_s: args.telemetry_interval_s,
        keep_alive_s: Some(60),
        ramp_per_s: (cap.per_s as u32 / 2).max(50),
        ..SimOptions::default()
    };
    let sim = Simulation::start(ids.clone(), &opts)?;
    let t = Instant::now();
    if !sim.wait_for(Duration::from_secs(900), |s| s.online == n as u64) {
        bail!("only {} of {n} online after 900 s", sim.snapshot().online);
    }
    let c = sim.cost();
    println!(
        "all {n} online {:.1} s after the first start (ramp {}/s); RSS {:.1} -> {:.1} MiB = {:.1} KiB per device; CPU {:.1} s",
        t.elapsed().as_secs_f64(),
        opts.ramp_per_s,
        c.rss_before_bytes as f64 / 1048576.0,
        c.rss_bytes as f64 / 1048576.0,
        c.rss_per_device_bytes as f64 / 1024.0,
        c.cpu_s
    );

    let hinted = sim.snapshot().online;
    println!("{hinted} devices online when the storm starts; window {window_s} s");
    storm(&mut broker, &sim, n, &args, cap.per_s, raw, window_s)?;
    if args.fanout {
        fanout(pki.home(), &sim, n)?;
    }
    if args.kill_service {
        drop(sim);
        kill_service(&pki, &home, &ids, n, &args, cap.per_s)?;
        identities::remove(&home, store.as_mut(), &ids)?;
        return Ok(());
    }
    let cpu_before = usage::cpu_time();
    let before = sim.snapshot();
    let last = sim.stop(Duration::from_secs(60));
    println!(
        "stopped: {} agent errors over the run, stop CPU {:.1} s, telemetry {} -> {}",
        last.agent_errors,
        (usage::cpu_time() - cpu_before).as_secs_f64(),
        before.telemetry,
        last.telemetry
    );
    identities::remove(&home, store.as_mut(), &ids)?;
    Ok(())
}

fn storm(
    broker: &mut Broker,
    sim: &Simulation,
    n: usize,
    args: &Args,
    accept_per_s: f64,
    raw: Duration,
    window_s: u32,
) -> anyhow::Result<()> {
    let before = sim.snapshot();
    let start = Instant::now();
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let total = n as u64;
    let recorder = start_recorder(
        sim.shared_counters(),
        start,
        Duration::from_secs_f64(args.outage_s) + Duration::from_secs(900),
        move |s| s.online == total,
        armed.clone(),
    );
    broker.stop();
    let stopped = start.elapsed();
    // The outage itself is the condition under test, not a wait.
    std::thread::sleep(Duration::from_secs_f64(args.outage_s));
    broker.restart()?;
    let up = start.elapsed();
    armed.store(true, std::sync::atomic::Ordering::Relaxed);
    let rec = recorder.join().expect("recorder");
    let (t_end, last) = *rec.samples.last().expect("samples");
    let back = t_end - up.as_secs_f64();
    // Every attempt, and those that reached the broker (not refused at TCP
    // while nothing listened): only the latter cost the broker anything.
    let all_per_s = rec.per_second(|s| s.attempts);
    let per_s = rec.per_second(|s| s.connects + s.handshake_failures);
    let peak_all = all_per_s.iter().copied().max().unwrap_or(0);
    let peak = per_s.iter().copied().max().unwrap_or(0);
    let (mean, sd) = spread(&per_s);
    let never = n as u64 - last.online;
    let target = 2.0 * raw.as_secs_f64();
    println!(
        "broker stopped in {:.1} s, back {:.1} s after the stop; per second from the stop:\n  attempts reaching the broker: {}\n  all attempts (incl. refused): {}",
        stopped.as_secs_f64(),
        up.as_secs_f64(),
        series(&per_s),
        series(&all_per_s)
    );
    let pass = never == 0
        && (peak as f64) <= 2.0 * accept_per_s
        && (if args.outage_s >= 60.0 {
            back <= 60.0
        } else {
            back <= target
        });
    println!(
        "bench_storm: devices={n} outage_s={:.1} accept_per_s={accept_per_s:.0} raw_accept_s={:.1} window_s={window_s} \
         all_back_after_s={back:.1} target_s={:.1} attempts={} peak_attempts_per_s={peak} \
         peak_target={:.0} mean_busy_attempts_per_s={mean:.0} sd={sd:.0} \
         peak_incl_refused_per_s={peak_all} refused={} \
         failed_handshakes={} never_back={never} result={}",
        up.as_secs_f64(),
        raw.as_secs_f64(),
        if args.outage_s >= 60.0 { 60.0 } else { target },
        last.attempts - before.attempts,
        2.0 * accept_per_s,
        last.refused - before.refused,
        last.handshake_failures - before.handshake_failures,
        if pass { "PASS" } else { "FAIL" }
    );
    if never > 0 {
        let offline = sim.counters().offline_devices();
        println!(
            "never back (first 10): {:?}",
            &offline[..offline.len().min(10)]
        );
    }
    Ok(())
}

/// The retained reconnect hint, published with the fleet service's identity.
fn publish_window(pki: &TestPki, broker: &Broker, window_s: u32) -> anyhow::Result<()> {
    use edgebind_protocol::reconnect::{ReconnectHint, TOPIC};
    let svc = edgebind_tests::TestClient::connect(&pki.service, broker)?;
    let hint = ReconnectHint::new(window_s, "service:fleet").encode();
    let ack = svc.publish(TOPIC, &hint, edgebind_tests::QoS::AtLeastOnce, true)?;
    if !matches!(
        ack,
        Some(edgebind_tests::PubAckReason::Success)
            | Some(edgebind_tests::PubAckReason::NoMatchingSubscribers)
    ) {
        bail!("the broker refused the reconnect hint: {ack:?}");
    }
    svc.disconnect();
    Ok(())
}

/// `edgebind send --all ping` to every simulated device through the CLI.
fn fanout(home: &Path, sim: &Simulation, n: usize) -> anyhow::Result<()> {
    let before = sim.snapshot().answered_ok;
    let t = Instant::now();
    let out = Command::new(bin_path("edgebind"))
        .arg("--home")
        .arg(home)
        .args(["send", "--all", "ping", "--timeout", "120", "--json"])
        .stderr(Stdio::null())
        .output()?;
    let took = t.elapsed().as_secs_f64();
    let outcomes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let list = outcomes.as_array().cloned().unwrap_or_default();
    let ok = list.iter().filter(|o| o["outcome"] == "succeeded").count();
    let last_ms = list
        .iter()
        .filter_map(|o| o["elapsed_ms"].as_u64())
        .max()
        .unwrap_or(0);
    println!(
        "bench_storm: fanout devices={n} succeeded={ok} missing={} last_result_s={:.2} cli_s={took:.2} \
         answered_by_agents={} target_s=10 result={}",
        n - ok,
        last_ms as f64 / 1000.0,
        sim.snapshot().answered_ok - before,
        if ok == n && (last_ms as f64) <= 10_000.0 {
            "PASS"
        } else {
            "FAIL"
        }
    );
    Ok(())
}

fn service(pki: &TestPki, log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log)?;
    let mut cmd = Command::new(bin_path("edgebind"));
    cmd.arg("--home")
        .arg(pki.home())
        .args(["fleet", "serve", "--identity"])
        .arg(&pki.service.dir)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let child = spawn_tied(cmd)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("fleet service connected")
    {
        if Instant::now() > deadline {
            bail!("fleet service did not connect");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child)
}

/// The fleet service killed with SIGKILL under N devices sending telemetry.
fn kill_service(
    pki: &TestPki,
    home: &FleetHome,
    ids: &edgebind_sim::Identities,
    n: usize,
    args: &Args,
    accept_per_s: f64,
) -> anyhow::Result<()> {
    let interval = args.telemetry_interval_s.min(10);
    let stored = || -> anyhow::Result<u64> { Ok(home.open_registry()?.stats()?.telemetry_rows) };
    let mut svc = service(pki, &pki.home().join("service-1.log"))?;
    let sim = Simulation::start(
        ids.clone(),
        &SimOptions {
            telemetry_interval_s: interval,
            keep_alive_s: Some(60),
            // Half the accept rate, as the first start: a faster ramp only
            // times handshakes out.
            ramp_per_s: (accept_per_s as u32 / 2).max(50),
            ..SimOptions::default()
        },
    )?;
    if !sim.wait_for(Duration::from_secs(900), |s| s.online == n as u64) {
        bail!("only {} of {n} online", sim.snapshot().online);
    }
    // Run two periods so every device sends, then kill.
    let steady = Instant::now();
    while steady.elapsed() < Duration::from_secs(2 * interval + 2) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let rate = n as f64 / interval as f64;
    svc.kill()?;
    let _ = svc.wait();
    let killed = Instant::now();
    let at_kill = sim.snapshot().telemetry_delivered;
    while killed.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut svc = service(pki, &pki.home().join("service-2.log"))?;
    let restarted = Instant::now();
    let backlog = sim.snapshot().telemetry_delivered;
    // Caught up: everything acknowledged up to the restart is stored.
    let caught_up = loop {
        if stored()? >= backlog {
            break Some(restarted.elapsed());
        }
        if restarted.elapsed() > Duration::from_secs(300) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let last = sim.stop(Duration::from_secs(60));
    let delivered = last.telemetry_delivered;
    let deadline = Instant::now() + Duration::from_secs(300);
    while stored()? < delivered && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let rows = stored()?;
    let _ = svc.kill();
    let _ = svc.wait();
    println!(
        "bench_storm: kill_service devices={n} offered_per_s={rate:.0} delivered_before_kill={at_kill} \
         backlog_at_restart={} caught_up_after_s={} delivered={delivered} stored={rows} lost={} result={}",
        backlog - at_kill,
        caught_up.map_or("never".into(), |d| format!("{:.1}", d.as_secs_f64())),
        delivered.saturating_sub(rows),
        if rows >= delivered && caught_up.is_some() {
            "PASS"
        } else {
            "FAIL"
        }
    );
    Ok(())
}
