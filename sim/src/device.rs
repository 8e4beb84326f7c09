//! One simulated device: the real agent ([`Agent::prepare`] + [`Agent::run`])
//! on its own identity bundle and state directory, started again after a
//! simulated reboot (under a new boot id, as after a real one) or a
//! `restart-agent`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgebind_agent::embed::RebootHook;
use edgebind_agent::host::HostPaths;
use edgebind_agent::{Agent, AgentConfig, Exit, RunOptions, shutdown_channel};
use edgebind_protocol::DeviceId;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::counters::Counters;

/// Pause before an agent that failed is started again (systemd's
/// `RestartSec=` on a device).
const RESTART_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// What a device task needs.
pub struct DeviceSpec {
    pub id: DeviceId,
    /// The bundle's `agent.toml`.
    pub config_path: PathBuf,
    /// This device's own state directory (journal, outbox, settings, boot id).
    pub state_dir: PathBuf,
    pub telemetry_interval_s: u64,
    pub keep_alive_s: Option<u64>,
    /// How long a simulated reboot keeps the device away.
    pub reboot_delay: Duration,
}

impl DeviceSpec {
    fn boot_id_path(&self) -> PathBuf {
        self.state_dir.join("boot_id")
    }

    /// A fresh boot id, as the kernel makes one per boot.
    fn new_boot(&self) -> std::io::Result<()> {
        std::fs::write(
            self.boot_id_path(),
            format!("{:032x}\n", rand::random::<u128>()),
        )
    }

    fn config(&self) -> Result<AgentConfig, String> {
        let mut config = AgentConfig::load(&self.config_path).map_err(|e| e.to_string())?;
        config.state.dir = self.state_dir.join("agent");
        config.telemetry.interval_s = self.telemetry_interval_s;
        if let Some(k) = self.keep_alive_s {
            config.broker.keep_alive_s = k;
        }
        // No declared actions: the host's /etc/edgebind/actions.d is not ours.
        config.actions.dir = self.state_dir.join("actions.d");
        config
            .validate(&self.config_path)
            .map_err(|e| e.to_string())?;
        Ok(config)
    }
}

/// Run the device until `stop` turns true. Agents that cannot start are
/// counted as errors and tried again after a pause.
pub async fn run(spec: DeviceSpec, counters: Arc<Counters>, mut stop: watch::Receiver<bool>) {
    let spec = Arc::new(spec);
    if let Err(e) = std::fs::create_dir_all(&spec.state_dir).and_then(|_| spec.new_boot()) {
        warn!(device = %spec.id, error = %e, "cannot make the simulated device's state directory");
        counters.agent_error();
        return;
    }
    let (reboot_tx, mut reboot_rx) = mpsc::unbounded_channel();
    let hook: RebootHook = Arc::new(move |_device, _command| {
        reboot_tx
            .send(())
            .map_err(|_| "the simulator is stopping".to_owned())
    });
    loop {
        if *stop.borrow() {
            return;
        }
        let prepared = {
            let spec = spec.clone();
            let options = RunOptions {
                host: HostPaths {
                    boot_id: spec.boot_id_path(),
                    ..HostPaths::default()
                },
                observer: Some(counters.clone()),
                reboot: Some(hook.clone()),
                ..RunOptions::default()
            };
            // Reading the bundle and opening the state files is blocking I/O.
            tokio::task::spawn_blocking(move || {
                let config = spec.config()?;
                Agent::prepare(config, options).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
        };
        let agent = match prepared {
            Ok(a) => a,
            Err(why) => {
                warn!(device = %spec.id, error = %why, "simulated agent refused to start");
                counters.agent_error();
                tokio::select! {
                    _ = tokio::time::sleep(RESTART_AFTER_FAILURE) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let (handle, signal) = shutdown_channel();
        let mut task = tokio::spawn(agent.run(signal));
        let next = tokio::select! {
            _ = stop.changed() => {
                handle.shutdown();
                let _ = task.await;
                counters.agent_stopped(&spec.id);
                return;
            }
            Some(()) = reboot_rx.recv() => {
                // systemd stops the agent (SIGTERM: a clean stop) and the
                // device goes away for a moment.
                handle.shutdown();
                let _ = task.await;
                counters.agent_stopped(&spec.id);
                counters.rebooted();
                if let Err(e) = spec.new_boot() {
                    warn!(device = %spec.id, error = %e, "cannot write the new boot id");
                    counters.agent_error();
                }
                Some(spec.reboot_delay)
            }
            exit = &mut task => {
                counters.agent_stopped(&spec.id);
                match exit {
                    Ok(Exit::RestartRequested) => {
                        counters.restarted();
                        None
                    }
                    Ok(Exit::Stopped) => return,
                    Ok(Exit::Failed | Exit::IdentityExpired) | Err(_) => {
                        counters.agent_error();
                        Some(RESTART_AFTER_FAILURE)
                    }
                }
            }
        };
        if let Some(pause) = next {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
