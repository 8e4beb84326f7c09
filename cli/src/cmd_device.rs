//! `edgebind device add|show|list|revoke|on-connect-remove`, `devices`, `send`, `set`, `revoke`.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use edgebind_certs::profile::default_days;
use edgebind_certs::{Pki, Validity};
use edgebind_fleet::operator::{self, DeviceOutcome, Outcome};
use edgebind_fleet::registry::{
    Board, CertInfo, CommandState, Delivery, Device, Lifecycle, NewCommand, NewDevice, Selector,
    Store, Tag, Update, known_setting, parse_args, parse_setting,
};
use edgebind_fleet::service::new_command_id;
use edgebind_protocol::messages::{Action, Command, now_unix};
use edgebind_protocol::{DeviceId, Principal, settings};
use serde_json::{Map, Value, json};

use crate::cmd_fleet::{
    ConnectArgs, broker_endpoint, ensure_identity, find_identity, open_registry,
    refresh_broker_policy,
};
use crate::home::Home;

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Register a device: issue its certificate and identity bundle, record it.
    #[command(after_help = "Examples:\n  \
        edgebind device add rpi-0001 --board raspberrypi3-64 --tag lab --tag eu\n\n\
        The bundle (agent.toml, device.crt, device.key, ca.crt) is written to \
        <home>/bundles/<id>/ and as <home>/bundles/<id>.tar for the factory line.")]
    Add(AddArgs),
    /// Everything the registry knows about one device.
    Show(ShowArgs),
    /// List devices.
    List(ListArgs),
    /// Revoke a device: registry, certificate (CRL) and broker ACL.
    Revoke(RevokeArgs),
    /// Remove an on-connect rule (see `device show`).
    OnConnectRemove(RuleArgs),
}

