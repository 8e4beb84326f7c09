//! `edgebind fleet serve|stats|init|check|backup`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use edgebind_certs::profile::default_days;
use edgebind_fleet::ops::renew::RenewalPolicy;
use edgebind_fleet::ops::{self, FleetHome, identity};
use edgebind_fleet::registry::{RegistryUrl, Retention, SqliteStore};
use edgebind_fleet::service::{self, Counters, ServiceConfig};
use edgebind_protocol::Principal;

use crate::connect::ConnectArgs;

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Run the fleet service: ingest status/telemetry/events/results into the
    /// registry, publish desired settings, deliver queued and on-connect actions.
    #[command(after_help = "Examples:\n  \
        edgebind fleet serve\n  \
        edgebind fleet serve --broker 127.0.0.1:8883 --log-level debug\n  \
        EDGEBIND_REGISTRY=postgres://fleet@db/edgebind edgebind fleet serve --instance fleet-2\n\n\
        The service connects as `service:fleet` with the identity in \
        <home>/identities/service-fleet/ (issued from <home>/pki on first use). Stop it with SIGINT or SIGTERM: what it \
        received is committed before it exits. Several instances (each its own --instance) share the \
        work through one MQTT 5 shared subscription; a killed instance's share waits in its broker \
        session until it is back.")]
    Serve(Box<ServeArgs>),
    /// Registry figures: devices, telemetry rows, size on disk.
    Stats(StatsArgs),
    /// Create an empty registry where none is (a home made before registries
    /// were created by `pki init`, or a deliberate fresh start).
    #[command(
        after_help = "Refuses nothing that exists: an existing registry is only opened (and so \
        checked). Edgebind never creates a registry silently, so a registry that was deleted or \
        moved is an error everywhere else instead of an empty fleet."
    )]
    Init,
    /// Full integrity check of the registry (SQLite `integrity_check`; every page is read).
    #[command(
        after_help = "Exit status: 0 when the registry is sound, 1 when damage was found \
        (restore from a backup), 2 when it cannot be opened at all. Every command already runs \
        the cheaper quick_check when it opens the registry."
    )]
    Check,
    /// Consistent online copy of the registry (SQLite), safe while `fleet serve` runs.
    #[command(after_help = "Examples:\n  \
        edgebind fleet backup /srv/backup/registry-$(date +%F).db\n\n\
        The copy is made inside one read transaction (VACUUM INTO), so it is consistent even \
        while the fleet service writes. Restore by stopping the service and putting the copy in \
        place of <home>/registry.db. A PostgreSQL registry is backed up with pg_dump.")]
    Backup {
        /// The new file to write (must not exist).
        dest: PathBuf,
    },
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Most messages written per registry transaction.
    #[arg(long, default_value_t = 5000)]
    pub batch_max: usize,
    /// Longest time (ms) a batch keeps collecting under load before it commits.
    #[arg(long, default_value_t = 100)]
    pub batch_window_ms: u64,
    /// Do not ask devices for their inventory when they connect.
    #[arg(long)]
    pub no_inventory_on_connect: bool,
    /// This instance's name when several share the work: it connects as
    /// `service:NAME` (each instance needs its own identity, issued on first
    /// use into <home>/identities/service-NAME/). All instances share one
    /// MQTT 5 shared subscription and one registry (PostgreSQL).
    #[arg(long, default_value = service::SERVICE_NAME, value_name = "NAME")]
    pub instance: String,
    /// Log filter (`info`, `debug`, `edgebind_fleet=debug`...).
    #[arg(long, env = "EDGEBIND_LOG", default_value = "info")]
    pub log_level: String,
    /// Port of the broker's provisioning listener where claim requests
    /// arrive [default: the broker settings' provisioning port; without
    /// one, claim provisioning is off].
    #[arg(long, value_name = "PORT")]
    pub provisioning_port: Option<u16>,
    /// Do not answer claim requests even if the broker has a provisioning listener.
    #[arg(long, conflicts_with = "provisioning_port")]
    pub no_provisioning: bool,
    /// The board units provisioned by the claim flow are registered with.
    #[arg(long, default_value = "raspberrypi3-64")]
    pub claim_board: String,
    /// Lifetime in days of the certificates the claim flow issues.
    #[arg(long, default_value_t = default_days::DEVICE)]
    pub claim_days: u32,
    /// Claim requests answered per second and batch (per instance), after a burst of --claim-burst.
    #[arg(long, default_value_t = 50.0)]
    pub claim_rate: f64,
    #[arg(long, default_value_t = 100)]
    pub claim_burst: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics (a loopback address, e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Never throttle the fleet (by default the service publishes the fleet-wide throttle when
    /// what waits at the broker reaches half of the queue the broker's burst budget sized).
    #[arg(long)]
    pub no_push_back: bool,
    /// Publish the fleet's reconnect window (retained, on every connect and whenever the
    /// registered fleet grows or shrinks to another window): the registered devices ÷ this
    /// many mutual-TLS connections a second (measure the broker's rate with `edgebind sim`,
    /// give ~80 % of it). Agents then spread their reconnections over it.
    #[arg(long, value_name = "PER_S", value_parser = positive_rate)]
    pub reconnect_accept_rate: Option<f64>,
    #[command(flatten)]
    pub renewal: RenewalArgs,
}

/// How this instance answers devices' certificate renewals.
#[derive(Args)]
pub struct RenewalArgs {
    /// Lifetime of a certificate signed by renewal, in days (the fleet's
    /// device lifetime: agents renew at about two thirds of it).
    #[arg(long, default_value_t = default_days::DEVICE, value_name = "DAYS")]
    pub device_cert_days: u32,
    /// The same in seconds, overriding --device-cert-days (short-lived test fleets).
    #[arg(long, value_name = "SECONDS", hide = true)]
    pub device_cert_seconds: Option<u64>,
    /// At most one renewal signed per device in this many seconds.
    #[arg(long, default_value_t = RenewalPolicy::default().min_interval_s, value_name = "SECONDS")]
    pub renewal_min_interval_s: u64,
    /// How long a device's previous certificate stays valid after it
    /// connected with its renewed one, before it is revoked.
    #[arg(long, default_value_t = RenewalPolicy::default().grace_s, value_name = "SECONDS")]
    pub renewal_grace_s: u64,
    /// Do not answer renewal requests (another instance does, or none should).
    #[arg(long)]
    pub no_renewal: bool,
}

impl RenewalArgs {
    fn policy(&self) -> RenewalPolicy {
        RenewalPolicy {
            validity_s: self
                .device_cert_seconds
                .unwrap_or(u64::from(self.device_cert_days) * 86_400),
            min_interval_s: self.renewal_min_interval_s,
            grace_s: self.renewal_grace_s,
        }
    }
}

#[derive(Args)]
pub struct StatsArgs {
    #[arg(long)]
    pub json: bool,
}

/// A rate in connections a second: a finite number above zero.
fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a positive number of connections a second"
        )),
    }
}

