//! `edgebind pki ...`: the fleet's certificate authority.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use edgebind_certs::{InitOptions, IssuedCert, Pki, Validity, bundle, layout, profile};
use edgebind_fleet::ops::{
    self, AgentBroker, BatchRegistration, FleetHome, IdentityOutput, Policy, Registration,
};
use edgebind_fleet::registry::{Board, RegistryError, Tag};
use edgebind_protocol::{DeviceId, Principal};
use time::OffsetDateTime;

use crate::crl_warning::warn_crl;
use crate::render;

const CRL_SCHEDULE_HELP: &str = "\
Keeping the CRL fresh: a CRL past its nextUpdate makes Mosquitto refuse EVERY
client. `edgebind pki crl` re-issues it (default lifetime 7 days) and, when the
broker is configured in this home, copies it there and reloads the broker.
A broker started with `edgebind broker run` needs nothing more: while it runs
it re-issues the CRL itself once half of its lifetime is gone and reloads
Mosquitto (see `edgebind broker run --help`). Only for a broker run some other
way (its own mosquitto unit, another host without `broker run`), run this daily, e.g.
  cron:    17 3 * * *  edgebind --home /srv/edgebind pki crl
  systemd: edgebind-crl.service (Type=oneshot, ExecStart=edgebind --home /srv/edgebind pki crl)
           + edgebind-crl.timer (OnCalendar=daily, Persistent=true)
`edgebind pki crl --check` changes nothing and exits 1 when the CRL lapses
within the warning window (for monitoring).";

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Create the fleet root CA and the issuing CA (keys 0600).
    #[command(after_help = "\
Examples:
  edgebind pki init --fleet acme
  edgebind pki init --fleet acme --operator alice

Writes <home>/pki/{root-ca,issuing-ca}.{crt,key}, inventory.json and crl.pem,
the first operator identity (operator:<name>) in <home>/operator/ and the fleet
service identity (service:fleet) in <home>/identities/service-fleet/.
The root key (<home>/pki/root-ca.key) is only needed to create the issuing CA:
move it offline afterwards; issuing and revoking need only the issuing CA.
Existing CA files are never overwritten without --force.")]
    Init(InitArgs),
    /// Issue a certificate: device, broker, operator, service or claim.
    #[command(subcommand)]
    Issue(IssueCommand),
    /// Issue a fresh device certificate and write its identity bundle (directory + tar).
    #[command(after_help = "\
Examples:
  edgebind pki bundle rpi-0001                       # renewal; broker from `edgebind broker config`
  edgebind pki bundle rpi-0002 --board raspberrypi3-64 --broker-host broker.example.net

The bundle directory holds agent.toml, device.crt (leaf + issuing CA),
device.key (0600) and ca.crt (fleet root); <dir>.tar beside it holds the same
four files at the top level: the factory line copies it to the boot partition as
edgebind/identity.tar. Each call issues a new certificate and records it in the
registry (a renewal keeps the id; the previous certificate stays valid until it
expires or is revoked). A device the registry does not know is registered with
--board (and --tag), like `edgebind device add`, or refused without it.")]
    Bundle(BundleArgs),
    /// Revoke every certificate of a device or principal (or one serial).
    #[command(after_help = "\
Examples:
  edgebind pki revoke rpi-0001
  edgebind pki revoke operator:bob
  edgebind pki revoke --serial 5f2a...

Marks the certificates revoked in the inventory and re-issues the CRL. A
registered device is revoked in the registry too, exactly as `edgebind revoke`
does (queued commands dropped), also when --serial revokes its last usable
certificate. When the broker is configured in this home, its ACL (which then denies the principal
everything, also on connections that are already open) and CRL (refuses new
connections) are regenerated and a running broker is reloaded (SIGHUP); no other
client is disconnected.")]
    Revoke(RevokeArgs),
    /// Re-issue the CRL (and refresh the broker's copy), or check its freshness.
    #[command(after_help = CRL_SCHEDULE_HELP)]
    Crl(CrlArgs),
    /// List issued certificates (serial, CN, role, expiry, revocation).
    List(ListArgs),
    /// Replace the issuing CA by a new one under the same root, without an outage.
    #[command(after_help = "Examples:\n  \
        edgebind pki rollover                 # needs <home>/pki/root-ca.key for the moment\n  \
        edgebind pki rollover --retire        # retire old issuing CAs nothing depends on any more\n\n\
        Certificates are signed by the new issuing CA from then on (renewals too); the old \
        one keeps signing its CRL, so the broker accepts certificates of both. Devices move \
        over when they renew (`edgebind device renew DEV` hurries one). The fleet service \
        retires the old CA once no usable certificate depends on it; re-issue the broker's \
        certificate (`edgebind broker config`) and operator/service identities meanwhile.")]
    Rollover(RolloverArgs),
}