#[derive(Args)]
pub struct AddArgs {
    /// Device id (certificate CN): ASCII letters, digits, '-', '_', '.'.
    pub id: String,
    /// Board (Yocto MACHINE), e.g. raspberrypi3-64, raspberrypi4-64, qemux86-64.
    #[arg(long)]
    pub board: String,
    /// Tag for addressing groups (`send --tag`); repeatable.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Certificate lifetime in days.
    #[arg(long, default_value_t = default_days::DEVICE)]
    pub days: u32,
    /// Broker address written into agent.toml (default: from the broker settings).
    #[arg(long)]
    pub broker: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ShowArgs {
    pub id: String,
    /// How many recent commands, telemetry samples and events to show.
    #[arg(long, default_value_t = 10)]
    pub recent: u32,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ListArgs {
    /// Only devices with this tag.
    #[arg(long)]
    pub tag: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    edgebind send rpi-0001 ping\n  \
    edgebind send --tag lab inventory --timeout 60\n  \
    edgebind send --all reboot --queue         # delivered when each device is next online\n  \
    edgebind send rpi-0001 reboot --on-connect  # every time it connects\n  \
    edgebind send rpi-0001 inventory --queue --wait --timeout 3600\n\n\
    Exit status: 0 when every device succeeded, 1 otherwise (failed, rejected, timed out).")]
pub struct SendArgs {
    /// `DEVICE ACTION [KEY=VALUE]...`, or `ACTION [KEY=VALUE]...` with --tag/--all.
    /// Actions: reboot, ping, inventory, restart-agent. Argument values are
    /// parsed as JSON when they are JSON.
    #[arg(required = true, value_name = "DEVICE ACTION [KEY=VALUE]")]
    pub words: Vec<String>,
    /// Every device with this tag.
    #[arg(long, conflicts_with = "all")]
    pub tag: Option<String>,
    /// Every device that is not revoked.
    #[arg(long)]
    pub all: bool,
    /// Seconds to wait for the results (the command also expires then).
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Seconds until the command expires on the device (default: --timeout
    /// for immediate sends, never for queued ones). A device rejects an
    /// expired command instead of running it late.
    #[arg(long, value_name = "SECONDS")]
    pub expires_in: Option<u64>,
    /// Queue for the fleet service to deliver when the device is online
    /// (returns at once unless --wait).
    #[arg(long, conflicts_with = "on_connect")]
    pub queue: bool,
    /// With --queue: wait (up to --timeout) for the results the fleet
    /// service records, and exit like an immediate send.
    #[arg(long, requires = "queue")]
    pub wait: bool,
    /// Run the action every time the device connects (an on-connect rule).
    #[arg(long)]
    pub on_connect: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    edgebind set rpi-0001 telemetry_interval_s=10 log_level=debug\n  \
    edgebind set rpi-0001 log_level=null      # remove the key\n\n\
    The fleet service publishes the new revision (retained) to the device.")]
pub struct SetArgs {
    pub id: String,
    /// Settings as key=value.
    #[arg(required = true, value_name = "KEY=VALUE")]
    pub settings: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RevokeArgs {
    pub id: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RuleArgs {
    /// Rule id as shown by `device show`.
    pub rule: i64,
}

pub fn run(cmd: DeviceCommand, home: &Home) -> anyhow::Result<ExitCode> {
    match cmd {
        DeviceCommand::Add(a) => add(a, home),
        DeviceCommand::Show(a) => show(a, home),
        DeviceCommand::List(a) => list(a, home),
        DeviceCommand::Revoke(a) => revoke(a, home),
        DeviceCommand::OnConnectRemove(a) => {
            open_registry(home)?.remove_on_connect(a.rule)?;
            println!("removed on-connect rule {}", a.rule);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_device(id: &str) -> anyhow::Result<DeviceId> {
    Ok(DeviceId::new(id)?)
}

fn add(args: AddArgs, home: &Home) -> anyhow::Result<ExitCode> {
    // Validate everything before anything is issued or written.
    let id = parse_device(&args.id)?;
    let board: Board = args.board.parse()?;
    let tags = args
        .tags
        .iter()
        .map(|t| t.parse::<Tag>())
        .collect::<Result<BTreeSet<_>, _>>()?;
    let mut store = open_registry(home)?;
    store.check_new_device(&id)?;
    let (host, port, server_name) = match &args.broker {
        Some(addr) => {
            let e = broker_endpoint(home, Some(addr))?;
            (e.host, e.port, None)
        }
        None => {
            let s = edgebind_broker::BrokerSettings::load(&home.broker_dir()).context(
                "the bundle needs the broker address: pass --broker host:port or run `edgebind broker config`",
            )?;
            (s.client_host(), s.port, None::<String>)
        }
    };
    let bundle_dir = home.bundles_dir().join(id.as_str());
    if bundle_dir.exists() {
        bail!(
            "{} already exists (left from an earlier registration?); move it away first",
            bundle_dir.display()
        );
    }
    let pki = Pki::open(&home.pki_dir()).context("open the fleet PKI (run `edgebind pki init`)")?;

    let issued = pki.issue_device(&id, Validity::days(args.days))?;
    let toml = edgebind_agent::config::AgentConfig::bundle_template(
        &id,
        &host,
        port,
        server_name.as_deref(),
    );
    let written =
        edgebind_certs::bundle::write_bundle(&bundle_dir, &issued, pki.root_pem(), &toml)?;
    let cert = CertInfo {
        serial: issued.serial.clone(),
        fingerprint_sha256: issued.fingerprint_sha256.clone(),
        not_after: issued.not_after.unix_timestamp().max(0) as u64,
    };
    let device = match store.add_device(&NewDevice {
        id: id.clone(),
        board,
        tags,
        cert: Some(cert),
    }) {
        Ok(d) => d,
        Err(e) => {
            // Leave no half-registered device behind.
            let _ = std::fs::remove_dir_all(&written.dir);
            let _ = std::fs::remove_file(&written.tar);
            let _ = pki.revoke_serial(&issued.serial);
            return Err(e.into());
        }
    };
    // The ACL is rendered from the PKI inventory: a running broker must learn
    // about the new device.
    let reloaded = refresh_broker_policy(home, &pki).unwrap_or_else(|e| {
        eprintln!("edgebind: warning: broker policy not refreshed: {e:#}");
        false
    });
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "device": device,
                "bundle_dir": written.dir,
                "bundle_tar": written.tar,
                "broker_reloaded": reloaded,
            }))?
        );
    } else {
        println!(
            "registered {} ({}), certificate serial {} valid until {}",
            device.id,
            device.board,
            issued.serial,
            fmt_time(Some(cert_expiry(&device)))
        );
        println!("identity bundle: {}", written.dir.display());
        println!("factory tar:     {}", written.tar.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn cert_expiry(d: &Device) -> u64 {
    d.cert.as_ref().map(|c| c.not_after).unwrap_or(0)
}

fn show(args: ShowArgs, home: &Home) -> anyhow::Result<ExitCode> {
    let id = parse_device(&args.id)?;
    let store = open_registry(home)?;
    let d = store.device(&id)?;
    let commands = store.commands_for(&id, args.recent)?;
    let rules = store.on_connect_rules(&id)?;
    let telemetry = store.telemetry_history(&id, args.recent)?;
    let events = store.events(&id, args.recent)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "device": d,
                "converged": d.converged(),
                "commands": commands,
                "on_connect": rules,
                "telemetry": telemetry,
                "events": events,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let tags: Vec<&str> = d.tags.iter().map(Tag::as_str).collect();
    println!("device        {}", d.id);
    println!("board         {}", d.board);
    println!("tags          {}", tags.join(", "));
    println!("lifecycle     {}", d.lifecycle.as_str());
    println!(
        "presence      {} (last seen {})",
        if d.online { "online" } else { "offline" },
        fmt_time(d.last_seen)
    );
    println!(
        "agent         {}",
        d.agent_version.as_deref().unwrap_or("-")
    );
    if !d.addresses.is_empty() {
        println!("addresses     {}", d.addresses.join(", "));
    }
    if let Some(c) = &d.cert {
        println!(
            "certificate   serial {} sha256 {} expires {}",
            c.serial,
            c.fingerprint_sha256,
            fmt_time(Some(c.not_after))
        );
    }
    println!(
        "desired       rev {} {}{}",
        d.desired_revision,
        Value::Object(d.desired.clone()),
        if d.desired_published_revision < d.desired_revision {
            " (not published yet)"
        } else {
            ""
        }
    );
    match &d.reported {
        Some(r) => println!(
            "reported      rev {} {}{}",
            r.revision,
            Value::Object(r.applied.clone()),
            if r.ignored.is_empty() {
                String::new()
            } else {
                format!(" ignored {}", Value::Object(r.ignored.clone()))
            }
        ),
        None => println!("reported      -"),
    }
    println!("converged     {}", if d.converged() { "yes" } else { "no" });
    if let Some(t) = &d.telemetry {
        println!(
            "telemetry     {} ({} samples received)",
            t, d.telemetry_count
        );
    }
    if let Some(inv) = &d.inventory {
        println!("inventory     {inv} (at {})", fmt_time(d.inventory_at));
    }
    if !rules.is_empty() {
        println!("on connect:");
        for r in &rules {
            println!(
                "  rule {:<4} {} {}",
                r.id,
                r.action,
                Value::Object(r.args.clone())
            );
        }
    }
    if !commands.is_empty() {
        println!("recent commands:");
        for c in &commands {
            println!(
                "  {:<32} {:<14} {:<10} {:<10} {}{}",
                c.id,
                c.action.as_deref().unwrap_or("?"),
                c.delivery.as_str(),
                c.state.as_str(),
                fmt_time(Some(c.created_at)),
                c.reason
                    .as_deref()
                    .map(|r| format!("  ({r})"))
                    .unwrap_or_default()
            );
        }
    }
    if !events.is_empty() {
        println!("recent events:");
        for e in &events {
            println!("  {} {:<12} {}", fmt_time(Some(e.ts)), e.kind, e.message);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list(args: ListArgs, home: &Home) -> anyhow::Result<ExitCode> {
    let selector = match &args.tag {
        Some(t) => Selector::Tag(t.parse()?),
        None => Selector::All,
    };
    let devices = open_registry(home)?.devices(&selector)?;
    if args.json {
        let rows: Vec<Value> = devices
            .iter()
            .map(|d| {
                json!({
                    "id": d.id,
                    "board": d.board,
                    "tags": d.tags,
                    "lifecycle": d.lifecycle,
                    "online": d.online,
                    "last_seen": d.last_seen,
                    "agent_version": d.agent_version,
                    "cpu_pct": d.telemetry.as_ref().and_then(|t| t.get("cpu_pct")),
                    "mem_used_bytes": d.telemetry.as_ref().and_then(|t| t.get("mem_used_bytes")),
                    "mem_total_bytes": d.telemetry.as_ref().and_then(|t| t.get("mem_total_bytes")),
                    "cert_not_after": d.cert.as_ref().map(|c| c.not_after),
                    "desired_revision": d.desired_revision,
                    "converged": d.converged(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    let header = [
        "ID",
        "BOARD",
        "STATE",
        "LAST SEEN",
        "AGENT",
        "CPU",
        "MEMORY",
        "CERT EXPIRES",
    ];
    let rows: Vec<[String; 8]> = devices
        .iter()
        .map(|d| {
            let state = match (d.lifecycle, d.online) {
                (Lifecycle::Revoked, _) => "revoked",
                (_, true) => "online",
                (Lifecycle::Registered, false) => "never seen",
                (_, false) => "offline",
            };
            let t = d.telemetry.as_ref();
            let cpu = t
                .and_then(|t| t.get("cpu_pct")?.as_f64())
                .map(|c| format!("{c:.0}%"))
                .unwrap_or_else(|| "-".into());
            let mem = t
                .and_then(|t| {
                    let used = t.get("mem_used_bytes")?.as_u64()?;
                    let total = t.get("mem_total_bytes")?.as_u64()?;
                    Some(format!("{}/{} MiB", used >> 20, total >> 20))
                })
                .unwrap_or_else(|| "-".into());
            [
                d.id.to_string(),
                d.board.to_string(),
                state.to_owned(),
                fmt_time(d.last_seen),
                d.agent_version.clone().unwrap_or_else(|| "-".into()),
                cpu,
                mem,
                fmt_date(d.cert.as_ref().map(|c| c.not_after)),
            ]
        })
        .collect();
    print_table(&header, &rows);
    if devices.is_empty() {
        eprintln!("(no devices; add one with `edgebind device add <id> --board <board>`)");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn revoke(args: RevokeArgs, home: &Home) -> anyhow::Result<ExitCode> {
    let id = parse_device(&args.id)?;
    let mut store = open_registry(home)?;
    let device = store.device(&id)?;
    if device.lifecycle == Lifecycle::Revoked {
        bail!("device {id} is already revoked");
    }
    let pki = Pki::open(&home.pki_dir()).context("open the fleet PKI")?;
    let revoked_certs = pki.revoke(&Principal::Device(id.clone()))?;
    let device = store.revoke(&id)?;
    let reloaded = refresh_broker_policy(home, &pki)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "device": device,
                "revoked_serials": revoked_certs.iter().map(|e| &e.serial).collect::<Vec<_>>(),
                "broker_reloaded": reloaded,
            }))?
        );
    } else {
        println!(
            "revoked {id}: {} certificate(s) on the CRL, queued commands dropped",
            revoked_certs.len()
        );
        if reloaded {
            println!(
                "broker reloaded: its certificate is refused at every new handshake, and a connection \
                 that is already open is denied every topic (ACL) until it drops"
            );
        } else {
            println!(
                "broker not running here: the new ACL/CRL apply at its next start or `edgebind broker reload`"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn set(args: SetArgs, home: &Home) -> anyhow::Result<ExitCode> {
    let id = parse_device(&args.id)?;
    let mut changes = Map::new();
    for s in &args.settings {
        let (k, v) = parse_setting(s)?;
        // The agent's own rule: refuse here what the device would only
        // report as ignored. `null` removes a setting; unknown keys are
        // passed on with a note (a newer agent may know them).
        if settings::is_known(&k) && !v.is_null() {
            settings::validate(&k, &v)
                .map_err(|e| anyhow::anyhow!("{s}: {k} {e}; nothing was changed"))?;
        }
        changes.insert(k, v);
    }
    let mut store = open_registry(home)?;
    let desired = store.set_desired(&id, &changes)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"device": id, "desired": desired}))?
        );
    } else {
        println!(
            "{id}: desired settings revision {} = {}",
            desired.revision,
            Value::Object(desired.settings.clone())
        );
        for k in changes.keys().filter(|k| !known_setting(k)) {
            eprintln!(
                "note: {k:?} is not a setting agents are known to understand; the device will report it as ignored"
            );
        }
        println!("the fleet service publishes it to the device (retained)");
    }
    Ok(ExitCode::SUCCESS)
}

/// Split `send`'s words into (device, action, key=value args).
fn send_words(args: &SendArgs) -> anyhow::Result<(Option<&str>, &str, &[String])> {
    let fan_out = args.tag.is_some() || args.all;
    match (fan_out, args.words.as_slice()) {
        (true, [action, rest @ ..]) => Ok((None, action, rest)),
        (false, [device, action, rest @ ..]) => Ok((Some(device), action, rest)),
        (false, [_]) => bail!("name the device and the action: `edgebind send <device> <action>`"),
        _ => bail!("name an action"),
    }
}

pub fn send(args: SendArgs, home: &Home) -> anyhow::Result<ExitCode> {
    let (device, action, rest) = send_words(&args)?;
    let action: Action = action.parse().map_err(anyhow::Error::msg)?;
    let cmd_args = parse_args(rest.iter().map(String::as_str))?;
    let mut store = open_registry(home)?;
    let targets: Vec<DeviceId> = match (device, &args.tag, args.all) {
        (Some(id), _, _) => {
            let id = parse_device(id)?;
            let d = store.device(&id)?;
            if d.lifecycle == Lifecycle::Revoked {
                bail!("device {id} is revoked");
            }
            vec![id]
        }
        (None, Some(tag), _) => active(store.devices(&Selector::Tag(tag.parse()?))?),
        (None, None, true) => active(store.devices(&Selector::All)?),
        (None, None, false) => bail!("name a device, --tag or --all"),
    };
    if targets.is_empty() {
        bail!("no (non-revoked) device matches");
    }

    if args.on_connect {
        let mut rules = Vec::new();
        for d in &targets {
            rules.push(store.add_on_connect(d, action, &cmd_args)?);
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rules)?);
        } else {
            for r in &rules {
                println!(
                    "{}: {} will run on every connect (rule {})",
                    r.device, r.action, r.id
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    let operator_dir = args
        .connect
        .identity
        .clone()
        .unwrap_or_else(|| home.operator_dir());
    // Queued commands need no connection; still record who asked when the
    // operator identity is at hand.
    let queued_by = find_identity(&operator_dir, &["client", "operator"])
        .ok()
        .and_then(|id| cert_cn(&id.cert).ok());
    let requested_by = if args.queue {
        None
    } else {
        Some(operator_identity(
            home,
            &operator_dir,
            args.connect.identity.is_some(),
        )?)
    };
    let expires_at = match (args.expires_in, args.queue) {
        (Some(s), _) => Some(now_unix() + s),
        (None, false) => Some(now_unix() + args.timeout),
        (None, true) => None,
    };
    let new: Vec<NewCommand> = targets
        .iter()
        .map(|d| NewCommand {
            id: new_command_id(if args.queue { "q" } else { "op" }),
            device: d.clone(),
            action,
            args: cmd_args.clone(),
            delivery: if args.queue {
                Delivery::Queued
            } else {
                Delivery::Now
            },
            requested_by: requested_by
                .as_ref()
                .map(|(cn, _)| cn.clone())
                .or_else(|| queued_by.clone()),
            expires_at,
            rule_id: None,
        })
        .collect();
    store.insert_commands(&new)?;

    if args.queue && args.wait {
        let outcomes = wait_in_registry(
            store.as_ref(),
            &new,
            Duration::from_secs(args.timeout),
            !args.json && new.len() > 1,
        )?;
        return report_outcomes(&outcomes, action, args.json);
    }
    if args.queue {
        if args.json {
            let rows: Vec<Value> = new
                .iter()
                .map(|c| json!({"device": c.device, "command": c.id, "state": "queued"}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            for c in &new {
                println!(
                    "{}: {} queued as {} (delivered by the fleet service when the device is online)",
                    c.device, action, c.id
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    let (cn, identity) = requested_by.expect("set when not queued");
    let endpoint = broker_endpoint(home, args.connect.broker.as_deref())?;
    let opts = edgebind_fleet::mqtt::options(&cn, &endpoint, &identity, Duration::from_secs(30))?;
    let commands: Vec<(DeviceId, Command)> = new
        .iter()
        .map(|c| {
            (
                c.device.clone(),
                Command {
                    id: c.id.clone(),
                    action,
                    args: cmd_args.clone(),
                    expires_at,
                },
            )
        })
        .collect();
    let total = commands.len();
    let show_progress = total > 1 && !args.json;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let mut failures = 0usize;
    let report = runtime.block_on(operator::send_and_wait(
        opts,
        commands,
        Duration::from_secs(args.timeout),
        |done, total, o: &DeviceOutcome| {
            if !o.outcome.is_success() {
                failures += 1;
            }
            if show_progress {
                eprint!(
                    "\r[{done:>width$}/{total}] {} ok, {failures} not ok",
                    done - failures,
                    width = total.to_string().len()
                );
                let _ = std::io::stderr().flush();
                if done == total {
                    eprintln!();
                }
            }
        },
    ))?;
    // Record what we saw, in case the fleet service is not running; applying
    // a result twice is harmless (final states never change).
    let received_at = now_unix();
    let updates: Vec<Update> = report
        .results
        .iter()
        .map(|(device, result)| Update::CommandResult {
            device: device.clone(),
            result: result.clone(),
            received_at,
        })
        .collect();
    if let Err(e) = store.apply(&updates) {
        eprintln!("edgebind: warning: results not recorded in the registry: {e}");
    }

    report_outcomes(&report.outcomes, action, args.json)
}

/// Print outcomes (human or JSON); success only if every device succeeded.
fn report_outcomes(
    outcomes: &[DeviceOutcome],
    action: Action,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(outcomes)?);
    } else {
        print_outcomes(outcomes, action);
    }
    Ok(if outcomes.iter().all(|o| o.outcome.is_success()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Wait for queued commands to reach a final state in the registry (the
/// fleet service delivers them and records the results).
fn wait_in_registry(
    store: &dyn Store,
    commands: &[NewCommand],
    timeout: Duration,
    progress: bool,
) -> anyhow::Result<Vec<DeviceOutcome>> {
    let started = std::time::Instant::now();
    let mut outcomes: Vec<Option<DeviceOutcome>> = vec![None; commands.len()];
    let mut failures = 0usize;
    loop {
        let mut done = 0usize;
        for (slot, c) in outcomes.iter_mut().zip(commands) {
            if slot.is_some() {
                done += 1;
                continue;
            }
            let record = store.command(&c.id)?;
            let outcome = match record.state {
                CommandState::Succeeded => Outcome::Succeeded {
                    output: record.output,
                },
                CommandState::Failed => Outcome::Failed {
                    reason: record.reason,
                    output: record.output,
                },
                CommandState::Rejected => Outcome::Rejected {
                    reason: record.reason,
                },
                _ if started.elapsed() >= timeout => Outcome::TimedOut {
                    accepted: record.state == CommandState::Accepted,
                },
                _ => continue,
            };
            if !outcome.is_success() {
                failures += 1;
            }
            *slot = Some(DeviceOutcome {
                device: c.device.clone(),
                command: c.id.clone(),
                outcome,
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
            done += 1;
        }
        if progress {
            eprint!(
                "\r[{done:>width$}/{total}] {} ok, {failures} not ok",
                done - failures,
                total = commands.len(),
                width = commands.len().to_string().len()
            );
            let _ = std::io::stderr().flush();
        }
        if done == commands.len() {
            if progress {
                eprintln!();
            }
            return Ok(outcomes.into_iter().flatten().collect());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn print_outcomes(outcomes: &[DeviceOutcome], action: Action) {
    for o in outcomes {
        let detail = match &o.outcome {
            Outcome::Succeeded { output: Some(out) } => format!(" {out}"),
            Outcome::Failed { reason, output } => format!(
                " {}{}",
                reason.as_deref().unwrap_or(""),
                output.as_ref().map(|o| format!(" {o}")).unwrap_or_default()
            ),
            Outcome::Rejected { reason } => format!(" {}", reason.as_deref().unwrap_or("")),
            _ => String::new(),
        };
        println!(
            "{:<24} {} {} ({} ms) [{}]{}",
            o.device,
            action,
            o.outcome.label(),
            o.elapsed_ms,
            o.command,
            detail.trim_end()
        );
    }
    if outcomes.len() > 1 {
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for o in outcomes {
            *counts.entry(o.outcome.label()).or_default() += 1;
        }
        let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        println!("{} devices: {}", outcomes.len(), summary.join(", "));
    }
}

fn active(devices: Vec<Device>) -> Vec<DeviceId> {
    devices
        .into_iter()
        .filter(|d| d.lifecycle != Lifecycle::Revoked)
        .map(|d| d.id)
        .collect()
}

/// The operator identity (CN, files): `--identity DIR`, or `<home>/operator/`
/// (issued as `operator:<user>` from the fleet PKI if there is none yet).
fn operator_identity(
    home: &Home,
    dir: &std::path::Path,
    explicit: bool,
) -> anyhow::Result<(String, edgebind_fleet::mqtt::ClientIdentity)> {
    let identity = if explicit {
        find_identity(dir, &["operator", "client"])?
    } else {
        let user = std::env::var("USER")
            .ok()
            .and_then(|u| DeviceId::new(u).ok())
            .map(|u| u.to_string())
            .unwrap_or_else(|| "admin".into());
        let principal = Principal::from_cn(&format!("operator:{user}"))?;
        ensure_identity(home, dir, &principal, default_days::OPERATOR)?
    };
    let cn = cert_cn(&identity.cert)?;
    Ok((cn, identity))
}

/// The CN of the first certificate in a PEM file.
fn cert_cn(path: &std::path::Path) -> anyhow::Result<String> {
    let pem = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .with_context(|| format!("{}: no certificate", path.display()))?
        .with_context(|| format!("{}: bad PEM", path.display()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .with_context(|| format!("{}: certificate has no CN", path.display()))?;
    Ok(cn.to_owned())
}

fn fmt_time(t: Option<u64>) -> String {
    match t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t as i64).ok()) {
        Some(dt) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        ),
        None => "-".into(),
    }
}

fn fmt_date(t: Option<u64>) -> String {
    let s = fmt_time(t);
    s.split(' ').next().unwrap_or("-").to_owned()
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(clap::Subcommand)]
    enum Top {
        #[command(subcommand)]
        Device(DeviceCommand),
        Send(SendArgs),
        Set(SetArgs),
    }

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    fn send_args(argv: &[&str]) -> SendArgs {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied())).unwrap();
        match cli.cmd {
            Top::Send(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn send_words_split_by_target_kind() {
        let a = send_args(&["send", "dev-a", "reboot", "delay=5"]);
        let (d, action, rest) = send_words(&a).unwrap();
        assert_eq!((d, action, rest.len()), (Some("dev-a"), "reboot", 1));
        let a = send_args(&["send", "--tag", "lab", "ping"]);
        let (d, action, rest) = send_words(&a).unwrap();
        assert_eq!((d, action, rest.len()), (None, "ping", 0));
        let a = send_args(&["send", "dev-a"]);
        assert!(send_words(&a).is_err());
        assert!(Cli::try_parse_from(["x", "send", "--all", "--tag", "t", "ping"]).is_err());
    }
}
