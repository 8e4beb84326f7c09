//! Telemetry ingest benchmark: simulated devices publish telemetry (QoS 1,
//! mutual TLS) through a real Mosquitto to the fleet service, which writes it
//! to the SQLite registry. Prints messages per second persisted end to end,
//! a loss check (every message sent is a row, exactly once) and the
//! registry's size per device.
//!
//! ```text
//! cargo run --release -p edgebind-tests --bin bench_ingest -- [--devices 100] [--rate 12000] [--seconds 10]
//! ```
//! `--rate 0` publishes as fast as the devices can (peak instead of sustained).
//! `--broker-conf LINE` adds a global option to the generated mosquitto.conf
//! (e.g. `max_queued_messages 100000`) to compare broker settings.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edgebind_fleet::mqtt::{self, BrokerEndpoint, ClientIdentity};
use edgebind_fleet::registry::{NewDevice, Retention, SqliteStore, Store};
use edgebind_fleet::service::{ServiceConfig, ServiceHandle};
use edgebind_protocol::DeviceId;
use edgebind_protocol::topics::Topic;
use edgebind_tests::{Broker, TestPki};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};

struct Args {
    devices: usize,
    rate: u64,
    seconds: u64,
    /// Extra mosquitto.conf lines (global options) to try against the generated config.
    broker_conf: Vec<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        devices: 100,
        rate: 12_000,
        seconds: 10,
        broker_conf: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> anyhow::Result<u64> {
            it.next()
                .with_context(|| format!("{flag} needs a value"))?
                .parse()
                .with_context(|| format!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--devices" => args.devices = value()? as usize,
            "--rate" => args.rate = value()?,
            "--seconds" => args.seconds = value()?,
            "--broker-conf" => args.broker_conf.push(
                it.next()
                    .context("--broker-conf needs a mosquitto.conf line")?,
            ),
            "-h" | "--help" => {
                println!(
                    "bench_ingest [--devices N] [--rate MSG_PER_S (0 = flat out)] [--seconds S]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if args.devices == 0 || args.seconds == 0 {
        bail!("--devices and --seconds must be positive");
    }
    Ok(args)
}

fn telemetry(seq: u64) -> Vec<u8> {
    // A realistic sample (~300 bytes), `ts` = sequence number so every
    // message of a device is distinguishable in the registry.
    format!(
        r#"{{"ts":{seq},"cpu_pct":12.5,"load_avg":[0.31,0.27,0.2],"mem_total_bytes":948047872,"mem_used_bytes":211652608,"disk_total_bytes":7516192768,"disk_used_bytes":1610612736,"uptime_s":{seq},"soc_temp_c":48.3,"net":[{{"iface":"eth0","rx_bytes":123456789,"tx_bytes":98765432}}]}}"#
    )
    .into_bytes()
}

/// One simulated device: connect, publish `count` messages paced at
/// `per_second` (0 = unpaced), wait for every PUBACK.
async fn device(
    id: DeviceId,
    opts: rumqttc::v5::MqttOptions,
    count: u64,
    per_second: f64,
    acked: Arc<AtomicU64>,
    start: Arc<tokio::sync::Barrier>,
) -> anyhow::Result<()> {
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    // Drive the connection until CONNACK.
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => bail!("{id}: connect: {e}"),
        }
    }
    let topic = Topic::Telemetry(id.clone()).render();
    let publisher = tokio::spawn(async move {
        start.wait().await;
        let begin = tokio::time::Instant::now();
        for seq in 0..count {
            if per_second > 0.0 {
                let due = begin + Duration::from_secs_f64(seq as f64 / per_second);
                tokio::time::sleep_until(due).await;
            }
            if client
                .publish(topic.clone(), QoS::AtLeastOnce, false, telemetry(seq))
                .await
                .is_err()
            {
                break;
            }
        }
        client
    });
    let mut mine = 0u64;
    while mine < count {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                mine += 1;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => bail!("{id}: {e} after {mine} acks"),
        }
    }
    let client = publisher.await?;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let per_device = (args.rate.max(1) * args.seconds).div_ceil(args.devices as u64);
    let per_device = if args.rate == 0 {
        // Flat out: a fixed volume.
        (200_000 / args.devices as u64).max(1)
    } else {
        per_device
    };
    let total = per_device * args.devices as u64;
    println!(
        "bench_ingest: {} devices x {per_device} telemetry messages = {total}, target {}",
        args.devices,
        if args.rate == 0 {
            "flat out".to_owned()
        } else {
            format!("{} msg/s for {} s", args.rate, args.seconds)
        }
    );
    if !args.broker_conf.is_empty() {
        println!("extra broker options: {}", args.broker_conf.join("; "));
    }

