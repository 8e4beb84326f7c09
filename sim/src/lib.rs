//! The fleet simulator behind `edgebind sim`: N devices in one process, each
//! with its own registered identity and certificate (mutual TLS), each
//! driven by the agent's own code ([`edgebind_agent::Agent`]: the same core,
//! runtime, journal and outbox as on a device, no second implementation of
//! the protocol), with its state directory in a temporary directory and
//! reboots simulated through the agent's [`RebootHook`](edgebind_agent::embed::RebootHook).
//!
//! A crate of its own rather than a module of `edgebind-fleet`: the fleet
//! library is the operator's side and stays free of the device agent (and
//! its sysinfo, journal and outbox code); only the simulator, the CLI that
//! calls it and the tests need both.
//!
//! - [`identities`]: register the devices in one batch through
//!   `fleet::ops::register_devices`, reuse kept ones, revoke them afterwards;
//! - [`Simulation`]: the running devices on one tokio runtime, started at a
//!   bounded rate, with live [`Counters`];
//! - [`run`]: the whole `edgebind sim` use case (register, run for a while,
//!   report, clean up), which the CLI only renders.

pub mod accept;
pub mod counters;
pub mod device;
pub mod identities;
pub mod simulation;
pub mod usage;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use edgebind_fleet::ops::{AgentBroker, FleetHome, OpsError, RevokedBatch};
use edgebind_fleet::registry::RegistryError;
use edgebind_protocol::{DeviceId, IdError};
use serde::Serialize;

pub use counters::{Counters, Snapshot};
pub use identities::Identities;
pub use simulation::{Cost, SimOptions, Simulation};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("{0}")]
    Registration(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{devices} devices need about {} open files; this process may open {open_files} (hard limit), enough for {fit}: raise `ulimit -Hn` or simulate fewer",
        devices * usage::FILES_PER_DEVICE as usize + usage::FILES_BASE as usize
    )]
    TooMany {
        devices: usize,
        open_files: u64,
        fit: u64,
    },
    #[error("start the async runtime: {0}")]
    Runtime(String),
    #[error("{0}")]
    Usage(String),
}

/// What `edgebind sim` was asked to do.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Devices to simulate (with `reuse`: at most this many; `None`: all kept ones).
    pub devices: Option<usize>,
    /// Device ids are `PREFIX-00001`...; default `sim-<time>` (new each run).
    pub prefix: Option<String>,
    /// Use the identities a `keep` run left in `<home>/sim/<prefix>/`.
    pub reuse: bool,
    /// Keep the identities (registered, bundles in `<home>/sim/<prefix>/`)
    /// instead of revoking them at the end.
    pub keep: bool,
    /// `host:port` the devices dial; default: the home's broker settings.
    pub broker: Option<String>,
    /// Run this long once started (`None`: until `should_stop`).
    pub duration: Option<Duration>,
    pub options: SimOptions,
}

/// What [`run`] reports while it works.
#[derive(Debug, Clone)]
pub enum Progress {
    Registering {
        done: usize,
        total: usize,
    },
    Registered {
        devices: usize,
        took: Duration,
    },
    Reused {
        devices: usize,
        from: PathBuf,
    },
    /// Every second while the devices run.
    Running {
        elapsed: Duration,
        snapshot: Snapshot,
    },
    Stopping,
    CleaningUp,
}

/// The summary of a run.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub prefix: String,
    pub devices: usize,
    /// Identities registered by this run (else reused).
    pub created: bool,
    pub registration_s: Option<f64>,
    /// From the first agent's start until every device was connected.
    pub all_online_s: Option<f64>,
    pub ran_s: f64,
    /// Counters at the end, before the devices were stopped.
    pub last: Snapshot,
    pub cost: Cost,
    /// Devices never connected (the first 20).
    pub never_connected: Vec<DeviceId>,
    /// Where the kept identities are (`keep`).
    pub kept: Option<PathBuf>,
    /// What the cleanup revoked.
    pub revoked: Option<RevokedBatch>,
}

impl SimReport {
    /// Every device connected and nothing failed.
    pub fn all_well(&self) -> bool {
        self.never_connected.is_empty() && self.last.agent_errors == 0
    }
}

/// `<home>/sim/<prefix>`: where a kept run's bundles live.
pub fn kept_dir(home: &FleetHome, prefix: &str) -> PathBuf {
    home.root().join("sim").join(prefix)
}

/// A prefix nobody used yet: `sim-` and the time in base 36.
pub fn fresh_prefix() -> String {
    let mut t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut digits = Vec::new();
    while t > 0 {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(t % 36) as usize]);
        t /= 36;
    }
    digits.reverse();
    format!("sim-{}", String::from_utf8_lossy(&digits))
}

