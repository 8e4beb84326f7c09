//! `edgebind`: the one command a fleet operator, a factory line or a firmware
//! engineer meets. Each subcommand parses its arguments, calls a library
//! (`edgebind_fleet::ops` for the operator's use cases, the PKI, broker and
//! image crates for the rest) and renders the result; nothing else.

mod cmd_broker;
mod cmd_console;
mod cmd_factory;
mod cmd_fleet;
mod cmd_image;
mod cmd_pki;
mod cmd_sim;
mod connect;
mod crl_warning;
mod device;
mod render;

use clap::{Parser, Subcommand};

use edgebind_fleet::ops::FleetHome;

#[derive(Parser)]
#[command(
    name = "edgebind",
    version,
    about = "Onboard and operate a fleet of embedded Linux devices",
    long_about = "Onboard and operate a fleet of embedded Linux devices.\n\n\
        All state (PKI, broker configuration, device registry) lives in one fleet home \
        directory, chosen with --home or EDGEBIND_HOME.",
    after_help = "Typical first steps:\n  \
        edgebind pki init --fleet acme\n  \
        edgebind broker config --host broker.example.net\n  \
        edgebind broker run &\n  \
        edgebind device add rpi-0001 --board raspberrypi3-64\n  \
        edgebind send rpi-0001 ping"
)]
struct Cli {
    /// Fleet home directory (PKI, broker config, registry).
    #[arg(
        long,
        global = true,
        env = "EDGEBIND_HOME",
        default_value = "edgebind-home"
    )]
    home: std::path::PathBuf,

    /// Device registry: `sqlite:PATH` (or a plain path) or
    /// `postgres://USER@HOST:PORT/DATABASE` [default: <home>/registry.db].
    #[arg(long, global = true, env = "EDGEBIND_REGISTRY", value_name = "URL")]
    registry: Option<edgebind_fleet::registry::RegistryUrl>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Certificate authority, device/broker/operator certificates, revocation.
    #[command(subcommand)]
    Pki(cmd_pki::PkiCommand),
    /// Generate, run and reload the least-privilege Mosquitto broker.
    #[command(subcommand)]
    Broker(cmd_broker::BrokerCommand),
    /// Register, inspect and revoke devices in the registry.
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// List devices (same as `device list`).
    Devices(device::ListArgs),
    /// Send an action to one device, a tag or the whole fleet and wait for results.
    Send(device::SendArgs),
    /// Set desired settings of a device (`key=value`).
    Set(device::SetArgs),
    /// Revoke a device: registry, CRL and broker ACL (same as `device revoke`).
    Revoke(device::RevokeArgs),
    /// The fleet service that keeps the registry in step with the broker.
    #[command(subcommand)]
    Fleet(cmd_fleet::FleetCommand),
    /// Yocto image helpers: crate list for the agent recipe, factory personalization.
    #[command(subcommand)]
    Image(cmd_image::ImageCommand),
    /// The flashing station: make units from a manifest, their records, export/import, station kit.
    #[command(subcommand)]
    Factory(cmd_factory::FactoryCommand),
    /// The audit log: who changed what, when (CLI and console).
    Audit(AuditArgs),
    /// The web console (HTTPS): add devices, watch the fleet, send actions; `console login`.
    Console(cmd_console::ConsoleArgs),
    /// Simulate N devices in this process (each the real agent with its own identity): load-test a broker.
    Sim(cmd_sim::SimArgs),
}

#[derive(clap::Args)]
struct AuditArgs {
    /// Most entries shown (latest first).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Only entries before this sequence number (the next page).
    #[arg(long, value_name = "SEQ")]
    before: Option<i64>,
    #[arg(long)]
    json: bool,
}

fn audit_log(args: AuditArgs, home: &FleetHome) -> anyhow::Result<std::process::ExitCode> {
    let store = home.open_registry()?;
    let entries = store.audit_log(args.limit, args.before)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
    } else {
        let rows: Vec<[String; 6]> = entries
            .iter()
            .map(|e| {
                [
                    e.seq.to_string(),
                    render::unix_time(Some(e.at)),
                    e.actor.clone(),
                    e.action.clone(),
                    e.target.clone(),
                    e.detail.clone(),
                ]
            })
            .collect();
        render::table(&["SEQ", "WHEN", "WHO", "WHAT", "TARGET", "DETAIL"], &rows);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Record a completed change in the audit log; a failure to record is
/// reported, not fatal (the change itself is done).
fn audit(
    home: &FleetHome,
    store: &mut dyn edgebind_fleet::registry::Store,
    action: &str,
    target: &str,
    detail: &str,
) {
    let actor = edgebind_fleet::ops::audit::cli_actor(home);
    if let Err(e) = edgebind_fleet::ops::audit::record(store, &actor, action, target, detail) {
        eprintln!("edgebind: warning: {action} {target} done but not in the audit log: {e}");
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let home = FleetHome::new(cli.home).with_registry(cli.registry);
    let result = match cli.command {
        Command::Pki(c) => cmd_pki::run(c, &home),
        Command::Broker(c) => cmd_broker::run(c, &home),
        Command::Device(c) => device::run(c, &home),
        Command::Devices(a) => device::run(device::DeviceCommand::List(a), &home),
        Command::Send(a) => device::send(a, &home),
        Command::Set(a) => device::set(a, &home),
        Command::Revoke(a) => device::run(device::DeviceCommand::Revoke(a), &home),
        Command::Fleet(c) => cmd_fleet::run(c, &home),
        Command::Image(c) => cmd_image::run(c, &home),
        Command::Factory(c) => cmd_factory::run(c, &home),
        Command::Console(a) => cmd_console::run(a, &home),
        Command::Audit(a) => audit_log(a, &home),
        Command::Sim(a) => cmd_sim::run(a, &home),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("edgebind: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
