//! Telemetry ingest benchmark: simulated devices publish telemetry (QoS 1,
//! the real agent's QoS, mutual TLS) through a real Mosquitto to the fleet
//! service, which writes it to the registry (SQLite or PostgreSQL). The
//! service runs as real `edgebind fleet serve --instance NAME` processes
//! (one or more, sharing the ingest through MQTT 5 shared subscriptions), so
//! one can be killed with SIGKILL halfway. Prints the offered rate (what the
//! broker acknowledged to the devices per second), the rate persisted end to
//! end, the largest lag (acknowledged but not yet in the registry), and a
//! loss check (every message sent is a row, exactly once).
//!
//! ```text
//! cargo run --release -p edgebind-tests --bin bench_ingest -- \
//!     [--devices 200] [--rate 12000] [--seconds 10] \
//!     [--backend sqlite|postgres] [--instances N] [--kill-one-halfway]
//! ```
//! `--rate 0` publishes as fast as the devices can (flat out: finds the
//! ceiling instead of checking that the service kept up with what was
//! offered). `--broker-conf LINE` adds a global option to the generated
//! mosquitto.conf (e.g. `max_queued_messages 100000`) to compare broker
//! settings. `--kill-one-halfway` kills the last instance with SIGKILL once
//! half the messages are in the registry and starts it again 2 s later (as
//! systemd's `Restart=` would), as a new process.
//!
//! `--backlog` separates the service's ceiling from the publishers' (on a
//! 2-core machine the simulated devices' TLS and the broker take most of
//! the CPU, so a live run measures what the devices can offer, not what the
//! service can take): the instances subscribe, stop (their persistent
//! sessions stay), the devices publish everything, which the broker
//! acknowledges and queues, and only then do the instances start again and
//! drain the backlog, as after a fleet service outage. `achieved` is then
//! the drain rate from the instances' start to the last commit, and
//! `--kill-one-halfway` applies to the drain.
//!
//! `--push-back` sizes the broker's queue from a burst budget smaller than
//! the burst (`--budget-outage-s`, default 150 s of the devices at 1 Hz:
//! a queue of 300 messages a device, push-back at half), lets the instances
//! throttle the fleet and makes the devices obey the throttle like the agent
//! does (`edgebind_agent::throttle::Pacer`, and at most the agent's outbox
//! window of records unacknowledged): the broker must drop nothing.
//! Every run reports the messages the broker dropped (its `$SYS` counter as
//! the instances recorded it), the peak lag and the time from that peak
//! until the lag was back to zero.
//!
//! Every run ends with one line starting `bench_ingest:` that holds the
//! figures to quote.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edgebind_agent::throttle::Pacer;
use edgebind_fleet::mqtt::{self, BrokerEndpoint, ClientIdentity};
use edgebind_fleet::registry::{self, NewDevice, RegistryUrl, Retention};
use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::now_unix;
use edgebind_protocol::throttle;
use edgebind_protocol::topics::Topic;
use edgebind_tests::{Broker, PgCluster, TestPki, bin_path, spawn_tied};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

