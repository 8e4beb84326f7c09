//! A running simulation: N devices on one tokio runtime, started at a
//! bounded rate, counted, and stopped cleanly.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::SimError;
use crate::counters::{Counters, Snapshot};
use crate::device::{self, DeviceSpec};
use crate::identities::Identities;
use crate::usage;

/// How the devices behave.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Seconds between telemetry samples of each device.
    pub telemetry_interval_s: u64,
    /// MQTT keep-alive; `None`: the bundle's.
    pub keep_alive_s: Option<u64>,
    /// Devices started per second (0: all at once). The broker's listen
    /// queue and TLS handshakes set how fast it can take them.
    pub ramp_per_s: u32,
    /// Async worker threads.
    pub worker_threads: usize,
    /// How long a simulated reboot keeps a device away.
    pub reboot_delay: Duration,
    /// Where the state directories go (default: a temporary directory,
    /// removed at the end).
    pub state_dir: Option<PathBuf>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            telemetry_interval_s: 60,
            keep_alive_s: None,
            ramp_per_s: 500,
            worker_threads: 2,
            reboot_delay: Duration::from_secs(1),
            state_dir: None,
        }
    }
}

/// What a simulation cost and did.
#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    /// Resident memory before the first agent started.
    pub rss_before_bytes: u64,
    /// Resident memory now.
    pub rss_bytes: u64,
    /// (rss - rss_before) / devices.
    pub rss_per_device_bytes: u64,
    /// CPU time of the process since the first agent started.
    pub cpu_s: f64,
    /// CPU time per message the devices sent (telemetry, results), over the
    /// whole run including connecting; `None` before the first message.
    pub cpu_us_per_message: Option<f64>,
}

pub struct Simulation {
    runtime: Option<tokio::runtime::Runtime>,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    identities: Identities,
    /// Held for its Drop (removes the state directories).
    _state: Option<tempfile::TempDir>,
    state_dir: PathBuf,
    started: Instant,
    rss_before: u64,
    cpu_before: Duration,
}

impl Simulation {
    /// Start one device per identity (returns while they connect).
    pub fn start(identities: Identities, opts: &SimOptions) -> Result<Simulation, SimError> {
        let limit = usage::raise_open_files().map_err(|e| SimError::Io {
            path: "RLIMIT_NOFILE".into(),
            source: e,
        })?;
        let n = identities.ids.len();
        if usage::devices_for(limit) < n as u64 {
            return Err(SimError::TooMany {
                devices: n,
                open_files: limit,
                fit: usage::devices_for(limit),
            });
        }
        let (state, state_dir) = match &opts.state_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("edgebind-sim-")
                    .tempdir()
                    .map_err(|e| SimError::Io {
                        path: std::env::temp_dir(),
                        source: e,
                    })?;
                let p = t.path().to_owned();
                (Some(t), p)
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.worker_threads.max(1))
            .thread_name("sim-worker")
            .enable_all()
            .build()
            .map_err(|e| SimError::Runtime(e.to_string()))?;
        let counters = Arc::new(Counters::new(&identities.ids));
        let (stop, stop_rx) = watch::channel(false);
        let rss_before = usage::rss_bytes().unwrap_or(0);
        let cpu_before = usage::cpu_time();
        let started = Instant::now();
        let gap = match opts.ramp_per_s {
            0 => Duration::ZERO,
            r => Duration::from_secs_f64(1.0 / f64::from(r)),
        };
        let mut tasks = Vec::with_capacity(n);
        for (i, id) in identities.ids.iter().enumerate() {
            let spec = DeviceSpec {
                id: id.clone(),
                config_path: identities.bundle(id).join("agent.toml"),
                state_dir: state_dir.join(id.as_str()),
                telemetry_interval_s: opts.telemetry_interval_s,
                keep_alive_s: opts.keep_alive_s,
                reboot_delay: opts.reboot_delay,
            };
            let counters = counters.clone();
            let stop_rx = stop_rx.clone();
            let delay = gap * i as u32;
            tasks.push(runtime.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = wait_stop(stop_rx.clone()) => return,
                }
                device::run(spec, counters, stop_rx).await;
            }));
        }
        Ok(Simulation {
            runtime: Some(runtime),
            counters,
            stop,
            tasks,
            identities,
            _state: state,
            state_dir,
            started,
            rss_before,
            cpu_before,
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        self.counters.snapshot()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The counters, to read from another thread.
    pub fn shared_counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    pub fn identities(&self) -> &Identities {
        &self.identities
    }

    /// The state directories' root (`<root>/<id>/agent` is the agent's).
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Poll the counters every 50 ms until `done` or `timeout`; true if done.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&Snapshot) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.snapshot()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn cost(&self) -> Cost {
        let rss = usage::rss_bytes().unwrap_or(0);
        let cpu = usage::cpu_time().saturating_sub(self.cpu_before);
        let s = self.snapshot();
        let messages = s.telemetry + s.answered + s.accepted;
        Cost {
            rss_before_bytes: self.rss_before,
            rss_bytes: rss,
            rss_per_device_bytes: rss.saturating_sub(self.rss_before)
                / (self.identities.ids.len() as u64).max(1),
            cpu_s: cpu.as_secs_f64(),
            cpu_us_per_message: (messages > 0).then(|| cpu.as_secs_f64() * 1e6 / messages as f64),
        }
    }

    /// Stop every device cleanly (`offline`, DISCONNECT), waiting up to
    /// `grace` for them; returns the last counters.
    pub fn stop(mut self, grace: Duration) -> Snapshot {
        let _ = self.stop.send(true);
        if let Some(rt) = self.runtime.take() {
            let tasks = std::mem::take(&mut self.tasks);
            rt.block_on(async {
                let _ = tokio::time::timeout(grace, async {
                    for t in tasks {
                        let _ = t.await;
                    }
                })
                .await;
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        self.snapshot()
    }
}

impl Drop for Simulation {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
