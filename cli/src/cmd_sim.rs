//! `edgebind sim`: parse the flags, call the simulator library
//! (`edgebind_sim::run`), render its progress and summary.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use edgebind_fleet::ops::FleetHome;
use edgebind_sim::{Progress, RunRequest, SimOptions, SimReport};

/// Simulate N devices in this process against the fleet's broker, each the
/// real agent with its own registered identity (load-test your broker).
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    edgebind sim --devices 5000 --duration 120          # register, run 2 min, revoke\n  \
    edgebind sim --devices 1000 --prefix lab --keep     # keep the identities for later runs\n  \
    edgebind sim --prefix lab --reuse --telemetry-interval 5\n  \
    edgebind send --tag sim ping                        # from another shell while it runs")]
pub struct SimArgs {
    /// Devices to simulate (with --reuse: at most this many of the kept ones).
    #[arg(long, value_name = "N")]
    devices: Option<usize>,
    /// Device ids are PREFIX-00001, PREFIX-00002...; default: sim-<time>, new each run.
    #[arg(long)]
    prefix: Option<String>,
    /// Seconds between telemetry samples of each device.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    telemetry_interval: u64,
    /// Stop after this many seconds (default: at Ctrl-C).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<u64>,
    /// Use the identities a `--keep` run of this --prefix left in <home>/sim/PREFIX/.
    #[arg(long)]
    reuse: bool,
    /// Keep the identities registered (bundles in <home>/sim/PREFIX/) instead of revoking them at the end.
    #[arg(long)]
    keep: bool,
    /// Broker address the devices dial (host:port); default: the home's broker settings.
    #[arg(long, value_name = "HOST:PORT")]
    broker: Option<String>,
    /// Devices started per second (0: all at once).
    #[arg(long, value_name = "N", default_value_t = 500)]
    ramp: u32,
    /// MQTT keep-alive of each device in seconds (default: the bundle's).
    #[arg(long, value_name = "SECONDS")]
    keep_alive: Option<u64>,
    /// Async worker threads driving the devices.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Print the summary as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

pub fn run(args: SimArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let req = RunRequest {
        devices: args.devices,
        prefix: args.prefix.clone(),
        reuse: args.reuse,
        keep: args.keep,
        broker: args.broker.clone(),
        duration: args.duration.map(Duration::from_secs),
        options: SimOptions {
            telemetry_interval_s: args.telemetry_interval,
            keep_alive_s: args.keep_alive,
            ramp_per_s: args.ramp,
            worker_threads: args.threads,
            ..SimOptions::default()
        },
    };
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(stop.clone())?;
    let report = edgebind_sim::run(home, &req, render_progress, || stop.load(Ordering::Relaxed))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(if report.all_well() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Ctrl-C or SIGTERM ends the run (cleanly: devices stopped, identities revoked).
fn stop_on_signals(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            stop.store(true, Ordering::Relaxed);
        });
    });
    Ok(())
}

fn render_progress(p: Progress) {
    let mut err = std::io::stderr();
    match p {
        Progress::Registering { done, total } => {
            let _ = write!(err, "\rregistering {done}/{total} identities");
            if done == total {
                let _ = writeln!(err);
            }
        }
        Progress::Registered { devices, took } => {
            let _ = writeln!(
                err,
                "registered {devices} devices in {:.1} s ({:.0}/s)",
                took.as_secs_f64(),
                devices as f64 / took.as_secs_f64().max(1e-3)
            );
        }
        Progress::Reused { devices, from } => {
            let _ = writeln!(
                err,
                "reusing {devices} kept identities from {}",
                from.display()
            );
        }
        Progress::Running {
            elapsed,
            snapshot: s,
        } => {
            let _ = writeln!(
                err,
                "[{:>5} s] connected {}/{}  online {}  commands answered {}  reboots {}  errors {}",
                elapsed.as_secs(),
                s.ever_connected,
                s.devices,
                s.online,
                s.answered,
                s.reboots,
                s.errors()
            );
        }
        Progress::Stopping => {
            let _ = writeln!(err, "stopping the devices...");
        }
        Progress::CleaningUp => {}
    }
}

fn print_summary(r: &SimReport) {
    let s = &r.last;
    println!("simulated {} devices ({}-*)", r.devices, r.prefix);
    if let Some(t) = r.registration_s {
        println!(
            "  registered in {t:.1} s ({:.0} identities/s)",
            r.devices as f64 / t.max(1e-3)
        );
    }
    match r.all_online_s {
        Some(t) => println!("  all connected {t:.1} s after the first start"),
        None => println!(
            "  not all connected: {} of {} at most",
            s.ever_connected, s.devices
        ),
    }
    println!(
        "  ran {:.0} s: {} connects, {} refused, {} failed handshakes, {} connections lost",
        r.ran_s, s.connects, s.refused, s.handshake_failures, s.lost
    );
    println!(
        "  {} telemetry samples, {} commands answered ({} succeeded), {} reboots, {} agent restarts, {} agent errors",
        s.telemetry, s.answered, s.answered_ok, s.reboots, s.restarts, s.agent_errors
    );
    let c = &r.cost;
    println!(
        "  memory {:.1} MiB -> {:.1} MiB: {:.1} KiB per device",
        c.rss_before_bytes as f64 / 1048576.0,
        c.rss_bytes as f64 / 1048576.0,
        c.rss_per_device_bytes as f64 / 1024.0
    );
    match c.cpu_us_per_message {
        Some(us) => println!(
            "  CPU {:.1} s: {us:.0} µs per message sent (connecting included)",
            c.cpu_s
        ),
        None => println!("  CPU {:.1} s (no message sent)", c.cpu_s),
    }
    if !r.never_connected.is_empty() {
        let ids: Vec<&str> = r.never_connected.iter().map(|d| d.as_str()).collect();
        println!("  never connected: {}", ids.join(", "));
    }
    if let Some(dir) = &r.kept {
        println!("  identities kept in {}", dir.display());
    }
    if let Some(v) = &r.revoked {
        println!(
            "  cleaned up: {} certificates and {} devices revoked",
            v.certificates, v.devices
        );
    }
}
