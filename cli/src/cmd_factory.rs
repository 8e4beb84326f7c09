//! `edgebind factory ...`: the flashing station. Each subcommand parses its
//! arguments, calls `edgebind_fleet::ops::factory` and renders the result.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use edgebind_certs::profile::default_days;
use edgebind_fleet::ops::factory::{self, FactoryOutput, FactoryRun, Outcome, UnitResult};
use edgebind_fleet::ops::{AgentBroker, FleetHome, claim};

use crate::render;

#[derive(Subcommand)]
pub enum FactoryCommand {
    /// Make a batch of units from a manifest: register, issue, record, write each one.
    #[command(
        after_help = "The manifest is CSV with a header row naming its columns:\n  \
        serial,device_id,board,tags\n  \
        ACME-0001,,raspberrypi3-64,lab;eu\n  \
        ACME-0002,rpi-kitchen,raspberrypi3-64,\n\
        serial and board are required. Without a device_id, the id is the serial with ASCII \
        letters lowercased and every character other than a letter, digit, '-', '_' or '.' \
        replaced by '-' (ACME/2024:0001 -> acme-2024-0001). A manifest with any bad line is \
        refused whole, every bad line named.\n\n\
        Each unit is registered with its certificate and its manufacturing record in one \
        registry transaction; a unit that fails is undone (certificate revoked, nothing written) \
        and the batch goes on. Units whose serial already has a record are skipped: running the \
        same manifest again issues nothing twice (--reissue makes them again). Exit 1 if any \
        unit failed.\n\n\
        Examples:\n  \
        edgebind factory run --manifest devices.csv --image golden.wic --out images/\n  \
        edgebind factory run --manifest devices.csv --out bundles/     # one <id>.tar per unit\n  \
        edgebind --home station-kit factory run --manifest devices.csv --image golden.wic --out images/ --json"
    )]
    Run(RunArgs),
    /// List the manufacturing records of the registry.
    Records(RecordsArgs),
    /// Write every manufacturing record (with its device and certificate) to a JSON file.
    #[command(after_help = "Pairs with `factory import` on the fleet side:\n  \
        edgebind --home station-kit factory export --out line-1.json\n  \
        edgebind factory import line-1.json")]
    Export(ExportArgs),
    /// Merge records exported from a station into this registry (idempotent, all or nothing).
    #[command(
        after_help = "Each unit's device is registered (if new), its record stored and its \
        certificate added to this PKI's inventory, so it can be listed and revoked here. Importing \
        the same file again changes nothing. A unit that disagrees with what is here (the serial \
        recorded with another device or certificate, the device registered with another \
        certificate) fails the whole import, naming the unit; nothing is imported then."
    )]
    Import(ImportArgs),
    /// Make the fleet home of an offline flashing station: issuing CA, no root key.
    #[command(
        after_help = "The kit holds pki/ with the root certificate, the issuing CA's \
        certificate and key, the CRL and the inventory (never root-ca.key), an empty registry, \
        and station.json with the station name and the broker address its units dial. Carry it \
        to the station and run `edgebind --home KIT factory run ...` there.\n\n\
        Example:\n  \
        edgebind factory station-kit --out /media/usb/line-1 --station line-1"
    )]
    StationKit(StationKitArgs),
    /// Put unit serials on a batch's allow-list (claim-based first boot).
    #[command(
        after_help = "The file has one serial per line; blank lines and lines starting with '#' \
        are skipped. A file with any bad line (not a serial, or a serial given twice) is refused \
        whole, every bad line named. Serials already on this batch's list are left alone; a \
        serial on another batch's list refuses the whole file. Each serial provisions once, as \
        the device id its serial names (ACME-0001 -> acme-0001).\n\n\
        Examples:\n  \
        edgebind factory allow --batch line-7 --serials line-7.txt\n  \
        edgebind factory allow --batch line-7 --list --json"
    )]
    Allow(AllowArgs),
    /// Issue a batch's claim identity and write the claim bundle for its golden image.
    #[command(
        after_help = "Writes DIR (agent.toml with a [claim] section, claim.crt, claim.key, ca.crt) \
        and DIR.tar beside it: put the tar onto the golden image's boot partition with \
        `edgebind image personalize --image golden.wic --bundle DIR.tar`. Every unit of the batch \
        boots with it, makes its own key, and asks `edgebind fleet serve` for its certificate on \
        the broker's provisioning listener. Revoke the batch with `edgebind pki revoke claim:BATCH` \
        when it is done: new provisioning stops, provisioned devices stay.\n\n\
        Examples:\n  \
        edgebind factory claim-identity --batch line-7 --out claim-line-7\n  \
        edgebind factory claim-identity --batch line-7 --out claim-line-7 --serial-file /sys/class/dmi/id/product_serial"
    )]
    ClaimIdentity(ClaimIdentityArgs),
}