#[derive(Args)]
pub struct RolloverArgs {
    /// Lifetime of the new issuing CA in days.
    #[arg(long, default_value_t = profile::default_days::ISSUING_CA)]
    days: u32,
    /// Do not roll over: only retire previous issuing CAs that no usable
    /// certificate depends on, and list the others.
    #[arg(long)]
    retire: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct InitArgs {
    /// Fleet name, written into the CA certificates.
    #[arg(long)]
    fleet: String,
    /// Name of the first operator identity (CN operator:<name>), written to <home>/operator/.
    #[arg(long, default_value = "admin")]
    operator: DeviceId,
    /// Root CA validity in days.
    #[arg(long, default_value_t = profile::default_days::ROOT_CA)]
    root_days: u32,
    /// Issuing CA validity in days.
    #[arg(long, default_value_t = profile::default_days::ISSUING_CA)]
    issuing_days: u32,
    /// Replace an existing CA: every certificate issued so far stops working.
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
pub enum IssueCommand {
    /// Device certificate (CN = id, clientAuth only), or a batch of bundles.
    #[command(after_help = "\
Examples:
  edgebind pki issue device rpi-0001 --board raspberrypi3-64   # new: <home>/bundles/rpi-0001/
  edgebind pki issue device rpi-0001 --days 3650 --out /secure/rpi-0001   # renewal
  edgebind pki issue device --batch ids.txt --board raspberrypi3-64       # factory line

Every device identity is registered: a device the registry does not know yet is
registered with --board (and --tag), like `edgebind device add`; without --board
it is refused. A registered device gets a renewal (the registry records the new
certificate). A batch file has one device id per line (blank lines and #
comments ignored); a batch registers new devices only. Every id is validated
before anything is issued; each gets a bundle directory and tar in
<home>/bundles/ (or --out; only the tar with --tar-only), using the broker from
`edgebind broker config` unless --broker-host is given. Progress and the rate go
to stderr.")]
    Device(IssueDeviceArgs),
    /// The broker's TLS server certificate (serverAuth, SANs); normally `edgebind broker config` does this.
    Broker(IssueBrokerArgs),
    /// An operator's client certificate (CN operator:<name>): reads everything, commands devices.
    Operator(IssueNamedArgs),
    /// A back-end service certificate (CN service:<name>), e.g. `service fleet`.
    Service(IssueNamedArgs),
    /// A provisioning/claim identity (CN claim:<name>) for the zero-touch flow.
    Claim(IssueNamedArgs),
}

#[derive(Args)]
pub struct IssueDeviceArgs {
    /// Device id (letters, digits, '-', '_', '.'; at most 64).
    #[arg(required_unless_present = "batch", conflicts_with = "batch")]
    id: Option<DeviceId>,
    /// File with one device id per line: issue a bundle for each.
    #[arg(long)]
    batch: Option<PathBuf>,
    /// Validity in days.
    #[arg(long, default_value_t = profile::default_days::DEVICE)]
    days: u32,
    /// Output directory (single id: the identity directory; batch: the parent of the bundles).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    broker: BrokerTarget,
    #[command(flatten)]
    register: RegisterArgs,
    /// Issuing threads for --batch (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// With --batch: write only <id>.tar per device (what the image personalization
    /// consumes), no bundle directories: a third of the file creations.
    #[arg(long, requires = "batch")]
    tar_only: bool,
}

#[derive(Args)]
pub struct IssueBrokerArgs {
    /// DNS name clients dial (repeatable).
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// IP address clients dial (repeatable).
    #[arg(long = "ip")]
    ips: Vec<IpAddr>,
    #[arg(long, default_value_t = profile::default_days::BROKER)]
    days: u32,
    /// Directory for server.crt / server.key / ca.crt.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct IssueNamedArgs {
    /// Name after the role prefix (device-id charset).
    name: DeviceId,
    /// Validity in days (default: 365 for operators/services, 90 for claim identities).
    #[arg(long)]
    days: Option<u32>,
    /// Output directory (default <home>/identities/<role>-<name>/).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// How a device the registry does not know yet is registered.
#[derive(Args, Clone)]
pub struct RegisterArgs {
    /// Register a new device with this board (Yocto MACHINE), like `device add`.
    #[arg(long)]
    board: Option<String>,
    /// Tag of a newly registered device; repeatable.
    #[arg(long = "tag", requires = "board")]
    tags: Vec<String>,
}

impl RegisterArgs {
    fn parse(&self) -> anyhow::Result<Option<(Board, BTreeSet<Tag>)>> {
        let Some(board) = &self.board else {
            return Ok(None);
        };
        let tags = self
            .tags
            .iter()
            .map(|t| t.parse::<Tag>())
            .collect::<Result<BTreeSet<_>, _>>()?;
        Ok(Some((board.parse()?, tags)))
    }
}

/// Which broker a bundle's agent.toml points at.
#[derive(Args, Clone)]
pub struct BrokerTarget {
    /// Broker host name or IP the device dials (default: first name from `broker config`).
    #[arg(long)]
    broker_host: Option<String>,
    /// Broker port (default: from `broker config`, else 8883).
    #[arg(long)]
    broker_port: Option<u16>,
    /// Name the broker certificate carries, if different from --broker-host.
    #[arg(long)]
    server_name: Option<String>,
}

#[derive(Args)]
pub struct BundleArgs {
    /// Device id.
    id: DeviceId,
    #[command(flatten)]
    broker: BrokerTarget,
    /// Bundle directory (default <home>/bundles/<id>); the tar is written beside it as <dir>.tar.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Validity in days.
    #[arg(long, default_value_t = profile::default_days::DEVICE)]
    days: u32,
    #[command(flatten)]
    register: RegisterArgs,
}

#[derive(Args)]
pub struct RevokeArgs {
    /// Device id or principal CN (operator:<n>, service:<n>, claim:<n>).
    #[arg(required_unless_present = "serial", conflicts_with = "serial")]
    cn: Option<String>,
    /// Revoke only the certificate with this serial (hex).
    #[arg(long)]
    serial: Option<String>,
    /// Do not touch the broker (only inventory + CRL).
    #[arg(long)]
    no_reload: bool,
}

#[derive(Args)]
pub struct CrlArgs {
    /// Only report freshness; exit 1 if the CRL lapses within the warning window.
    #[arg(long)]
    check: bool,
    /// CRL lifetime in days (default: the broker's crl_days, else 7).
    #[arg(long)]
    days: Option<u32>,
}

#[derive(Args)]
pub struct ListArgs {
    /// Print the inventory as JSON.
    #[arg(long)]
    json: bool,
    /// Only this role (device, operator, service, claim, broker).
    #[arg(long)]
    role: Option<String>,
}

pub fn run(cmd: PkiCommand, home: &FleetHome) -> anyhow::Result<ExitCode> {
    match cmd {
        PkiCommand::Init(a) => init(a, home),
        PkiCommand::Issue(c) => issue(c, home),
        PkiCommand::Bundle(a) => bundle_cmd(a, home),
        PkiCommand::Revoke(a) => revoke(a, home),
        PkiCommand::Crl(a) => crl(a, home),
        PkiCommand::List(a) => list(a, home),
        PkiCommand::Rollover(a) => rollover(a, home),
    }
}

fn rollover(a: RolloverArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    use edgebind_fleet::ops::rollover;
    if a.retire {
        let r = rollover::retire_unused(home)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            for id in &r.retired {
                println!("retired issuing CA {id}: no usable certificate depends on it");
            }
            for id in &r.remaining {
                println!("issuing CA {id} is still in use (certificates it signed are usable)");
            }
            if r.retired.is_empty() && r.remaining.is_empty() {
                println!("no previous issuing CA");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let done = rollover::rollover(home, a.days)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        let r = &done.rollover;
        println!(
            "new issuing CA \"{}\" sha256 {} valid until {}; the previous one ({}) signs only its CRL until nothing depends on it",
            r.new_subject,
            r.new_issuer,
            r.not_after.date(),
            r.previous_issuer
        );
        if !done.policy.reloaded() {
            eprintln!("edgebind: the broker was not reloaded; run `edgebind broker reload`");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(issued: &IssuedCert) -> String {
    format!(
        "{} serial {} sha256 {} valid until {}",
        issued.cn,
        issued.serial,
        issued.fingerprint_sha256,
        issued.not_after.date()
    )
}

fn init(a: InitArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let mut opts = InitOptions::new(a.fleet);
    opts.root_days = a.root_days;
    opts.issuing_days = a.issuing_days;
    opts.force = a.force;
    let pki = Pki::init(&home.pki_dir(), &opts)?;
    println!("fleet PKI created in {}", pki.dir().display());

    let operator = Principal::Operator(a.operator);
    let issued = pki.issue(&operator, Validity::days(profile::default_days::OPERATOR))?;
    issued.write_identity(&home.operator_dir(), layout::CLIENT_STEM, pki.root_pem())?;
    println!(
        "operator identity: {} in {}",
        describe(&issued),
        home.operator_dir().display()
    );

    let service = Principal::Service(DeviceId::new("fleet")?);
    let service_dir = layout::identity_dir(home.root(), &service);
    let issued = pki.issue(&service, Validity::days(profile::default_days::SERVICE))?;
    issued.write_identity(&service_dir, layout::CLIENT_STEM, pki.root_pem())?;
    println!(
        "fleet service identity: {} in {}",
        describe(&issued),
        service_dir.display()
    );
    let registry = home.create_registry()?;
    println!("device registry: {}", registry.location());
    println!(
        "\nThe root CA key {} is not needed for issuing: keep it offline.\n\
         Next: edgebind broker config --host <broker name>",
        pki.dir().join(layout::ROOT_KEY).display()
    );
    Ok(ExitCode::SUCCESS)
}

fn issue(cmd: IssueCommand, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let pki = home.open_pki()?;
    match cmd {
        IssueCommand::Device(a) => {
            if let Some(batch) = &a.batch {
                return issue_batch(home, batch, &a);
            }
            let id = a.id.clone().expect("clap requires an id without --batch");
            let dir = a.out.clone().unwrap_or_else(|| home.bundle_dir(&id));
            let output = IdentityOutput::CertificateFiles { dir: dir.clone() };
            let issued = issue_device_identity(home, &id, a.days, &a.register, None, output)?;
            println!("issued {issued}");
            println!(
                "wrote {}/device.crt, device.key (0600), ca.crt",
                dir.display()
            );
            println!("(`edgebind pki bundle {id}` writes a complete bundle with agent.toml)");
        }
        IssueCommand::Broker(a) => {
            let issued = pki.issue_server(&a.hosts, &a.ips, Validity::days(a.days))?;
            issued.write_identity(&a.out, "server", pki.root_pem())?;
            println!("issued {}", describe(&issued));
            println!(
                "wrote {}/server.crt, server.key (0600), ca.crt",
                a.out.display()
            );
        }
        IssueCommand::Operator(a) => {
            issue_named(&pki, home, Principal::Operator(a.name.clone()), a)?
        }
        IssueCommand::Service(a) => issue_named(&pki, home, Principal::Service(a.name.clone()), a)?,
        IssueCommand::Claim(a) => issue_named(&pki, home, Principal::Claim(a.name.clone()), a)?,
    }
    warn_crl(home);
    Ok(ExitCode::SUCCESS)
}

fn issue_named(
    pki: &Pki,
    home: &FleetHome,
    principal: Principal,
    a: IssueNamedArgs,
) -> anyhow::Result<()> {
    let days = a
        .days
        .unwrap_or_else(|| profile::default_days_for(&principal));
    let issued = pki.issue(&principal, Validity::days(days))?;
    let dir = a
        .out
        .unwrap_or_else(|| layout::identity_dir(home.root(), &principal));
    issued.write_identity(&dir, layout::CLIENT_STEM, pki.root_pem())?;
    println!("issued {}", describe(&issued));
    println!(
        "wrote {}/client.crt, client.key (0600), ca.crt",
        dir.display()
    );
    if matches!(principal, Principal::Operator(_) | Principal::Service(_)) {
        println!("run `edgebind broker reload` so the broker's ACL grants {principal} its access");
    }
    Ok(())
}

/// Where agents dial: explicit flags, else the broker settings in this home.
fn resolve_broker(home: &FleetHome, t: &BrokerTarget) -> anyhow::Result<AgentBroker> {
    ops::agent_broker(
        home,
        t.broker_host.as_deref(),
        t.broker_port,
        t.server_name.as_deref(),
    )
    .context("no broker address: pass --broker-host NAME or run `edgebind broker config --host NAME` first")
}

/// Issue a device identity the registry knows: a renewal for a registered
/// device, a registration (with `--board`) for a new one, else refused.
/// Returns the description of the new certificate.
fn issue_device_identity(
    home: &FleetHome,
    id: &DeviceId,
    days: u32,
    register: &RegisterArgs,
    broker: Option<AgentBroker>,
    output: IdentityOutput,
) -> anyhow::Result<String> {
    let mut store = home.open_registry()?;
    let (serial, fingerprint, not_after) = match store.device(id) {
        Ok(_) => {
            let renewed =
                ops::renew_device(home, store.as_mut(), id, days, broker.as_ref(), &output)?;
            if let Err(e) = &renewed.policy {
                eprintln!(
                    "edgebind: warning: broker policy not refreshed ({e}); run `edgebind broker reload`"
                );
            }
            (
                renewed.serial,
                renewed.fingerprint_sha256,
                renewed.device.cert.map(|c| c.not_after),
            )
        }
        Err(RegistryError::UnknownDevice(_)) => {
            let Some((board, tags)) = register.parse()? else {
                bail!(
                    "device {id} is not in the registry: register it with                      `edgebind device add {id} --board BOARD` (or pass --board here); \
                     every device identity is registered"
                );
            };
            let req = Registration {
                id: id.clone(),
                board,
                tags,
                validity_days: days,
                broker,
                output,
                unit: None,
            };
            let done = ops::register_device(home, store.as_mut(), &req)?;
            println!("registered {id} ({})", done.device.board);
            (
                done.serial,
                done.fingerprint_sha256,
                done.device.cert.map(|c| c.not_after),
            )
        }
        Err(e) => return Err(e.into()),
    };
    Ok(format!(
        "{id} serial {serial} sha256 {fingerprint} valid until {}",
        render::unix_date(not_after)
    ))
}

fn bundle_cmd(a: BundleArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let broker = resolve_broker(home, &a.broker)?;
    let dir = a.out.clone().unwrap_or_else(|| home.bundle_dir(&a.id));
    let output = IdentityOutput::Bundle { dir: dir.clone() };
    let issued = issue_device_identity(
        home,
        &a.id,
        a.days,
        &a.register,
        Some(broker.clone()),
        output,
    )?;
    println!("issued {issued}");
    println!(
        "bundle: {} (agent.toml -> {}:{})",
        dir.display(),
        broker.host,
        broker.port
    );
    println!("tar:    {}", bundle::tar_path_for(&dir).display());
    warn_crl(home);
    Ok(ExitCode::SUCCESS)
}

/// Parse a batch file: one id per line; every bad line is reported with its number.
fn read_batch(path: &Path) -> anyhow::Result<Vec<DeviceId>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut ids = Vec::new();
    let mut errors = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match DeviceId::new(line) {
            Ok(id) => ids.push(id),
            Err(e) => errors.push(format!("{}:{}: {e}", path.display(), n + 1)),
        }
    }
    if !errors.is_empty() {
        bail!("nothing issued; bad device ids:\n  {}", errors.join("\n  "));
    }
    if ids.is_empty() {
        bail!("{} contains no device ids", path.display());
    }
    Ok(ids)
}

fn issue_batch(home: &FleetHome, batch: &Path, a: &IssueDeviceArgs) -> anyhow::Result<ExitCode> {
    let ids = read_batch(batch)?;
    let Some((board, tags)) = a.register.parse()? else {
        bail!(
            "nothing issued: a batch registers every device it issues; pass --board BOARD \
             (and --tag) for them, as `edgebind device add` would"
        );
    };
    let broker = resolve_broker(home, &a.broker)?;
    let out = a.out.clone().unwrap_or_else(|| home.bundles_dir());
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let total = ids.len();
    let form = if a.tar_only {
        bundle::BundleForm::TarOnly
    } else {
        bundle::BundleForm::DirectoryAndTar
    };
    let start = Instant::now();
    let step = (total / 20).max(1);
    let progress = |done: usize| {
        if done.is_multiple_of(step) || done == total {
            let rate = done as f64 / start.elapsed().as_secs_f64().max(1e-9);
            eprint!("\rissued {done}/{total} ({rate:.0}/s)");
            let _ = std::io::stderr().flush();
        }
    };
    let mut store = home.open_registry()?;
    let request = BatchRegistration {
        ids,
        board,
        tags,
        validity_days: a.days,
        broker: Some(broker),
        out: out.clone(),
        form,
        threads,
    };
    let done = ops::register_devices(home, store.as_mut(), &request, progress)?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!();
    println!(
        "issued {} device bundles in {:.2} s ({:.0}/s) into {}",
        done.registered.len(),
        secs,
        done.registered.len() as f64 / secs.max(1e-9),
        out.display()
    );
    for (id, why) in &done.failed {
        eprintln!(
            "edgebind: {id} not registered (its certificate is revoked, its bundle removed): {why}"
        );
    }
    warn_crl(home);
    Ok(if done.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn revoke(a: RevokeArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let pki = home.open_pki()?;
    let mut store = home.open_registry()?;
    let policy = if a.no_reload {
        Policy::Leave
    } else {
        Policy::Refresh
    };
    let done = if let Some(serial) = &a.serial {
        let done = ops::revoke_serial(home, store.as_mut(), serial, policy)?;
        for e in &done.certificates {
            println!("revoked {} serial {}", e.cn, e.serial);
        }
        done
    } else {
        let cn = a.cn.expect("clap requires a CN without --serial");
        let principal = Principal::from_cn(&cn)?;
        let done = ops::revoke_principal(home, store.as_mut(), &principal, policy)?;
        if done.certificates.is_empty() {
            println!("{cn}: every certificate was already revoked");
        }
        for e in &done.certificates {
            println!(
                "revoked {} serial {} (valid until {})",
                e.cn,
                e.serial,
                e.not_after.date()
            );
        }
        done
    };
    if let Some(d) = &done.device {
        println!(
            "registry: {} is {}, {} queued command(s) dropped",
            d.id,
            d.lifecycle.as_str(),
            done.dropped_commands
        );
    }
    match &done.policy {
        None => println!(
            "CRL updated in {}; the broker was not touched (--no-reload)",
            pki.crl_path().display()
        ),
        Some(refresh) => render::policy(refresh, &pki.crl_path(), &home.broker_dir()),
    }
    Ok(ExitCode::SUCCESS)
}

fn crl(a: CrlArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let settings = edgebind_broker::BrokerSettings::load(&home.broker_dir()).ok();
    let warn_days = settings.as_ref().map_or(3, |s| s.crl_warn_days);
    if a.check {
        let path = match &settings {
            Some(_) => home.broker_dir().join(edgebind_broker::layout::CRL),
            None => home.pki_dir().join(layout::CRL),
        };
        let status = edgebind_certs::pki::crl_status(&path)?;
        let now = OffsetDateTime::now_utc();
        println!(
            "{}: next update {} ({} revoked)",
            path.display(),
            render::time(status.next_update),
            status.revoked
        );
        if status.expires_within(now, warn_days) {
            eprintln!(
                "warning: the CRL lapses within {warn_days} days ({}); run `edgebind pki crl`",
                render::time(status.next_update)
            );
            return Ok(ExitCode::from(1));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let pki = home.open_pki()?;
    if let Some(mut s) = settings {
        if let Some(days) = a.days {
            s.crl_days = days;
            s.validate().map_err(anyhow::Error::msg)?;
            s.save(&home.broker_dir())?;
        }
        let refresh = ops::refresh_broker_policy(home, &pki)?;
        render::policy(&refresh, &pki.crl_path(), &home.broker_dir());
    } else {
        let days = a.days.unwrap_or(edgebind_certs::pki::DEFAULT_CRL_DAYS);
        pki.refresh_crl_valid_for(time::Duration::days(i64::from(days)))?;
        let status = pki.crl_status()?;
        println!(
            "CRL {} valid until {} ({} revoked)",
            status.path.display(),
            render::time(status.next_update),
            status.revoked
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn list(a: ListArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let pki = home.open_pki()?;
    let mut inv = pki.inventory()?;
    if let Some(role) = &a.role {
        inv.entries.retain(|e| &e.role == role);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&inv)?);
        return Ok(ExitCode::SUCCESS);
    }
    let now = OffsetDateTime::now_utc();
    println!(
        "{:<32} {:<9} {:<32} {:<10} STATE",
        "CN", "ROLE", "SERIAL", "EXPIRES"
    );
    for e in &inv.entries {
        let state = if let Some(at) = e.revoked_at {
            format!("revoked {}", at.date())
        } else if e.is_expired(now) {
            "expired".to_owned()
        } else {
            "valid".to_owned()
        };
        println!(
            "{:<32} {:<9} {:<32} {:<10} {state}",
            e.cn,
            e.role,
            e.serial,
            e.not_after.date().to_string()
        );
    }
    warn_crl(home);
    Ok(ExitCode::SUCCESS)
}
