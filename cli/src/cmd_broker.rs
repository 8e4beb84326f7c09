//! `edgebind broker ...`: generate, run and reload the least-privilege Mosquitto.

use std::net::IpAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use edgebind_broker::{BrokerSettings, GenerateOptions, Generated, process, supervise};
use edgebind_certs::Pki;
use time::OffsetDateTime;

use edgebind_fleet::ops::{self, FleetHome};

use crate::crl_warning::warn_crl;
use crate::render;

#[derive(Subcommand)]
pub enum BrokerCommand {
    /// Write mosquitto.conf, the ACL, the CRL and the broker's TLS identity into <home>/broker.
    #[command(after_help = "\
Examples:
  edgebind broker config --host broker.example.net
  edgebind broker config --host localhost --ip 127.0.0.1 --port 18883 --bind 127.0.0.1

What is generated (in <home>/broker):
  mosquitto.conf  TLS-only listeners with per_listener_settings: require_certificate,
                  use_identity_as_username, use_username_as_clientid (no client-id takeover),
                  allow_anonymous false, set_tcp_nodelay, max_packet_size from the protocol,
                  persistence (retained status/desired survive restarts), log to stderr
  acl             device listener, from edgebind_protocol::acl: every client only its own
                  device topics (%u patterns under edgebind/v2/<kind>/<id>, which no CN can
                  widen); every operator/service/claim principal from the PKI inventory gets a
                  user block that takes the device patterns away again (plus its grants);
                  revoked principals are denied everything
  acl-provisioning  provisioning listener (--provisioning-port): no patterns at all
  crl.pem         fresh CRL (lifetime --crl-days); ca.crt, server.crt, server.key (0600)
  settings.toml   these options; re-running without --host/--ip reuses them
The queue limits (max_queued_messages, max_queued_bytes) follow from the burst budget
(--budget-*: a whole fleet's outbox drain after an outage, held twice; the fleet service pushes
back at half); the budget and the broker memory it costs are printed.
The server certificate (serverAuth, SANs = --host/--ip) is issued when missing, when the
names change, or when it expires within 30 days (--renew-cert forces it).
When run as root the files are given to the user Mosquitto drops to (default
`mosquitto`); keys keep mode 0600.")]
    Config(ConfigArgs),
    /// Run Mosquitto in the foreground with the generated configuration, keeping its CRL fresh.
    #[command(after_help = "\
Refreshes the ACL and CRL from the PKI first (when this home has the PKI), then starts
`mosquitto -c <home>/broker/mosquitto.conf` as its child (set EDGEBIND_MOSQUITTO to use another
binary) and stays in the foreground as a small supervisor:
  - its own pid goes to <home>/broker/mosquitto.pid; SIGHUP to it (`edgebind broker reload`,
    systemd's ExecReload=kill -HUP $MAINPID) is forwarded to mosquitto;
  - Ctrl-C / SIGTERM stop mosquitto cleanly (SIGKILL after 10 s); the exit status is mosquitto's;
  - if mosquitto exits by itself, it says so and exits non-zero (it does not respawn it: leave
    restarts to the service manager, e.g. Restart=on-failure); if the supervisor is SIGKILLed,
    a watchdog stops mosquitto, so no orphan keeps the port.
Keeping the CRL fresh: a CRL past its nextUpdate makes Mosquitto refuse EVERY client. While
`broker run` runs it checks the broker's CRL every 10 minutes and, once less than half of its
lifetime (crl_days, default 7) remains, or at the latest when it enters the crl_warn_days window,
re-issues it with the issuing CA, replaces <home>/broker/crl.pem atomically and sends mosquitto
SIGHUP: no client is disconnected. It warns on stderr when that fails (e.g. the issuing key is
unreadable) and while the CRL lapses within crl_warn_days. So no cron job or timer is needed for
a broker run this way (`edgebind pki crl --help` has one for brokers run otherwise).

Examples:
  edgebind broker run
  systemd: ExecStart=/usr/bin/edgebind --home /srv/edgebind broker run
           ExecReload=/bin/kill -HUP $MAINPID   KillMode=mixed   Restart=on-failure")]
    Run(RunArgs),
    /// Regenerate the ACL and CRL and make the running broker apply them (SIGHUP).
    #[command(after_help = "\
No connection is dropped: Mosquitto re-reads the ACL (applied to connected clients too) and the
CRL (applied to new connections). Run after issuing operator/service identities and after
revoking. `edgebind broker run` keeps the CRL fresh by itself; a broker run some other way needs
`edgebind pki crl` daily (see `edgebind pki crl --help`).")]
    Reload,
    /// Check every issued certificate in the PKI inventory for names the fleet must not sign.
    #[command(after_help = "\
Reads <home>/pki/inventory.json and flags every client certificate whose CN is not a valid
principal name under the one id rule of edgebind_protocol (lowercase ASCII letters, digits,
'-', '_', '.'; role prefixes operator:, service:, claim:), or names another role than it was
issued as. The topic layout keeps such a certificate away from other devices' topics anyway,
but it should not exist: revoke it (`edgebind pki revoke --serial SERIAL`) and find out how it
was signed. `broker config` and `broker reload` run the same check and warn.

Exit status: 0 when no usable certificate is flagged, 1 when at least one is (revoked or
expired ones are listed but do not fail the check).

Examples:
  edgebind broker audit
  edgebind broker audit --json | jq '.findings[] | select(.active)'")]
    Audit {
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Expert/test options of `broker run`, shown by `--help` only (not `-h`).
#[derive(Args)]
pub struct RunArgs {
    /// EXPERT/TEST: check the broker's CRL every SECONDS instead of every 600.
    #[arg(long, value_name = "SECONDS", hide_short_help = true, value_parser = clap::value_parser!(u64).range(1..))]
    crl_check_secs: Option<u64>,
    /// TEST ONLY: CRLs issued by this run (at start and by the refresh loop)
    /// live SECONDS instead of crl_days (refreshed below half, warned below a
    /// quarter of that), so a test can watch a refresh. Never in production.
    #[arg(long, value_name = "SECONDS", hide_short_help = true, value_parser = clap::value_parser!(u32).range(1..))]
    test_crl_lifetime_secs: Option<u32>,
    /// Serve the supervisor's Prometheus metrics (Mosquitto up, reloads, CRL
    /// expiry and refreshes) at http://ADDR/metrics, a loopback address such
    /// as 127.0.0.1:9465. Message counts come from `fleet serve --metrics`.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Args)]
pub struct ConfigArgs {
    /// DNS name devices dial (repeatable; the first is the name written into bundles).
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// IP address devices dial (repeatable).
    #[arg(long = "ip")]
    ips: Vec<IpAddr>,
    /// TLS listener port.
    #[arg(long)]
    port: Option<u16>,
    /// Address the listeners bind to (default 0.0.0.0).
    #[arg(long)]
    bind: Option<String>,
    /// Also open the provisioning listener on this port (claim identities; its ACL has no
    /// device patterns). Off by default.
    #[arg(long)]
    provisioning_port: Option<u16>,
    /// Lifetime of each CRL in days (refresh it more often than that).
    #[arg(long)]
    crl_days: Option<u32>,
    /// Warn when the CRL lapses within this many days.
    #[arg(long)]
    crl_warn_days: Option<u32>,
    /// User Mosquitto drops to when started as root (default: mosquitto's own default, `mosquitto`).
    #[arg(long)]
    run_as: Option<String>,
    /// Keep no retained messages across restarts.
    #[arg(long)]
    no_persistence: bool,
    /// Issue a new server certificate even if the current one fits.
    #[arg(long)]
    renew_cert: bool,
    #[command(flatten)]
    budget: BudgetArgs,
}

/// The burst budget the broker's queue limits follow from (kept in
/// settings.toml; each flag changes one input).
#[derive(Args)]
#[command(
    next_help_heading = "Burst budget (max_queued_messages / max_queued_bytes follow from it)"
)]
struct BudgetArgs {
    /// Devices in the fleet.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    budget_devices: Option<u64>,
    /// Their telemetry period in seconds.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    budget_telemetry_interval_s: Option<u64>,
    /// The outage whose backlog must fit, in seconds (default 600).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    budget_outage_s: Option<u64>,
    /// Bytes of one telemetry message.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    budget_message_bytes: Option<u64>,
    /// The fleet service's measured ingest ceiling, messages per second.
    #[arg(long, value_name = "MSG_PER_S", value_parser = clap::value_parser!(u64).range(1..))]
    budget_ingest_per_s: Option<u64>,
}

impl BudgetArgs {
    fn apply(&self, budget: &mut edgebind_broker::Budget) {
        let fields = [
            (self.budget_devices, &mut budget.devices),
            (
                self.budget_telemetry_interval_s,
                &mut budget.telemetry_interval_s,
            ),
            (self.budget_outage_s, &mut budget.outage_s),
            (self.budget_message_bytes, &mut budget.message_bytes),
            (self.budget_ingest_per_s, &mut budget.ingest_per_s),
        ];
        for (given, field) in fields {
            if let Some(v) = given {
                *field = v;
            }
        }
    }
}

pub fn run(cmd: BrokerCommand, home: &FleetHome) -> anyhow::Result<ExitCode> {
    match cmd {
        BrokerCommand::Config(a) => config(a, home),
        BrokerCommand::Run(a) => run_foreground(a, home),
        BrokerCommand::Reload => reload(home),
        BrokerCommand::Audit { json } => audit(home, json),
    }
}

fn config(a: ConfigArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let dir = home.broker_dir();
    let previous = BrokerSettings::load(&dir).ok();
    let mut settings = match (&previous, a.hosts.is_empty() && a.ips.is_empty()) {
        (Some(prev), true) => prev.clone(),
        (None, true) => anyhow::bail!(
            "give at least one --host NAME or --ip ADDRESS (the names devices use to reach the broker)"
        ),
        (prev, false) => {
            let mut s = prev
                .clone()
                .unwrap_or_else(|| BrokerSettings::new(vec![], vec![]));
            s.hosts = a.hosts;
            s.ips = a.ips;
            s
        }
    };
    if let Some(port) = a.port {
        settings.port = port;
    }
    if let Some(bind) = a.bind {
        settings.bind = bind;
    }
    if a.provisioning_port.is_some() {
        settings.provisioning_port = a.provisioning_port;
    }
    if let Some(days) = a.crl_days {
        settings.crl_days = days;
    }
    if let Some(days) = a.crl_warn_days {
        settings.crl_warn_days = days;
    }
    if a.run_as.is_some() {
        settings.run_as = a.run_as;
    }
    if a.no_persistence {
        settings.persistence = false;
    }
    a.budget.apply(&mut settings.budget);
    settings.validate().map_err(anyhow::Error::msg)?;
    let pki = home
        .open_pki()
        .context("the broker's certificate comes from the fleet PKI")?;
    let opts = GenerateOptions {
        renew_server_cert: a.renew_cert,
        server_cert_days: None,
    };
    let generated = edgebind_broker::generate(&dir, &pki, &settings, &opts)?;
    warn_misissued(&pki);
    println!(
        "broker configuration written to {}",
        generated.dir.display()
    );
    match &generated.new_server_cert {
        Some(serial) => println!(
            "issued server certificate serial {serial} for {:?} {:?}",
            settings.hosts, settings.ips
        ),
        None => println!("kept the existing server certificate (names unchanged)"),
    }
    report(&generated, &settings);
    println!("{}", settings.budget.describe());
    println!(
        "listener: {}:{} (devices dial {}:{})\nNext: edgebind broker run",
        settings.bind,
        settings.port,
        settings.client_host(),
        settings.port
    );
    Ok(ExitCode::SUCCESS)
}

fn audit(home: &FleetHome, json: bool) -> anyhow::Result<ExitCode> {
    let pki = home.open_pki()?;
    let inventory = pki.inventory()?;
    let findings = inventory.audit(OffsetDateTime::now_utc());
    let active = findings.iter().filter(|f| f.active).count();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "checked": inventory.entries.len(),
                "findings": findings,
            }))?
        );
    } else {
        for f in &findings {
            println!(
                "{} serial {} CN {:?} ({}): {}",
                if f.active { "USABLE " } else { "inactive" },
                f.serial,
                f.cn,
                f.role,
                f.problem
            );
        }
        println!(
            "{} certificate(s) checked: {} flagged, {} of them still usable",
            inventory.entries.len(),
            findings.len(),
            active
        );
    }
    Ok(if active > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `broker config` warns about mis-issued certificates (the full list is
/// `broker audit`'s; a policy refresh reports them itself).
fn warn_misissued(pki: &Pki) {
    if let Ok(inventory) = pki.inventory() {
        let now = OffsetDateTime::now_utc();
        render::misissued(
            inventory
                .audit(now)
                .into_iter()
                .filter(|f| f.active)
                .count(),
        );
    }
}

fn report(generated: &Generated, settings: &BrokerSettings) {
    let now = OffsetDateTime::now_utc();
    render::crl_summary(
        &generated.crl,
        generated.revoked.len(),
        generated
            .crl
            .expires_within(now, settings.crl_warn_days)
            .then_some(settings.crl_warn_days),
    );
}

fn run_foreground(a: RunArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let dir = home.broker_dir();
    let settings = BrokerSettings::load(&dir)?;
    process::find_mosquitto()?;
    let mut opts = supervise::RunOptions::from_settings(&settings, None);
    if let Some(seconds) = a.test_crl_lifetime_secs {
        eprintln!("warning: TEST knob --test-crl-lifetime-secs {seconds}: CRLs live {seconds} s");
        opts = opts.with_test_crl_lifetime(seconds);
    }
    if let Some(seconds) = a.crl_check_secs {
        opts.check_every = std::time::Duration::from_secs(seconds);
    }
    match Pki::open(&home.pki_dir()) {
        Ok(pki) => {
            let generated = edgebind_broker::regenerate_policy_with_crl_lifetime(
                &dir,
                &pki,
                &settings,
                opts.crl_lifetime,
            )?;
            report(&generated, &settings);
            opts.pki_dir = Some(home.pki_dir());
        }
        Err(e) => {
            eprintln!(
                "warning: PKI not available here ({e}); using the existing ACL and CRL, which \
                 this run can NOT refresh (run `edgebind pki crl` where the issuing CA is)"
            );
            warn_crl(home);
        }
    }
    eprintln!(
        "starting mosquitto on {}:{} (config {})",
        settings.bind,
        settings.port,
        dir.join(edgebind_broker::layout::CONF).display()
    );
    // Bound before Mosquitto starts, so a taken port or a non-loopback
    // address fails the run at once; served from a thread of its own while
    // this one supervises.
    let _metrics = match a.metrics {
        Some(addr) => Some(serve_metrics(addr, opts.stats.clone())?),
        None => None,
    };
    let code = supervise::run(&dir, &settings, &opts)?;
    Ok(ExitCode::from(code))
}

/// The runtime serving `GET /metrics`; dropping it stops the endpoint.
fn serve_metrics(
    addr: std::net::SocketAddr,
    stats: std::sync::Arc<supervise::SupervisorStats>,
) -> anyhow::Result<tokio::runtime::Runtime> {
    use edgebind_fleet::service::metrics::{MetricsListener, render_supervisor};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("broker-metrics")
        .enable_all()
        .build()?;
    let listener = runtime.block_on(MetricsListener::bind(addr))?;
    if let Some(bound) = listener.local_addr() {
        eprintln!("serving broker metrics at http://{bound}/metrics");
    }
    runtime.spawn(
        listener.serve(move || {
            render_supervisor(&stats, edgebind_protocol::messages::now_unix() as i64)
        }),
    );
    Ok(runtime)
}

fn reload(home: &FleetHome) -> anyhow::Result<ExitCode> {
    let pki = home.open_pki()?;
    let refresh = ops::refresh_broker_policy(home, &pki)?;
    if refresh.applied.is_none() {
        anyhow::bail!(
            "the broker is not configured in {} (run `edgebind broker config --host NAME`)",
            home.broker_dir().display()
        );
    }
    render::policy(&refresh, &pki.crl_path(), &home.broker_dir());
    Ok(ExitCode::SUCCESS)
}