/// The whole use case: identities (new or kept), the devices run until
/// `duration` or `should_stop()`, the report, and the cleanup (the
/// identities this run registered are revoked unless `keep`; the state
/// directories are removed).
pub fn run(
    home: &FleetHome,
    req: &RunRequest,
    mut progress: impl FnMut(Progress) + Send,
    should_stop: impl Fn() -> bool,
) -> Result<SimReport, SimError> {
    let prefix = match (&req.prefix, req.reuse) {
        (Some(p), _) => p.clone(),
        (None, true) => {
            return Err(SimError::Usage(
                "--reuse needs the --prefix of the kept run".into(),
            ));
        }
        (None, false) => fresh_prefix(),
    };
    // The id rules apply to the prefix too (refused before anything is made).
    DeviceId::new(format!("{prefix}-1"))?;
    let mut store = home.open_registry()?;
    let bundles_tmp;
    let started_registration = Instant::now();
    let identities = if req.reuse {
        let dir = kept_dir(home, &prefix);
        let ids = identities::reuse(store.as_ref(), &dir, req.devices)?;
        progress(Progress::Reused {
            devices: ids.ids.len(),
            from: dir,
        });
        ids
    } else {
        let n = req
            .devices
            .ok_or_else(|| SimError::Usage("say how many devices: --devices N".into()))?;
        if n == 0 {
            return Err(SimError::Usage("--devices must be at least 1".into()));
        }
        let out = if req.keep {
            kept_dir(home, &prefix)
        } else {
            bundles_tmp = tempfile::Builder::new()
                .prefix("edgebind-sim-bundles-")
                .tempdir()
                .map_err(|e| SimError::Io {
                    path: std::env::temp_dir(),
                    source: e,
                })?;
            bundles_tmp.path().to_owned()
        };
        let broker = req
            .broker
            .as_deref()
            .map(AgentBroker::from_addr)
            .transpose()?;
        let report = std::sync::Mutex::new(&mut progress);
        let ids = identities::create(home, store.as_mut(), &prefix, n, broker, &out, |done| {
            // Issuing threads call in; every 100th is plenty for a display.
            if (done % 100 == 0 || done == n)
                && let Ok(mut p) = report.lock()
            {
                (*p)(Progress::Registering { done, total: n });
            }
        })?;
        progress(Progress::Registered {
            devices: ids.ids.len(),
            took: started_registration.elapsed(),
        });
        ids
    };
    let registration_s = identities
        .created
        .then(|| started_registration.elapsed().as_secs_f64());

    let result = simulate(&identities, req, &mut progress, &should_stop);
    progress(Progress::CleaningUp);
    let revoked = if req.keep {
        None
    } else {
        identities::remove(home, store.as_mut(), &identities)?
    };
    let (last, cost, all_online_s, ran_s, never_connected) = result?;
    Ok(SimReport {
        prefix,
        devices: identities.ids.len(),
        created: identities.created,
        registration_s,
        all_online_s,
        ran_s,
        last,
        cost,
        never_connected,
        kept: (req.keep || req.reuse).then(|| identities.bundles.clone()),
        revoked,
    })
}

type Ran = (Snapshot, Cost, Option<f64>, f64, Vec<DeviceId>);

fn simulate(
    identities: &Identities,
    req: &RunRequest,
    progress: &mut impl FnMut(Progress),
    should_stop: &impl Fn() -> bool,
) -> Result<Ran, SimError> {
    let sim = Simulation::start(identities.clone(), &req.options)?;
    let n = identities.ids.len() as u64;
    let mut all_online = None;
    let mut next_report = Duration::from_secs(1);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let s = sim.snapshot();
        let elapsed = sim.elapsed();
        if all_online.is_none() && s.online == n {
            all_online = Some(elapsed.as_secs_f64());
        }
        if elapsed >= next_report {
            progress(Progress::Running {
                elapsed,
                snapshot: s,
            });
            next_report += Duration::from_secs(1);
        }
        if should_stop() || req.duration.is_some_and(|d| elapsed >= d) {
            break;
        }
    }
    let last = sim.snapshot();
    let cost = sim.cost();
    let ran_s = sim.elapsed().as_secs_f64();
    let never: Vec<DeviceId> = identities
        .ids
        .iter()
        .filter(|_| last.ever_connected < n)
        .filter(|id| !sim.counters().has_connected(id))
        .take(20)
        .cloned()
        .collect();
    progress(Progress::Stopping);
    sim.stop(Duration::from_secs(30));
    Ok((last, cost, all_online, ran_s, never))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_prefix_makes_valid_device_ids() {
        let p = fresh_prefix();
        assert!(p.starts_with("sim-"), "{p}");
        let ids = identities::device_ids(&p, 5000).unwrap();
        assert_eq!(ids.len(), 5000);
        assert!(ids[4999].as_str().ends_with("-05000"));
    }
}