pub fn run(cmd: FleetCommand, home: &FleetHome) -> anyhow::Result<ExitCode> {
    match cmd {
        FleetCommand::Serve(args) => serve(*args, home),
        FleetCommand::Stats(args) => stats(args, home),
        FleetCommand::Init => {
            let store = home.create_registry()?;
            println!("registry ready: {}", store.location());
            Ok(ExitCode::SUCCESS)
        }
        FleetCommand::Check => check(home),
        FleetCommand::Backup { dest } => backup(home, &dest),
    }
}

/// The SQLite registry of this home, for the file-level commands.
fn sqlite_registry(home: &FleetHome) -> anyhow::Result<SqliteStore> {
    match home.registry() {
        RegistryUrl::Sqlite(path) => Ok(SqliteStore::open(&path, Retention::default())?),
        RegistryUrl::Postgres(_) => anyhow::bail!(
            "the registry is on PostgreSQL: check it with the server's tools (amcheck) and back it \
             up with pg_dump"
        ),
    }
}

fn check(home: &FleetHome) -> anyhow::Result<ExitCode> {
    let store = match sqlite_registry(home) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edgebind: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let problems = store.integrity_check()?;
    if problems.is_empty() {
        println!("registry {}: integrity_check ok", store.path().display());
        return Ok(ExitCode::SUCCESS);
    }
    for p in &problems {
        println!("{p}");
    }
    eprintln!(
        "registry {} is damaged ({} problem(s) above): restore it from a backup",
        store.path().display(),
        problems.len()
    );
    Ok(ExitCode::FAILURE)
}

