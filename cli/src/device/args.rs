//! The arguments of `edgebind device ...`, `devices`, `send`, `set` and `revoke`.

use clap::{Args, Subcommand};
use edgebind_certs::profile::default_days;

use crate::connect::ConnectArgs;

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Register a device: issue its certificate and identity bundle, record it.
    #[command(after_help = "Examples:\n  \
        edgebind device add rpi-0001 --board raspberrypi3-64 --tag lab --tag eu\n\n\
        The bundle (agent.toml, device.crt, device.key, ca.crt) is written to \
        <home>/bundles/<id>/ and as <home>/bundles/<id>.tar for the factory line. \
        If a step fails (bundle, broker ACL/CRL, registry), nothing stays: the new \
        certificate is revoked, the bundle removed, the registry untouched.")]
    Add(AddArgs),
    /// Everything the registry knows about one device.
    Show(ShowArgs),
    /// List devices.
    List(ListArgs),
    /// Revoke a device: registry, certificate (CRL) and broker ACL.
    Revoke(RevokeArgs),
    /// Remove an on-connect rule (see `device show`).
    OnConnectRemove(RuleArgs),
    /// Ask a device to renew its certificate now (the `renew` action): it
    /// makes a new key and sends a CSR over its own connection.
    #[command(after_help = "Examples:\n  \
        edgebind device renew rpi-0001\n  \
        edgebind device renew rpi-0001 --queue      # when it is next online\n\n\
        Agents renew by themselves at about two thirds of their certificate's \
        life; `edgebind device show` lists the device's certificates and their states.")]
    Renew(RenewArgs),
    /// Issue a fresh identity bundle for a registered device by hand (the
    /// factory or service-centre path, e.g. a device whose certificate expired).
    #[command(after_help = "Examples:\n  \
        edgebind device reissue rpi-0001\n  \
        edgebind device reissue rpi-0001 --out /media/usb/rpi-0001\n\n\
        The registry records the new certificate as the device's current one; \
        the previous one stays valid until it expires or is revoked \
        (`edgebind pki revoke --serial`). A revoked device is refused.")]
    Reissue(ReissueArgs),
}

#[derive(Args)]
pub struct RenewArgs {
    pub id: String,
    /// Seconds to wait for the device's answer.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Queue it for the fleet service to deliver when the device is online.
    #[arg(long)]
    pub queue: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ReissueArgs {
    pub id: String,
    /// Certificate lifetime in days.
    #[arg(long, default_value_t = default_days::DEVICE)]
    pub days: u32,
    /// Bundle directory (default: <home>/bundles/<id>, replaced), with
    /// <dir>.tar beside it; agent.toml dials the broker of the home's settings.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: bool,
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
#[command(after_help = "Examples:\n  \
    edgebind devices --state online --tag lab\n  \
    edgebind devices --search rpi-00 --limit 20\n  \
    edgebind devices --after rpi-0100          # the page after the one that ended at rpi-0100\n\n\
    Devices come sorted by id, one page at a time; when more match, the id to pass to \
    --after is printed on stderr.")]
pub struct ListArgs {
    /// Only devices with this tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Only devices in this state.
    #[arg(long, value_enum)]
    pub state: Option<StateFilter>,
    /// Only devices whose id contains this text.
    #[arg(long)]
    pub search: Option<String>,
    /// Devices per page (1-1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Start after this device id (the previous page's last one).
    #[arg(long)]
    pub after: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// The STATE column of `edgebind devices`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum StateFilter {
    Online,
    Offline,
    NeverSeen,
    Revoked,
}

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    edgebind send rpi-0001 ping\n  \
    edgebind send --tag lab inventory --timeout 60\n  \
    edgebind send --all reboot --queue         # delivered when each device is next online\n  \
    edgebind send rpi-0001 reboot --on-connect  # every time it connects\n  \
    edgebind send rpi-0001 inventory --queue --wait --timeout 3600\n  \
    edgebind send rpi-0001 selftest --arg level=full   # an action the image declared\n\n\
    Arguments are checked against the action list the device reported in its last\n\
    inventory (`edgebind device show DEV` lists it) before anything is sent.\n\n\
    Exit status: 0 when every device succeeded, 1 otherwise (failed, rejected, timed out).")]
pub struct SendArgs {
    /// `DEVICE ACTION [KEY=VALUE]...`, or `ACTION [KEY=VALUE]...` with --tag/--all.
    /// Built-in actions: reboot, ping, inventory, restart-agent,
    /// restart-service, collect-logs; an image may declare more. Argument
    /// values are parsed as JSON when they are JSON.
    #[arg(required = true, value_name = "DEVICE ACTION [KEY=VALUE]")]
    pub words: Vec<String>,
    /// An argument of the action, `KEY=VALUE`; repeatable (same as a
    /// trailing KEY=VALUE word).
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    pub arg: Vec<String>,
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
    /// Publish at most N commands per second (a fan-out of `reboot` must
    /// not restart every device at the same instant); --timeout and the
    /// commands' expiry are extended by the time this takes.
    #[arg(long, value_name = "N", conflicts_with_all = ["queue", "on_connect"])]
    pub rate: Option<u32>,
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
