//! `edgebind fleet serve` and the connection helpers shared with the device
//! commands (broker address, operator/service identities).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use edgebind_certs::profile::default_days;
use edgebind_certs::{Pki, Validity};
use edgebind_fleet::mqtt::{BrokerEndpoint, ClientIdentity};
use edgebind_fleet::registry::Store;
use edgebind_fleet::service::{self, Counters, ServiceConfig};
use edgebind_protocol::Principal;

use crate::home::Home;

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Run the fleet service: ingest status/telemetry/events/results into the
    /// registry, publish desired settings, deliver queued and on-connect actions.
    #[command(after_help = "Examples:\n  \
        edgebind fleet serve\n  \
        edgebind fleet serve --broker 127.0.0.1:8883 --log-level debug\n\n\
        The service connects as `service:fleet` with the identity in \
        <home>/identities/service-fleet/ (issued from <home>/pki on first use). Stop it with SIGINT or SIGTERM: what it \
        received is committed before it exits.")]
    Serve(ServeArgs),
    /// Registry figures: devices, telemetry rows, size on disk.
    Stats(StatsArgs),
}

#[derive(Args, Clone)]
pub struct ConnectArgs {
    /// Broker address `host:port` (default: from <home>/broker/settings.toml).
    #[arg(long, env = "EDGEBIND_BROKER")]
    pub broker: Option<String>,
    /// Directory with this client's identity (`<name>.crt`, `<name>.key`, `ca.crt`).
    #[arg(long)]
    pub identity: Option<PathBuf>,
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
    /// Log filter (`info`, `debug`, `edgebind_fleet=debug`...).
    #[arg(long, env = "EDGEBIND_LOG", default_value = "info")]
    pub log_level: String,
}

#[derive(Args)]
pub struct StatsArgs {
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: FleetCommand, home: &Home) -> anyhow::Result<ExitCode> {
    match cmd {
        FleetCommand::Serve(args) => serve(args, home),
        FleetCommand::Stats(args) => stats(args, home),
    }
}

fn serve(args: ServeArgs, home: &Home) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log_level)
                .with_context(|| format!("invalid --log-level {:?}", args.log_level))?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let endpoint = broker_endpoint(home, args.connect.broker.as_deref())?;
    let principal = Principal::from_cn(&format!("service:{}", service::SERVICE_NAME))?;
    let identity = match &args.connect.identity {
        Some(dir) => find_identity(dir, &[service::SERVICE_NAME, "service", "client"])?,
        None => ensure_identity(
            home,
            &edgebind_certs::layout::identity_dir(home.root(), &principal),
            &principal,
            default_days::SERVICE,
        )?,
    };
    let mut config = ServiceConfig::new(home.registry(), endpoint, identity);
    config.batch_max = args.batch_max;
    config.batch_window = Duration::from_millis(args.batch_window_ms);
    config.inventory_on_connect = !args.no_inventory_on_connect;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
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

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn stats(args: StatsArgs, home: &Home) -> anyhow::Result<ExitCode> {
    let store = open_registry(home)?;
    let s = store.stats()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
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
    }
    Ok(ExitCode::SUCCESS)
}

/// The registry of this fleet home.
pub(crate) fn open_registry(home: &Home) -> anyhow::Result<Box<dyn Store>> {
    Ok(edgebind_fleet::registry::open_store(
        &home.registry(),
        edgebind_fleet::registry::Retention::default(),
    )?)
}

/// Where to reach the broker: `--broker host:port`, else the broker settings of the home.
pub(crate) fn broker_endpoint(home: &Home, flag: Option<&str>) -> anyhow::Result<BrokerEndpoint> {
    if let Some(addr) = flag {
        let (host, port) = addr
            .rsplit_once(':')
            .with_context(|| format!("--broker {addr:?}: expected host:port"))?;
        let port = port
            .parse()
            .with_context(|| format!("--broker {addr:?}: bad port"))?;
        return Ok(BrokerEndpoint {
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
        });
    }
    let settings = edgebind_broker::BrokerSettings::load(&home.broker_dir()).with_context(
        || "no broker address: pass --broker host:port or run `edgebind broker config` first",
    )?;
    Ok(BrokerEndpoint {
        host: settings.client_host(),
        port: settings.port,
    })
}

/// An identity in `dir`: the first `<stem>.crt` + `<stem>.key` pair found, with `ca.crt`.
pub(crate) fn find_identity(dir: &Path, stems: &[&str]) -> anyhow::Result<ClientIdentity> {
    for stem in stems {
        let id = ClientIdentity::in_dir(dir, stem);
        if id.cert.is_file() && id.key.is_file() {
            if !id.ca.is_file() {
                bail!("{} has {stem}.crt but no ca.crt", dir.display());
            }
            return Ok(id);
        }
    }
    bail!(
        "no identity in {} (looked for {} with a .key and ca.crt)",
        dir.display(),
        stems
            .iter()
            .map(|s| format!("{s}.crt"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The identity for `principal` in `dir`; issued from the fleet PKI (and the
/// broker's ACL refreshed so it gets its grants) when there is none yet.
pub(crate) fn ensure_identity(
    home: &Home,
    dir: &Path,
    principal: &Principal,
    days: u32,
) -> anyhow::Result<ClientIdentity> {
    let stem = edgebind_certs::layout::CLIENT_STEM;
    if let Ok(found) = find_identity(dir, &[stem, principal.role()]) {
        return Ok(found);
    }
    let pki = Pki::open(&home.pki_dir()).with_context(|| {
        format!(
            "no identity in {} and no fleet PKI to issue one (run `edgebind pki init`)",
            dir.display()
        )
    })?;
    let issued = pki.issue(principal, Validity::days(days))?;
    issued.write_identity(dir, stem, pki.root_pem())?;
    eprintln!(
        "edgebind: issued {} (serial {}) into {}",
        principal.cn(),
        issued.serial,
        dir.display()
    );
    refresh_broker_policy(home, &pki)?;
    find_identity(dir, &[stem])
}

/// Re-render the broker's ACL and CRL from the PKI and signal a running
/// broker. Returns whether a running broker was signalled.
pub(crate) fn refresh_broker_policy(home: &Home, pki: &Pki) -> anyhow::Result<bool> {
    let dir = home.broker_dir();
    let settings = match edgebind_broker::BrokerSettings::load(&dir) {
        Ok(s) => s,
        Err(edgebind_broker::Error::NotConfigured { .. }) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    edgebind_broker::regenerate_policy(&dir, pki, &settings)?;
    match edgebind_broker::process::reload(&dir) {
        Ok(_) => Ok(true),
        Err(edgebind_broker::Error::NotRunning(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