    let pki = TestPki::new();
    let mut broker = Broker::start(&pki)?;
    if !args.broker_conf.is_empty() {
        // Extra global options, inserted before the listener section.
        let conf = broker.dir().join(edgebind_broker::layout::CONF);
        let text = std::fs::read_to_string(&conf)?;
        let extra = format!(
            "\n# added by bench_ingest --broker-conf\n{}\n\nlistener ",
            args.broker_conf.join("\n")
        );
        std::fs::write(&conf, text.replacen("\nlistener ", &extra, 1))?;
        broker.restart()?;
    }
    let registry_path = pki.home().join("registry.db");
    // History long enough to keep every message: the loss check counts rows.
    let retention = Retention {
        telemetry_per_device: per_device as u32 + 10,
        ..Retention::default()
    };
    let mut store = SqliteStore::create(&registry_path, retention)?;
    let mut identities = Vec::new();
    for i in 0..args.devices {
        let id = DeviceId::new(format!("sim-{i:05}"))?;
        let identity = pki.device(id.as_str());
        store.add_device(&NewDevice {
            id: id.clone(),
            board: "raspberrypi4-64".parse()?,
            tags: BTreeSet::new(),
            cert: None,
        })?;
        identities.push((
            id,
            ClientIdentity {
                cert: identity.cert,
                key: identity.key,
                ca: identity.ca,
            },
        ));
    }
    let endpoint = BrokerEndpoint {
        host: broker.host().to_owned(),
        port: broker.port(),
    };
    let mut config = ServiceConfig::new(
        registry_path.clone(),
        endpoint.clone(),
        ClientIdentity {
            cert: pki.service.cert.clone(),
            key: pki.service.key.clone(),
            ca: pki.service.ca.clone(),
        },
    );
    config.retention = retention;
    config.inventory_on_connect = false;
    let service = ServiceHandle::start(config)?;
    let counters = service.counters.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while counters.get(&counters.connects) == 0 {
        if Instant::now() > deadline {
            bail!(
                "fleet service did not connect; broker log:\n{}",
                broker.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500)); // SUBACK

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let acked = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(args.devices + 1));
    let per_second = if args.rate == 0 {
        0.0
    } else {
        args.rate as f64 / args.devices as f64
    };
    let mut tasks = Vec::new();
    for (id, identity) in &identities {
        let opts = mqtt::options(id.as_str(), &endpoint, identity, Duration::from_secs(60))?;
        tasks.push(runtime.spawn(device(
            id.clone(),
            opts,
            per_device,
            per_second,
            acked.clone(),
            barrier.clone(),
        )));
    }
    runtime.block_on(barrier.wait());
    let start = Instant::now();
    let committed_at_start = counters.get(&counters.committed);