fn backup(home: &FleetHome, dest: &Path) -> anyhow::Result<ExitCode> {
    let store = sqlite_registry(home)?;
    store.backup_to(dest)?;
    let copy = SqliteStore::open(dest, Retention::default())
        .context("the backup copy does not open as a registry")?;
    let problems = copy.integrity_check()?;
    anyhow::ensure!(
        problems.is_empty(),
        "the backup copy fails integrity_check: {problems:?}"
    );
    println!(
        "registry {} backed up to {} ({} bytes, integrity_check ok)",
        store.path().display(),
        dest.display(),
        std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0)
    );
    Ok(ExitCode::SUCCESS)
}

fn serve(args: ServeArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log_level)
                .with_context(|| format!("invalid --log-level {:?}", args.log_level))?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(addr) = args.metrics {
        service::metrics::check_addr(addr)?;
    }
    let endpoint = ops::broker_endpoint(home, args.connect.broker.as_deref()).context(
        "no broker address: pass --broker host:port or run `edgebind broker config` first",
    )?;
    let principal = Principal::from_cn(&format!("service:{}", args.instance))
        .with_context(|| format!("--instance {:?}", args.instance))?;
    let identity = match &args.connect.identity {
        Some(dir) => identity::find_identity(dir, &[args.instance.as_str(), "service", "client"])?,
        None => {
            let found = identity::ensure_identity(
                home,
                &home.identity_dir(&principal),
                &principal,
                default_days::SERVICE,
            )?;
            if let Some(i) = &found.issued {
                eprintln!(
                    "edgebind: issued {} (serial {}) into {}",
                    i.cn,
                    i.serial,
                    i.dir.display()
                );
            }
            found.files
        }
    };
    let mut config = ServiceConfig::new(home.registry(), endpoint, identity);
    config.instance = args.instance.clone();
    config.batch_max = args.batch_max;
    config.batch_window = Duration::from_millis(args.batch_window_ms);
    config.inventory_on_connect = !args.no_inventory_on_connect;
    if !args.renewal.no_renewal {
        config.renewal = Some(service::RenewalService {
            home: home.clone(),
            policy: args.renewal.policy(),
        });
    }
    config.provisioning = provisioning(&args, home, &config.endpoint)?;
    config.push_back = if args.no_push_back {
        None
    } else {
        // The budget `broker config` used; its default when the broker is
        // configured elsewhere.
        let budget = edgebind_broker::BrokerSettings::load(&home.broker_dir())
            .map(|s| s.budget)
            .unwrap_or_default();
        Some(service::push_back::PushBackPolicy::from_budget(&budget))
    };
    if let Some(rate) = args.reconnect_accept_rate {
        let store = home.open_registry()?;
        let by = format!("service:{}", args.instance);
        let hint = edgebind_fleet::ops::reconnect_hint(store.as_ref(), rate, &by)?;
        eprintln!(
            "reconnect window: {} s ({} devices at {rate}/s), resized as the registry grows",
            hint.window_s,
            store.stats()?.devices
        );
        config.reconnect_accept_rate = Some(rate);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    if let Some(addr) = args.metrics {
        let listener = runtime.block_on(service::metrics::MetricsListener::bind(addr))?;
        config.metrics = Some(listener);
    }
    let counters = Arc::new(Counters::default());
    runtime.block_on(service::run(config, counters.clone(), shutdown_signal()))?;
    eprintln!(
        "edgebind fleet: stopped after {} messages ({} dropped) in {} batches",
        counters.get(&counters.committed),
        counters.get(&counters.dropped),
        counters.get(&counters.batches)
    );
    Ok(ExitCode::SUCCESS)
}