struct Args {
    devices: usize,
    rate: u64,
    seconds: u64,
    /// Extra mosquitto.conf lines (global options) to try against the generated config.
    broker_conf: Vec<String>,
    backend: Backend,
    instances: usize,
    kill_one_halfway: bool,
    backlog: bool,
    push_back: bool,
    budget_outage_s: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        devices: 200,
        rate: 12_000,
        seconds: 10,
        broker_conf: Vec::new(),
        backend: Backend::Sqlite,
        instances: 1,
        kill_one_halfway: false,
        backlog: false,
        push_back: false,
        budget_outage_s: 150,
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
            "--instances" => args.instances = value()? as usize,
            "--kill-one-halfway" => args.kill_one_halfway = true,
            "--backlog" => args.backlog = true,
            "--push-back" => args.push_back = true,
            "--budget-outage-s" => args.budget_outage_s = value()?.max(1),
            "--backend" => {
                args.backend = match it.next().as_deref() {
                    Some("sqlite") => Backend::Sqlite,
                    Some("postgres") => Backend::Postgres,
                    other => bail!("--backend sqlite|postgres, not {other:?}"),
                }
            }
            "--broker-conf" => args.broker_conf.push(
                it.next()
                    .context("--broker-conf needs a mosquitto.conf line")?,
            ),
            "-h" | "--help" => {
                println!(
                    "bench_ingest [--devices N] [--rate MSG_PER_S (0 = flat out)] [--seconds S] \
                     [--backend sqlite|postgres] [--instances N] [--kill-one-halfway] [--backlog] \
                     [--push-back [--budget-outage-s S]] [--broker-conf LINE]..."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if args.devices == 0 || args.seconds == 0 || args.instances == 0 {
        bail!("--devices, --seconds and --instances must be positive");
    }
    if args.kill_one_halfway && args.instances < 2 {
        bail!("--kill-one-halfway needs --instances 2 or more (someone has to carry on)");
    }
    Ok(args)
}

/// One `edgebind fleet serve --instance NAME` process (SIGKILLed on drop).
struct Instance {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Instance {
    /// Start the instance the way `fleet_support::Fleet::start_instance`
    /// does: its identity is issued from the fleet home on first use (and
    /// the broker policy refreshed and the broker SIGHUPed through its pid
    /// file). Does not wait for it to connect.
    fn spawn(
        home: &Path,
        registry_url: Option<&str>,
        name: &str,
        attempt: u32,
        push_back: bool,
    ) -> anyhow::Result<Instance> {
        let log = home.join(format!("fleet-service-{name}-{attempt}.log"));
        let file = File::create(&log)?;
        let mut cmd = Command::new(bin_path("edgebind"));
        cmd.arg("--home")
            .arg(home)
            .args(["fleet", "serve", "--instance", name])
            .args(["--log-level", "info", "--no-inventory-on-connect"])
            .args(if push_back {
                &[][..]
            } else {
                &["--no-push-back"][..]
            })
            .env_remove("EDGEBIND_HOME")
            .env_remove("EDGEBIND_BROKER")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        match registry_url {
            Some(url) => cmd.env("EDGEBIND_REGISTRY", url),
            None => cmd.env_remove("EDGEBIND_REGISTRY"),
        };
        let child = spawn_tied(cmd).context("spawn edgebind fleet serve")?;
        Ok(Instance {
            name: name.to_owned(),
            child,
            log,
        })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_connected(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains("fleet service connected") {
            if Instant::now() > deadline || !matches!(self.child.try_wait(), Ok(None)) {
                bail!(
                    "instance {} did not connect; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait: the service commits what it holds and prints
    /// "stopped after N messages (D dropped) in B batches".
    fn terminate(&mut self) -> Option<(u64, u64, u64)> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                self.kill9();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self.log_text();
        let line = log.lines().rev().find(|l| l.contains("stopped after"))?;
        let nums: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter(|w| !w.is_empty())
            .filter_map(|w| w.parse().ok())
            .collect();
        match nums[..] {
            [committed, dropped, batches] => Some((committed, dropped, batches)),
            _ => None,
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill9();
        }
    }
}

fn telemetry(seq: u64) -> Vec<u8> {
    // A realistic sample (~300 bytes), `ts` = sequence number so every
    // message of a device is distinguishable in the registry.
    format!(
        r#"{{"ts":{seq},"cpu_pct":12.5,"load_avg":[0.31,0.27,0.2],"mem_total_bytes":948047872,"mem_used_bytes":211652608,"disk_total_bytes":7516192768,"disk_used_bytes":1610612736,"uptime_s":{seq},"soc_temp_c":48.3,"net":[{{"iface":"eth0","rx_bytes":123456789,"tx_bytes":98765432}}]}}"#
    )
    .into_bytes()
}

/// PUBACKs counted by all devices, and when the last one came (µs after `epoch`).
struct Acks {
    acked: Arc<AtomicU64>,
    last_ack_us: Arc<AtomicU64>,
    epoch: Instant,
    /// Throttle messages in force that devices received.
    throttled: Arc<AtomicU64>,
}

/// One simulated device: connect, publish `count` messages paced at
/// `per_second` (0 = unpaced), wait for every PUBACK.
async fn device(
    id: DeviceId,
    opts: rumqttc::v5::MqttOptions,
    count: u64,
    per_second: f64,
    acks: Acks,
    start: Arc<tokio::sync::Barrier>,
    push_back: bool,
) -> anyhow::Result<()> {
    let acks = Arc::new(acks);
    let Acks {
        acked,
        last_ack_us,
        epoch,
        ..
    } = &*acks;
    let (acked, last_ack_us, epoch) = (acked.clone(), last_ack_us.clone(), *epoch);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    // Drive the connection until CONNACK. 200 TLS handshakes at once on a
    // loaded machine can time out: retry (the next poll reconnects), and
    // never leave the start barrier waiting for a device that gave up.
    let mut attempts = 0;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => {
                attempts += 1;
                if attempts >= 5 {
                    start.wait().await;
                    bail!("{id}: connect: {e} ({attempts} attempts)");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let topic = Topic::Telemetry(id.clone()).render();
    // The throttle as the agent obeys it: the event loop feeds it, the
    // publisher waits for its allowance.
    let pacer = Arc::new(std::sync::Mutex::new(Pacer::new(Instant::now())));
    if push_back {
        client
            .subscribe(throttle::TOPIC, QoS::AtLeastOnce)
            .await
            .context("subscribe to the throttle")?;
    }
    // With push-back on, a device hands the connection at most the agent's
    // outbox window of unacknowledged records, as the agent does: the rest
    // stays in its (here: notional) outbox, within the throttle's reach.
    let window = if push_back {
        edgebind_agent::runtime::OUTBOX_WINDOW as u64
    } else {
        u64::MAX
    };
    let mine_acked = Arc::new(AtomicU64::new(0));
    let acked_notify = Arc::new(tokio::sync::Notify::new());
    let (publisher_acked, publisher_notify) = (mine_acked.clone(), acked_notify.clone());
    let publisher_pacer = pacer.clone();
    let publisher = tokio::spawn(async move {
        start.wait().await;
        let begin = tokio::time::Instant::now();
        for seq in 0..count {
            while seq.saturating_sub(publisher_acked.load(Ordering::Acquire)) >= window {
                let notified = publisher_notify.notified();
                if seq.saturating_sub(publisher_acked.load(Ordering::Acquire)) < window {
                    break;
                }
                notified.await;
            }
            if per_second > 0.0 {
                let due = begin + Duration::from_secs_f64(seq as f64 / per_second);
                tokio::time::sleep_until(due).await;
            }
            loop {
                let wait = {
                    let mut p = publisher_pacer.lock().unwrap_or_else(|e| e.into_inner());
                    if p.allowance(1, Instant::now(), now_unix()) >= 1 {
                        p.spent(1, now_unix());
                        None
                    } else {
                        p.next_send_in(Instant::now(), now_unix())
                    }
                };
                match wait {
                    Some(d) => tokio::time::sleep(d.min(Duration::from_millis(100))).await,
                    None => break,
                }
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
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == throttle::TOPIC.as_bytes() => {
                let mut pacer = pacer.lock().unwrap_or_else(|e| e.into_inner());
                if pacer.on_message(&p.payload, Instant::now()).is_ok()
                    && pacer.in_force(now_unix()).is_some()
                {
                    acks.throttled.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                mine += 1;
                mine_acked.store(mine, Ordering::Release);
                acked_notify.notify_one();
                acked.fetch_add(1, Ordering::Relaxed);
                if mine == count {
                    last_ack_us.fetch_max(epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
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

/// Wait for every device task: the errors, one deadline for all (not 30 s
/// per device).
fn join_devices(
    runtime: &tokio::runtime::Runtime,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
) -> Vec<String> {
    runtime.block_on(async {
        let mut errors = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for t in tasks {
            match tokio::time::timeout_at(deadline, t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => errors.push(e.to_string()),
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(_) => errors.push("device did not finish within 60 s".into()),
            }
        }
        errors
    })
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // The service processes keep the default history per device; the loss
    // check counts rows, so no device may send more than that.
    let cap = u64::from(Retention::default().telemetry_per_device);
    let per_device = if args.rate == 0 {
        // Flat out: a fixed volume.
        (200_000 / args.devices as u64).clamp(1, cap)
    } else {
        (args.rate * args.seconds).div_ceil(args.devices as u64)
    };
    if per_device > cap {
        bail!(
            "{per_device} messages per device is more than the {cap} the registry keeps per \
             device: use more --devices (at least {})",
            (args.rate * args.seconds).div_ceil(cap)
        );
    }
    let total = per_device * args.devices as u64;
    let target = if args.rate == 0 {
        "flat out".to_owned()
    } else {
        format!("{} msg/s for {} s", args.rate, args.seconds)
    };
    println!(
        "bench_ingest: {} devices x {per_device} telemetry messages = {total}, target {target}, \
         {} registry, {} service instance(s) as processes{}",
        args.devices,
        args.backend.name(),
        args.instances,
        if args.kill_one_halfway {
            ", one killed with SIGKILL halfway and restarted 2 s later"
        } else {
            ""
        }
    );
    if args.backlog {
        println!(
            "backlog mode: the instances subscribe and stop, the devices publish everything, \
             then the instances start and drain it"
        );
    }
    if !args.broker_conf.is_empty() {
        println!("extra broker options: {}", args.broker_conf.join("; "));
    }

    let setup = Instant::now();
    let pki = TestPki::new();
    let home = pki.home().to_owned();
    let mut broker = Broker::start(&pki)?;
    let budget = if args.push_back {
        // A queue smaller than the burst, sized by the budget the way
        // `edgebind broker config --budget-*` does; the instances read it.
        let mut settings = edgebind_broker::BrokerSettings::load(broker.dir())?;
        settings.budget = edgebind_broker::Budget {
            devices: args.devices as u64,
            telemetry_interval_s: 1,
            outage_s: args.budget_outage_s,
            message_bytes: 512,
            ingest_per_s: 8000,
        };
        edgebind_broker::generate(
            broker.dir(),
            pki.pki(),
            &settings,
            &edgebind_broker::GenerateOptions::default(),
        )?;
        broker.restart()?;
        println!("{}", settings.budget.describe());
        Some(settings.budget)
    } else {
        None
    };
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
    // Declared after the broker and the PKI so it stops first (dropped in reverse).
    let pg = match args.backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(PgCluster::start()?),
    };
    let registry_url = match &pg {
        Some(pg) => Some(pg.database()?),
        None => None,
    };
    let url = match &registry_url {
        Some(u) => RegistryUrl::Postgres(u.clone()),
        None => RegistryUrl::Sqlite(home.join("registry.db")),
    };
    let mut store = registry::create_store(&url, Retention::default())?;
    let mut identities = Vec::new();
    let mut new_devices = Vec::new();
    for i in 0..args.devices {
        let id = DeviceId::new(format!("sim-{i:05}"))?;
        let identity = pki.device(id.as_str());
        new_devices.push(NewDevice {
            id: id.clone(),
            board: "raspberrypi4-64".parse()?,
            tags: BTreeSet::new(),
            cert: None,
        });
        identities.push((
            id,
            ClientIdentity {
                cert: identity.cert,
                key: identity.key,
                ca: identity.ca,
            },
        ));
    }
    store.add_devices(&new_devices)?;
    eprintln!(
        "  setup: PKI, broker and {} devices in {:.1} s",
        args.devices,
        setup.elapsed().as_secs_f64()
    );
    let endpoint = BrokerEndpoint {
        host: broker.host().to_owned(),
        port: broker.port(),
    };

    // One at a time: the first start of each issues its identity and
    // reloads the broker policy.
    let mut instances = Vec::new();
    for n in 1..=args.instances {
        let mut inst = Instance::spawn(
            &home,
            registry_url.as_deref(),
            &format!("bench-{n}"),
            1,
            args.push_back,
        )?;
        inst.wait_connected(Duration::from_secs(60))?;
        instances.push(inst);
    }
    std::thread::sleep(Duration::from_millis(500)); // SUBACKs
    eprintln!(
        "  setup: {} instance(s) connected after {:.1} s",
        args.instances,
        setup.elapsed().as_secs_f64()
    );
    // The attempt number of the instances' next start (names their logs).
    let mut attempt = 2;
    if args.backlog {
        // An orderly stop keeps each persistent session and its shared
        // subscription: the broker queues what the devices publish.
        for inst in &mut instances {
            inst.terminate();
        }
        eprintln!("  setup: instances stopped, their sessions kept by the broker");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let acked = Arc::new(AtomicU64::new(0));
    let throttled = Arc::new(AtomicU64::new(0));
    let last_ack_us = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
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
            Acks {
                acked: acked.clone(),
                last_ack_us: last_ack_us.clone(),
                epoch,
                throttled: throttled.clone(),
            },
            barrier.clone(),
            args.push_back,
        )));
    }
    if runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(120), barrier.wait()).await })
        .is_err()
    {
        bail!("the devices did not all connect within 120 s");
    }
    let publish_start = Instant::now();
    let mut early_publish_results = None;
    if args.backlog {
        early_publish_results = Some(join_devices(&runtime, std::mem::take(&mut tasks)));
        let queued = store.stats()?.telemetry_received;
        eprintln!(
            "  backlog: {} messages acknowledged by the broker in {:.2} s with no instance running ({queued} in the registry)",
            acked.load(Ordering::Relaxed),
            publish_start.elapsed().as_secs_f64()
        );
        for inst in &mut instances {
            *inst = Instance::spawn(
                &home,
                registry_url.as_deref(),
                &inst.name,
                attempt,
                args.push_back,
            )?;
        }
        attempt += 1;
    }
    let start = Instant::now();

    // Poll the registry's count of stored samples every 250 ms; keep one
    // sample per second.
    let mut samples: Vec<u64> = Vec::new();
    let mut second_start = 0;
    let mut next_second = start + Duration::from_secs(1);
    let mut last = 0;
    let mut last_change = Instant::now();
    let mut done_at = None;
    let mut all_acked_at = None;
    let mut max_lag = 0u64;
    let mut peak_at = Duration::ZERO;
    let mut killed: Option<(Duration, u64)> = None;
    let mut restart_at: Option<Instant> = None;
    let mut restarted_at: Option<Duration> = None;
    loop {
        // Every 250 ms; every 100 ms near the end, to time the last commit
        // closely. Not more often: counting the rows is a query that loads
        // the machine the service runs on.
        std::thread::sleep(Duration::from_millis(if last >= total * 9 / 10 {
            100
        } else {
            250
        }));
        let now = store.stats()?.telemetry_received;
        let sent = acked.load(Ordering::Relaxed);
        if all_acked_at.is_none() && sent >= total {
            all_acked_at = Some(start.elapsed());
        }
        let lag = sent.saturating_sub(now);
        if lag > max_lag {
            max_lag = lag;
            peak_at = start.elapsed();
        }
        if now != last {
            last_change = Instant::now();
            last = now;
        }
        if args.kill_one_halfway && killed.is_none() && now >= total / 2 {
            let victim = instances.last_mut().expect("two instances");
            victim.kill9();
            killed = Some((start.elapsed(), now));
            restart_at = Some(Instant::now() + Duration::from_secs(2));
            eprintln!(
                "  t={:.2}s SIGKILL instance {} at {now} committed",
                start.elapsed().as_secs_f64(),
                victim.name
            );
        }
        if restart_at.is_some_and(|t| Instant::now() >= t) {
            restart_at = None;
            let name = instances.last().expect("two instances").name.clone();
            let fresh = Instance::spawn(
                &home,
                registry_url.as_deref(),
                &name,
                attempt,
                args.push_back,
            )?;
            *instances.last_mut().expect("two instances") = fresh;
            restarted_at = Some(start.elapsed());
            eprintln!(
                "  t={:.2}s restarted instance {name} (new process)",
                start.elapsed().as_secs_f64()
            );
        }
        if Instant::now() >= next_second {
            eprintln!(
                "  t={:>3}s committed {:>7} of {total}, broker acked {:>7}",
                start.elapsed().as_secs(),
                now,
                sent
            );
            samples.push(now - second_start);
            second_start = now;
            next_second += Duration::from_secs(1);
        }
        if now >= total && restart_at.is_none() {
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
    let publish_results = match early_publish_results {
        Some(results) => results,
        None => join_devices(&runtime, tasks),
    };
    // The last PUBACK, exactly (the poll above only sees it within 250 ms),
    // counted from the start of publishing.
    let all_acked_at = match all_acked_at {
        Some(_) => (epoch + Duration::from_micros(last_ack_us.load(Ordering::Relaxed)))
            .saturating_duration_since(publish_start),
        None => publish_start.elapsed(),
    };
    let restarted_connected = match restarted_at {
        Some(_) => {
            let inst = instances.last_mut().expect("two instances");
            inst.wait_connected(Duration::from_secs(10)).is_ok()
        }
        None => true,
    };
    // Orderly stop; each process reports its own counters.
    let mut per_instance = Vec::new();
    for inst in &mut instances {
        per_instance.push((inst.name.clone(), inst.terminate()));
    }
    // What each instance said about it when not everything arrived.
    let instance_logs: Vec<(String, String)> = if done_at.is_none() {
        instances
            .iter()
            .map(|i| (i.name.clone(), i.log_text()))
            .collect()
    } else {
        Vec::new()
    };

    // The broker's own count of drops, as the instances last read it.
    let broker_dropped = store
        .services()?
        .iter()
        .filter_map(|p| p.broker_dropped)
        .max();
    // The registry is the judge: one row per message sent, each exactly once.
    let stats = store.stats()?;
    let mut missing = 0u64;
    let mut duplicated_rows = 0u64;
    let mut distinct = 0u64;
    for (id, _) in &identities {
        let rows = store.telemetry_history(id, per_device as u32 + 10)?;
        let seqs: BTreeSet<u64> = rows.iter().map(|r| r.ts).collect();
        duplicated_rows += rows.len() as u64 - seqs.len() as u64;
        distinct += seqs.len() as u64;
        missing += (0..per_device).filter(|s| !seqs.contains(s)).count() as u64;
    }
    // A sample counted twice shows as telemetry_received above the rows.
    let counted_twice = stats.telemetry_received.saturating_sub(distinct);
    let duplicated = duplicated_rows + counted_twice;
    let sent = acked.load(Ordering::Relaxed);

    println!();
    println!("sent (PUBACKed by broker)   {sent}");
    for (name, counters) in &per_instance {
        match counters {
            Some((c, d, b)) => println!(
                "instance {name:<18} committed {c} (dropped {d}) in {b} batches ({:.0} msg per transaction) since its last start",
                *c as f64 / (*b).max(1) as f64
            ),
            None => println!("instance {name:<18} did not report its counters on SIGTERM"),
        }
    }
    println!(
        "rows in registry            {} (telemetry_received {})",
        stats.telemetry_rows, stats.telemetry_received
    );
    println!(
        "missing / duplicated        {missing} / {duplicated} ({duplicated_rows} duplicate rows, {counted_twice} counted twice)"
    );
    if let Some((at, committed)) = killed {
        println!(
            "kill -9                     at t={:.2}s with {committed} committed; restarted at t={:.2}s, reconnected: {}",
            at.as_secs_f64(),
            restarted_at.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN),
            if restarted_connected { "yes" } else { "NO" }
        );
    }
    let offered = sent as f64 / all_acked_at.as_secs_f64();
    println!(
        "offered                     {sent} messages acknowledged by the broker in {:.2} s = {offered:.0} msg/s (target {target})",
        all_acked_at.as_secs_f64()
    );
    let achieved = match done_at {
        Some(t) => {
            let rate = total as f64 / t.as_secs_f64();
            if args.backlog {
                println!(
                    "drain                       {total} queued messages persisted in {:.2} s from the instances' start = {rate:.0} msg/s",
                    t.as_secs_f64()
                );
            } else {
                println!(
                    "end-to-end                  {total} messages persisted in {:.2} s = {rate:.0} msg/s ({:.2} s after the last PUBACK)",
                    t.as_secs_f64(),
                    (publish_start.elapsed() - start.elapsed()).as_secs_f64() + t.as_secs_f64()
                        - all_acked_at.as_secs_f64()
                );
            }
            Some(rate)
        }
        None => {
            println!("end-to-end                  NOT all persisted (stalled)");
            let log = broker.log();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            println!("broker log (last lines):");
            for l in tail.iter().rev() {
                println!("  {l}");
            }
            for (name, log) in &instance_logs {
                println!("instance {name} log (warnings and errors, last 25):");
                let noted: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect();
                for l in noted.iter().rev().take(25).rev() {
                    println!("  {l}");
                }
            }
            None
        }
    };
    println!(
        "max lag                     {max_lag} messages acknowledged by the broker but not yet in the registry, at t={:.2}s",
        peak_at.as_secs_f64()
    );
    let lag_zero_after = done_at.map(|t| t.saturating_sub(peak_at));
    println!(
        "lag back to zero            {} after the peak",
        lag_zero_after.map_or("never".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
    );
    println!(
        "broker dropped              {} (its $SYS counter as the instances recorded it)",
        broker_dropped.map_or("unknown".to_owned(), |d| d.to_string())
    );
    if args.push_back {
        println!(
            "push-back                   {} throttle messages in force reached the devices",
            throttled.load(Ordering::Relaxed)
        );
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
        "registry size               {} bytes: {} bytes/device with {per_device} samples each, {:.0} bytes/sample",
        stats.db_bytes,
        stats.db_bytes / args.devices as u64,
        stats.db_bytes as f64 / stats.telemetry_rows.max(1) as f64
    );
    if !publish_results.is_empty() {
        println!(
            "publisher errors: {} (first: {})",
            publish_results.len(),
            publish_results[0]
        );
    }
    if missing > 0 && sent == total {
        println!(
            "note: the broker acknowledged every message but did not deliver {missing}: \
             Mosquitto drops QoS 1 messages for a subscriber once more than \
             max_queued_messages (default 1000) wait for it; see --broker-conf"
        );
    }
    let ok = missing == 0
        && duplicated == 0
        && (!args.push_back || broker_dropped == Some(0))
        && done_at.is_some()
        && publish_results.is_empty()
        && restarted_connected;
    println!(
        "result                      {}",
        if ok { "NO LOSS" } else { "LOSS OR FAILURE" }
    );
    println!(
        "bench_ingest: backend={} instances={} kill={} push_back={} devices={} messages={total} target={} offered={offered:.0} msg/s achieved={} msg/s broker_dropped={} max_lag={max_lag} lag_zero_after={} lost={missing} duplicated={duplicated}{}{} result={}",
        args.backend.name(),
        args.instances,
        if args.kill_one_halfway { "yes" } else { "no" },
        if args.push_back { "on" } else { "off" },
        args.devices,
        match (args.backlog, args.rate) {
            (true, _) => "backlog".to_owned(),
            (false, 0) => "flat-out".to_owned(),
            (false, rate) => rate.to_string(),
        },
        achieved.map_or_else(|| "stalled".to_owned(), |r| format!("{r:.0}")),
        broker_dropped.map_or("unknown".to_owned(), |d| d.to_string()),
        lag_zero_after.map_or("never".to_owned(), |d| format!("{:.2}s", d.as_secs_f64())),
        budget.map_or(String::new(), |b| format!(
            " max_queued_messages={} push_back_at={}",
            b.limits().max_queued_messages,
            b.limits().push_back_at
        )),
        if args.broker_conf.is_empty() {
            String::new()
        } else {
            format!(" broker_conf=\"{}\"", args.broker_conf.join("; "))
        },
        if ok { "ok" } else { "FAIL" }
    );
    drop(instances);
    drop(store);
    drop(pg);
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