    // Poll the committed counter every 50 ms; keep one sample per second.
    let mut samples: Vec<u64> = Vec::new();
    let mut second_start = committed_at_start;
    let mut next_second = start + Duration::from_secs(1);
    let mut last = committed_at_start;
    let mut last_change = Instant::now();
    let mut done_at = None;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = counters.get(&counters.committed);
        if now != last {
            last_change = Instant::now();
            last = now;
        }
        if Instant::now() >= next_second {
            eprintln!(
                "  t={:>3}s committed {:>7} of {total}, broker acked {:>7}",
                start.elapsed().as_secs(),
                now - committed_at_start,
                acked.load(Ordering::Relaxed)
            );
            samples.push(now - second_start);
            second_start = now;
            next_second += Duration::from_secs(1);
        }
        if now - committed_at_start >= total {
            done_at = Some(start.elapsed());
            samples.push(now - second_start);
            break;
        }
        if last_change.elapsed() > Duration::from_secs(15)
            || start.elapsed() > Duration::from_secs(args.seconds * 3 + 60)
        {
            break;
        }
    }
    let publish_results = runtime.block_on(async {
        let mut errors = Vec::new();
        for t in tasks {
            match tokio::time::timeout(Duration::from_secs(30), t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => errors.push(e.to_string()),
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(_) => errors.push("device did not finish within 30 s".into()),
            }
        }
        errors
    });
    let committed = counters.get(&counters.committed) - committed_at_start;
    let dropped = counters.get(&counters.dropped);
    service.stop()?;

    // The registry is the judge: one row per message sent, each exactly once.
    let stats = store.stats()?;
    let mut missing = 0u64;
    let mut duplicated = 0u64;
    for (id, _) in &identities {
        let rows = store.telemetry_history(id, per_device as u32 + 10)?;
        let seqs: BTreeSet<u64> = rows.iter().map(|r| r.ts).collect();
        duplicated += rows.len() as u64 - seqs.len() as u64;
        missing += (0..per_device).filter(|s| !seqs.contains(s)).count() as u64;
    }
    let wal = std::fs::metadata(registry_path.with_extension("db-wal"))
        .map(|m| m.len())
        .unwrap_or(0);

    println!();
    println!(
        "sent (PUBACKed by broker)   {}",
        acked.load(Ordering::Relaxed)
    );
    println!("committed by fleet service  {committed} (dropped {dropped})");
    println!(
        "rows in registry            {} (telemetry_received {})",
        stats.telemetry_rows, stats.telemetry_received
    );
    println!("missing / duplicated        {missing} / {duplicated}");
    match done_at {
        Some(t) => {
            let rate = total as f64 / t.as_secs_f64();
            println!(
                "end-to-end                  {total} messages persisted in {:.2} s = {rate:.0} msg/s",
                t.as_secs_f64()
            );
        }
        None => {
            println!("end-to-end                  NOT all persisted (stalled)");
            let log = broker.log();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            println!("broker log (last lines):");
            for l in tail.iter().rev() {
                println!("  {l}");
            }
        }
    }
    // Steady state: the full seconds between the first and the last.
    let steady: Vec<u64> = samples
        .iter()
        .copied()
        .skip(1)
        .take(samples.len().saturating_sub(2))
        .collect();
    if !steady.is_empty() {
        println!(
            "per-second commits          min {} / max {} msg/s over {} steady seconds ({:?})",
            steady.iter().min().unwrap(),
            steady.iter().max().unwrap(),
            steady.len(),
            samples
        );
    }
    println!(
        "batches                     {} (mean {:.0} msg per transaction)",
        counters.get(&counters.batches),
        counters.get(&counters.committed) as f64 / counters.get(&counters.batches).max(1) as f64
    );
    println!(
        "registry size               {} bytes + WAL {} bytes: {} bytes/device with {per_device} samples each, {:.0} bytes/sample",
        stats.db_bytes,
        wal,
        stats.db_bytes / args.devices as u64,
        stats.db_bytes as f64 / stats.telemetry_rows.max(1) as f64
    );
    let per_sample = stats.db_bytes as f64 / stats.telemetry_rows.max(1) as f64;
    println!(
        "at the default history cap   ~{:.0} KiB/device ({} samples kept per device)",
        per_sample * Retention::default().telemetry_per_device as f64 / 1024.0,
        Retention::default().telemetry_per_device
    );
    if !publish_results.is_empty() {
        println!(
            "publisher errors: {} (first: {})",
            publish_results.len(),
            publish_results[0]
        );
    }
    if missing > 0 && acked.load(Ordering::Relaxed) == total {
        println!(
            "note: the broker acknowledged every message but did not deliver {missing}: \
             Mosquitto drops QoS 1 messages for a subscriber once more than \
             max_queued_messages (default 1000) wait for it; see --broker-conf"
        );
    }
    let ok = missing == 0 && duplicated == 0 && done_at.is_some() && publish_results.is_empty();
    println!(
        "result                      {}",
        if ok { "NO LOSS" } else { "LOSS OR FAILURE" }
    );
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