/// Claim provisioning when the broker has a provisioning listener.
fn provisioning(
    args: &ServeArgs,
    home: &FleetHome,
    endpoint: &edgebind_fleet::mqtt::BrokerEndpoint,
) -> anyhow::Result<Option<edgebind_fleet::service::provision::ProvisionConfig>> {
    use edgebind_fleet::service::provision::{ProvisionConfig, RateLimit};
    if args.no_provisioning {
        return Ok(None);
    }
    let port = match args.provisioning_port {
        Some(p) => Some(p),
        None => edgebind_broker::BrokerSettings::load(&home.broker_dir())
            .ok()
            .and_then(|s| s.provisioning_port),
    };
    let Some(port) = port else {
        return Ok(None);
    };
    if args.claim_rate.is_nan() || args.claim_rate <= 0.0 {
        anyhow::bail!("--claim-rate must be above 0");
    }
    Ok(Some(ProvisionConfig {
        endpoint: edgebind_fleet::mqtt::BrokerEndpoint {
            host: endpoint.host.clone(),
            port,
        },
        pki_dir: home.pki_dir(),
        board: args
            .claim_board
            .parse()
            .with_context(|| format!("--claim-board {:?}", args.claim_board))?,
        validity_days: args.claim_days,
        rate: RateLimit {
            per_second: args.claim_rate,
            burst: args.claim_burst,
        },
    }))
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn stats(args: StatsArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let store = home.open_registry()?;
    let s = store.stats()?;
    let services = store.services()?;
    // The largest count any service read: the broker's counter only grows
    // while it runs, so that is the freshest one.
    let broker_dropped = services.iter().filter_map(|p| p.broker_dropped).max();
    if args.json {
        let mut v = serde_json::to_value(&s)?;
        v["services"] = serde_json::to_value(&services)?;
        v["broker_dropped"] = serde_json::to_value(broker_dropped)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("registry           {}", store.location());
        println!("devices            {}", s.devices);
        println!("telemetry rows     {}", s.telemetry_rows);
        println!("telemetry received {}", s.telemetry_received);
        println!("events             {}", s.events);
        println!("commands           {}", s.commands);
        println!("database bytes     {}", s.db_bytes);
        if let Some(per) = s.db_bytes.checked_div(s.devices) {
            println!("bytes per device   {per}");
        }
        for p in &services {
            println!(
                "service {:<10} {} since {}, lag {} messages (oldest uncommitted {}), \
                 broker holding {} at {}{}",
                p.name,
                if p.connected {
                    "connected"
                } else {
                    "not connected"
                },
                crate::render::unix_time(Some(p.since)),
                p.lag,
                p.oldest_uncommitted_s
                    .map_or("none".to_owned(), |s| format!("{s} s old")),
                p.broker_waiting
                    .map_or("unknown".to_owned(), |w| format!("{w} messages")),
                crate::render::unix_time(Some(p.seen_at)),
                if p.push_back {
                    ", THROTTLING the fleet (push-back)"
                } else {
                    ""
                },
            );
        }
        match broker_dropped {
            Some(0) => println!("broker dropped     0 messages since it started"),
            Some(n) => println!(
                "broker dropped     {n} messages since it started: a client's queue was full, \
                 acknowledged device data may be lost (see the README's overload section)"
            ),
            None => {
                println!("broker dropped     unknown (no service has read the broker's counter)")
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