#[derive(Args)]
pub struct AllowArgs {
    /// The production batch (its claim identity is claim:BATCH).
    #[arg(long)]
    batch: edgebind_protocol::DeviceId,
    /// File of serials, one per line.
    #[arg(long, required_unless_present = "list")]
    serials: Option<PathBuf>,
    /// List the batch's allow-list (and which units are provisioned) instead.
    #[arg(long, conflicts_with = "serials")]
    list: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ClaimIdentityArgs {
    /// The production batch (the identity is claim:BATCH).
    #[arg(long)]
    batch: edgebind_protocol::DeviceId,
    /// The bundle directory to write (must not exist); DIR.tar is written beside it.
    #[arg(long)]
    out: PathBuf,
    /// Lifetime in days: short, a batch is made in days.
    #[arg(long, default_value_t = default_days::CLAIM)]
    days: u32,
    /// Broker the units dial, host:port [default: the broker settings].
    #[arg(long)]
    broker: Option<String>,
    /// The provisioning listener's port [default: the broker settings].
    #[arg(long)]
    provisioning_port: Option<u16>,
    /// Where each unit reads its serial number.
    #[arg(long, default_value = edgebind_protocol::bundle::defaults::CLAIM_SERIAL_FILE)]
    serial_file: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RunArgs {
    /// The unit manifest (CSV with a header row; see below).
    #[arg(long)]
    manifest: PathBuf,
    /// Golden disk image (MBR or GPT, uncompressed); each unit gets a
    /// personalized copy `<out>/<id>.<ext>`. Without it, one bundle
    /// `<out>/<id>.tar` per unit, for a duplicator.
    #[arg(long)]
    image: Option<PathBuf>,
    /// 1-based partition number of the image's boot partition (default: the first FAT one).
    #[arg(long, requires = "image")]
    partition: Option<usize>,
    /// Directory for the images or bundles (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Name of this flashing station, in each record [default: the station kit's, else the host name].
    #[arg(long)]
    station: Option<String>,
    /// Who runs the station, in each record (from $USER when not given).
    #[arg(long, env = "USER", default_value = "unknown")]
    operator: String,
    /// Broker the units' agent.toml dial, host:port [default: the station kit's, else the broker settings].
    #[arg(long)]
    broker: Option<String>,
    /// Certificate lifetime in days.
    #[arg(long, default_value_t = default_days::DEVICE)]
    days: u32,
    /// Make units that already have a record again, with a new certificate.
    #[arg(long)]
    reissue: bool,
    /// Print the report as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RecordsArgs {
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The JSON file to write (`-` for stdout).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct ImportArgs {
    /// A file written by `factory export`.
    file: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StationKitArgs {
    /// Directory to create (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// The station's name (recorded in every unit it makes).
    #[arg(long)]
    station: Option<String>,
    /// Broker the station's units dial, host:port [default: the broker settings of this home].
    #[arg(long)]
    broker: Option<String>,
}

pub fn run(cmd: FactoryCommand, home: &FleetHome) -> anyhow::Result<ExitCode> {
    match cmd {
        FactoryCommand::Run(a) => run_batch(a, home),
        FactoryCommand::Records(a) => records(a, home),
        FactoryCommand::Export(a) => export(a, home),
        FactoryCommand::Import(a) => import(a, home),
        FactoryCommand::StationKit(a) => station_kit(a, home),
        FactoryCommand::Allow(a) => allow(a, home),
        FactoryCommand::ClaimIdentity(a) => claim_identity(a, home),
    }
}

fn allow(a: AllowArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let mut store = home.open_registry()?;
    if a.list {
        let list = store.claim_serials(&a.batch)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&list)?);
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<[String; 4]> = list
            .iter()
            .map(|c| {
                [
                    c.serial.to_string(),
                    render::unix_time(Some(c.allowed_at)),
                    c.provisioned
                        .as_ref()
                        .map(|p| p.device.to_string())
                        .unwrap_or_else(|| "-".into()),
                    render::unix_time(c.provisioned.as_ref().map(|p| p.at)),
                ]
            })
            .collect();
        render::table(&["SERIAL", "ALLOWED", "DEVICE", "PROVISIONED"], &rows);
        return Ok(ExitCode::SUCCESS);
    }
    let path = a.serials.expect("clap requires --serials without --list");
    let serials = claim::read_serials(&path)?;
    let done = claim::allow(store.as_mut(), &a.batch, &serials)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        println!(
            "batch {}: {} serial(s) allowed now, {} already on the list",
            done.batch,
            done.report.added.len(),
            done.report.already.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn claim_identity(a: ClaimIdentityArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let broker = a
        .broker
        .as_deref()
        .map(AgentBroker::from_addr)
        .transpose()?;
    let made = claim::claim_identity(
        home,
        &claim::ClaimIdentityRequest {
            batch: a.batch,
            validity_days: a.days,
            broker,
            provisioning_port: a.provisioning_port,
            serial: edgebind_protocol::bundle::SerialSource::File(a.serial_file),
            out: a.out,
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&made)?);
    } else {
        println!(
            "issued {} (serial {}, valid until {})",
            made.principal,
            made.serial,
            render::unix_time(Some(made.not_after))
        );
        println!(
            "wrote the claim bundle {} and {} (units dial {}:{}, provisioning port {})",
            made.dir.display(),
            made.tar.display(),
            made.broker.host,
            made.broker.port,
            made.provisioning_port
        );
        println!(
            "next: edgebind image personalize --image GOLDEN.wic --bundle {}",
            made.tar.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "station".into())
}

fn run_batch(a: RunArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let units = factory::read_manifest(&a.manifest)?;
    let broker = a
        .broker
        .as_deref()
        .map(AgentBroker::from_addr)
        .transpose()?;
    let station = a
        .station
        .or_else(|| factory::kit_station_name(home))
        .unwrap_or_else(host_name);
    let output = match a.image {
        Some(golden) => FactoryOutput::Image {
            golden,
            partition: a.partition,
        },
        None => FactoryOutput::Bundles,
    };
    let total = units.len();
    let request = FactoryRun {
        units,
        output,
        out: a.out,
        station,
        operator: a.operator,
        validity_days: a.days,
        broker,
        reissue: a.reissue,
    };
    let mut store = home.open_registry()?;
    let mut done = 0;
    let progress = |u: &UnitResult| {
        done += 1;
        let what = match u.outcome {
            Outcome::Made => "made",
            Outcome::Reissued => "reissued",
            Outcome::Skipped => "skipped (already made)",
            Outcome::Failed => "FAILED",
            Outcome::NotAttempted => "not attempted",
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "[{done}/{total}] {}: {what}", u.label());
        if let Some(e) = &u.error {
            let _ = write!(err, ": {e}");
        }
        let _ = writeln!(err);
    };
    let report = factory::run(home, store.as_mut(), &request, progress)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for u in report
            .units
            .iter()
            .filter(|u| u.outcome == Outcome::NotAttempted)
        {
            eprintln!("{}: not attempted", u.label());
        }
        if let Some(d) = &report.image_sha256 {
            println!("golden image sha256 {d}");
        }
        println!(
            "factory run at {}: {} made, {} reissued, {} skipped (already made), {} failed{}",
            report.station,
            report.made,
            report.reissued,
            report.skipped,
            report.failed,
            report
                .stopped
                .as_ref()
                .map(|s| format!("; stopped: {s}"))
                .unwrap_or_default()
        );
    }
    Ok(if report.all_done() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn records(a: RecordsArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let store = home.open_registry()?;
    let records = store.manufacturing_records()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 7]> = records
        .iter()
        .map(|r| {
            [
                r.serial.clone(),
                r.device.to_string(),
                r.cert_serial.clone(),
                r.station.clone(),
                r.operator.clone(),
                render::unix_time(Some(r.made_at)),
                r.image_sha256
                    .as_deref()
                    .map(|d| d[..d.len().min(16)].to_owned())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    render::table(
        &[
            "SERIAL", "DEVICE", "CERT", "STATION", "OPERATOR", "MADE", "IMAGE",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

fn export(a: ExportArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let store = home.open_registry()?;
    let exported = factory::export(home, store.as_ref())?;
    let text = serde_json::to_string_pretty(&exported)?;
    if a.out.as_os_str() == "-" {
        println!("{text}");
    } else {
        edgebind_certs::files::write_public(&a.out, text.as_bytes())?;
        println!(
            "exported {} manufacturing record(s) to {}",
            exported.units.len(),
            a.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn import(a: ImportArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("cannot read {}", a.file.display()))?;
    let exported: factory::Export = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a manufacturing export", a.file.display()))?;
    let mut store = home.open_registry()?;
    let done = factory::import(home, store.as_mut(), &exported)
        .with_context(|| format!("nothing imported from {}", a.file.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        println!(
            "imported {}: {} unit(s) added with their device, {} recorded for a device already here, {} already present; {} certificate(s) added to the inventory",
            a.file.display(),
            done.registry.added.len(),
            done.registry.recorded.len(),
            done.registry.unchanged.len(),
            done.certificates_added
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn station_kit(a: StationKitArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let broker = a
        .broker
        .as_deref()
        .map(AgentBroker::from_addr)
        .transpose()?;
    let kit = factory::station_kit(home, &a.out, a.station.as_deref(), broker.as_ref())?;
    println!("station kit in {} (no root CA key):", kit.dir.display());
    for f in &kit.files {
        println!("  {}", f.display());
    }
    match &kit.broker {
        Some(b) => println!("units dial {}:{}", b.host, b.port),
        None => println!("no broker address known: pass --broker HOST:PORT to `factory run`"),
    }
    Ok(ExitCode::SUCCESS)
}
