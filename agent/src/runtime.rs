//! The thin I/O shell around [`Core`]: MQTT connection, timers, journal
//! file, reboot requests, systemd notifications.
//!
//! Two tasks: the *network* task owns rumqttc's event loop (so that no timer
//! in the main loop ever cancels a half-written packet) and handles
//! reconnects with capped, fully jittered exponential backoff; the *main*
//! loop feeds what arrives to the core and carries out the effects in order.
//! The retries follow [`Backoff`]: spread over the fleet's reconnect window
//! when the fleet gave one ([`crate::reconnect`]).
//! File writes and fsyncs run on the state-writer thread ([`StateWriter`]),
//! never on the async thread.
//!
//! PUBACKs are matched to outbox records by packet id: every QoS 1 request
//! the main loop hands to rumqttc pushes its tag (outbox sequence number, or
//! none) on a shared FIFO; rumqttc takes requests in channel order and
//! reports `Outgoing::Publish(pkid)` for each new one, where the network task
//! pairs the pkid with the next tag. A retransmission keeps its pkid (and
//! tag), so it takes no new one.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::now_unix;
use rumqttc::Outgoing as MqttOutgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PubAckReason, Publish};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rustls::pki_types::UnixTime;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::{AgentConfig, ConfigError};
use crate::core::{Core, CoreConfig, Effect, Outgoing, Qos, SavedSettings, Settings, Start};
use crate::host::HostPaths;
use crate::identity::{Identity, IdentityError};
use crate::journal::{JournalFile, Ledger, Retention};
use crate::logging::LogControl;
use crate::outbox::OutboxFile;
use crate::renewal::{self, Renewal};
use crate::systemd::Notifier;
use crate::telemetry::Sampler;
use crate::writer::StateWriter;
use edgebind_link::TlsError;

/// Exit status after `restart-agent`: non-zero so that `Restart=on-failure`
/// (or `always`) brings the agent back; `EX_TEMPFAIL` from sysexits.h.
pub const RESTART_EXIT_CODE: i32 = 75;
/// Exit status when the agent refuses to start (configuration, identity,
/// state directory): `EX_CONFIG`. Units should list it in
/// `RestartPreventExitStatus=` since retrying cannot help.
pub const REFUSED_EXIT_CODE: i32 = 78;

/// A connection that lasted this long was a real one: the next failure
/// starts the backoff from the beginning again. Shorter ones (a broker that
/// accepts and then drops us, e.g. for a duplicate client id) keep growing it.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// How long a clean stop waits for `offline` and DISCONNECT to go out.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
const SETTINGS_FILE: &str = "settings.json";
/// Delay of the first telemetry sample after start.
const FIRST_TELEMETRY: Duration = Duration::from_secs(2);
/// Certificates closer than this to their expiry are warned about at start.
const EXPIRY_WARNING_DAYS: i64 = 14;
/// Outgoing QoS 1 messages awaiting PUBACK (Mosquitto's default receive
/// maximum is 20).
const MAX_INFLIGHT: u16 = 32;
/// Room for requests between the main loop and rumqttc.
const REQUEST_CHANNEL_CAPACITY: usize = 256;
/// Outbox records handed to the connection and not yet acknowledged; the
/// rest of MAX_INFLIGHT is left to status and reported messages.
pub const OUTBOX_WINDOW: usize = 16;
/// Largest saved-settings file read at start (it is a few hundred bytes).
const MAX_SETTINGS_READ: u64 = 1024 * 1024;

/// Why the agent refuses to start. The messages are meant for the journal.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("state directory {} (config key state.dir) is not usable: {source}", dir.display())]
    State {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How the agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop (SIGTERM, shutdown handle): exit status 0.
    Stopped,
    /// `restart-agent` was run: exit with [`RESTART_EXIT_CODE`].
    RestartRequested,
    /// An internal failure (the network task died): exit status 1, so
    /// that systemd restarts the agent.
    Failed,
    /// The device certificate expired (by the device clock) and the broker
    /// refused the connection; a claim identity is there to re-provision
    /// with ([`crate::claim`]). The binary does that and runs again; as an
    /// exit status it is [`RESTART_EXIT_CODE`] (the next start re-provisions).
    IdentityExpired,
}

impl Exit {
    pub fn code(self) -> i32 {
        match self {
            Exit::Stopped => 0,
            Exit::RestartRequested | Exit::IdentityExpired => RESTART_EXIT_CODE,
            Exit::Failed => 1,
        }
    }
}

/// Stops a running agent (cleanly: `offline`, DISCONNECT). Dropping every
/// handle stops it too.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        let _ = self.0.send(true);
    }
}

/// The other end of a [`ShutdownHandle`], given to [`Agent::run`].
#[derive(Debug, Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    /// Resolves once a shutdown is asked for (or every handle is gone).
    pub async fn requested(&mut self) {
        while !*self.0.borrow_and_update() {
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }
}

pub fn shutdown_channel() -> (ShutdownHandle, ShutdownSignal) {
    let (tx, rx) = watch::channel(false);
    (ShutdownHandle(Arc::new(tx)), ShutdownSignal(rx))
}

/// Process-level integrations; all off by default (in-process agents).
pub struct RunOptions {
    pub host: HostPaths,
    pub notifier: Notifier,
    pub watchdog: Option<Duration>,
    pub log: Option<LogControl>,
    /// Told what the runtime does (an embedder's counters, see [`crate::embed`]).
    pub observer: Option<Arc<dyn crate::embed::Observer>>,
    /// Replaces the configured reboot request (a simulated reboot).
    pub reboot: Option<crate::embed::RebootHook>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            host: HostPaths::default(),
            notifier: Notifier::disabled(),
            watchdog: None,
            log: None,
            observer: None,
            reboot: None,
        }
    }
}

/// An agent whose configuration, identity and state passed every check.
pub struct Agent {
    config: AgentConfig,
    device: DeviceId,
    tls: Arc<rustls::ClientConfig>,
    core: Core,
    journal: JournalFile,
    outbox: OutboxFile,
    sampler: Sampler,
    options: RunOptions,
    not_after: i64,
    renewal: Option<Renewal>,
}

impl Agent {
    /// Every refusal-to-start check, without touching the network: identity
    /// files, chain, key, validity, CN; state directory and journal.
    pub fn prepare(config: AgentConfig, options: RunOptions) -> Result<Agent, StartError> {
        let provider = edgebind_link::provider();
        // A renewed identity whose install a restart interrupted is
        // finished first (see `renewal`), so what is loaded is one pair.
        if let Err(e) = renewal::resume(
            &config.state.dir,
            &config.identity,
            config.device_id.as_ref(),
        ) {
            warn!(error = %e, "could not finish installing a renewed identity; keeping the one in place");
        }
        let identity = Identity::load(
            &config.identity,
            config.device_id.as_ref(),
            &provider,
            UnixTime::now(),
        )?;
        let tls = edgebind_link::client_config(edgebind_link::ClientAuth {
            chain: Some(identity.chain.clone()),
            key: Some(identity.key.clone_key()),
            ca: std::slice::from_ref(&identity.ca),
            server_name: Some(config.broker.server_name()),
        })?;

        let dir = &config.state.dir;
        let state_err = |source| StartError::State {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(state_err)?;
        // None of these files can stop the agent: whatever a power cut or a
        // bad sector left in them is skipped, counted, logged and reported.
        let mut recovered = Vec::new();
        let (mut journal, records, report) = JournalFile::open(dir).map_err(state_err)?;
        if report.skipped_lines > 0 {
            warn!(
                file = %journal.path().display(),
                skipped = report.skipped_lines,
                "skipped unreadable journal lines (an interrupted write or damaged storage); the other records are intact"
            );
            recovered.push(format!(
                "{}: {} unreadable lines skipped",
                crate::journal::JOURNAL_FILE_NAME,
                report.skipped_lines
            ));
        }
        let settings_path = dir.join(SETTINGS_FILE);
        let saved = match load_saved_settings(&settings_path) {
            Ok(saved) => saved,
            Err(why) => {
                warn!(file = %settings_path.display(), error = %why, "ignoring unreadable saved settings; the configuration file's apply until the fleet sends them again");
                recovered.push(format!(
                    "{SETTINGS_FILE}: unreadable ({why}), defaults in force"
                ));
                None
            }
        };
        let max_bytes = config.state.outbox_max_bytes;
        let (mut outbox, decoded) =
            OutboxFile::open(dir, 4 * max_bytes + 1024 * 1024).map_err(state_err)?;
        if decoded.damaged > 0 {
            warn!(
                file = %outbox.path().display(),
                damaged = decoded.damaged,
                damaged_bytes = decoded.damaged_bytes,
                kept = decoded.records.len(),
                "skipped damaged outbox records; the others are kept"
            );
            recovered.push(format!(
                "{}: {} damaged stretches ({} bytes) skipped, {} records kept",
                crate::outbox::OUTBOX_FILE_NAME,
                decoded.damaged,
                decoded.damaged_bytes,
                decoded.records.len()
            ));
        }
        let outbox_file_bytes = std::fs::metadata(outbox.path())
            .map(|m| m.len())
            .unwrap_or(0);
        if !decoded.records.is_empty() {
            info!(
                records = decoded.records.len(),
                "outbox holds records from before; they go out once connected"
            );
        }
        let start = Start {
            outbox: decoded,
            outbox_file_bytes,
            outbox_max_bytes: max_bytes,
            recovered,
        };

        let agent_version = env!("CARGO_PKG_VERSION").to_owned();
        let boot_id = options.host.boot_id();
        let core_cfg = CoreConfig {
            device: identity.device_id.clone(),
            inventory: options.host.inventory(&agent_version, &boot_id),
            actions: crate::actions::ActionSet::from_config(&config),
            agent_version,
            boot_id,
            defaults: Settings {
                telemetry_interval_s: config.telemetry.interval_s,
                log_level: config.log.level,
            },
        };
        let retention = Retention {
            max_age_s: config.state.journal_max_age_s,
            max_entries: config.state.journal_max_entries,
            // A redelivery needs a live session: keep ids at least twice
            // as long as the broker may keep it.
            protect_s: 2 * u64::from(config.broker.session_expiry_s),
        };
        let (core, startup) = Core::new(
            core_cfg,
            Ledger::new(retention, records),
            journal.lines(),
            saved,
            start,
            now_unix(),
        );
        // Reconciliation records (a reboot that happened) must be durable
        // before anything else; a failure here is a state-dir problem.
        for fx in &startup {
            match fx {
                Effect::Record(e) | Effect::Note(e) => journal.append(e).map_err(state_err)?,
                Effect::Compact(all) => journal.rewrite(all).map_err(state_err)?,
                Effect::Store { queued, frames } => {
                    outbox.append(frames).map_err(state_err)?;
                    observe_result(&options, &identity.device_id, queued);
                }
                Effect::StoreFrames(frames) => outbox.append(frames).map_err(state_err)?,
                Effect::CompactOutbox(bytes) => outbox.rewrite(bytes).map_err(state_err)?,
                _ => {}
            }
        }
        outbox.sync().map_err(state_err)?;
        let sampler = Sampler::new(dir);
        let renewal = config.renewal.enabled.then(|| {
            Renewal::new(
                config.renewal.clone(),
                &config.state.dir,
                &config.identity,
                renewal::current_of(&identity),
            )
        });
        let agent = Agent {
            renewal,
            device: identity.device_id.clone(),
            not_after: identity.not_after,
            tls: Arc::new(tls),
            core,
            journal,
            outbox,
            sampler,
            options,
            config,
        };
        if let Some(log) = &agent.options.log {
            log.set_level(agent.core.settings().log_level);
        }
        Ok(agent)
    }

    pub fn device_id(&self) -> &DeviceId {
        &self.device
    }

    /// Connect and serve until shut down or asked to restart.
    pub async fn run(self, mut shutdown: ShutdownSignal) -> Exit {
        let Agent {
            config,
            device,
            tls,
            core,
            journal,
            outbox,
            sampler,
            options,
            not_after,
            renewal,
        } = self;
        let writer = match StateWriter::spawn(journal, outbox) {
            Ok(w) => w,
            Err(e) => {
                error!(error = %e, "cannot start the state writer thread");
                return Exit::Failed;
            }
        };
        let (reconnect_window, unreadable) = crate::reconnect::Window::load(&config.state.dir);
        if let Some(why) = unreadable {
            warn!(file = crate::reconnect::HINT_FILE, error = %why, "ignoring the remembered reconnect hint; the configured backoff applies until the fleet sends it again");
        }
        let mut this = Running {
            config,
            device,
            home_tls: tls.clone(),
            trial: None,
            renewal,
            tls,
            core,
            writer,
            sampler,
            options,
            not_after,
            throttle: crate::throttle::Pacer::new(std::time::Instant::now()),
            reconnect_window,
        };
        let exit = this.serve(&mut shutdown).await;
        this.writer.finish();
        info!(exit = ?exit, "edgebind-agent stopped");
        exit
    }
}

/// The agent while it runs: the files belong to the writer thread.
struct Running {
    config: AgentConfig,
    device: DeviceId,
    /// The identity the connection presents: the installed one, or a
    /// renewed one on trial.
    tls: Arc<rustls::ClientConfig>,
    /// The installed identity, to fall back on.
    home_tls: Arc<rustls::ClientConfig>,
    renewal: Option<Renewal>,
    /// A renewed identity being tried, and until when.
    trial: Option<(renewal::Trial, Instant)>,
    core: Core,
    writer: StateWriter,
    sampler: Sampler,
    options: RunOptions,
    not_after: i64,
    /// The fleet-wide throttle in force, if any.
    throttle: crate::throttle::Pacer,
    /// The fleet's reconnect window, shared with the network task.
    reconnect_window: crate::reconnect::Window,
}

/// How one connection's serve loop ended.
enum Served {
    Done(Exit),
    /// Connect again with `Running::tls` (a renewed identity on trial, or
    /// back to the installed one).
    Reconnect,
}

impl Running {
    async fn serve(&mut self, shutdown: &mut ShutdownSignal) -> Exit {
        loop {
            match self.serve_connection(shutdown).await {
                Served::Done(exit) => return exit,
                Served::Reconnect => self.core.on_disconnected(),
            }
        }
    }

    /// The renewal's part of a turn: a request due, a trial that ran out.
    fn renewal_turn(&mut self, io: &mut Io) -> bool {
        let now = now_unix() as i64;
        if let Some((_, until)) = &self.trial
            && !io.connected
            && Instant::now() >= *until
        {
            if let Some(r) = &mut self.renewal {
                r.trial_failed(now);
            }
            self.trial = None;
            self.tls = self.home_tls.clone();
            return true;
        }
        if io.connected
            && self.trial.is_none()
            && let Some(r) = &mut self.renewal
            && let Some(o) = r.poll(now)
        {
            io.publish(o, None);
        }
        false
    }

    /// A message on our renewal response topic: maybe a trial to begin.
    fn renewal_response(&mut self, payload: &[u8]) -> bool {
        let Some(r) = &mut self.renewal else {
            return false;
        };
        let renewal::Step::Switch(trial) = r.on_response(payload, now_unix() as i64) else {
            return false;
        };
        let files = crate::config::IdentityConfig {
            ca: self.config.identity.ca.clone(),
            ..trial.files.clone()
        };
        let tls = Identity::load(
            &files,
            Some(&self.device),
            &edgebind_link::provider(),
            UnixTime::now(),
        )
        .map_err(|e| e.to_string())
        .and_then(|id| {
            edgebind_link::client_config(edgebind_link::ClientAuth {
                chain: Some(id.chain.clone()),
                key: Some(id.key.clone_key()),
                ca: std::slice::from_ref(&id.ca),
                server_name: Some(self.config.broker.server_name()),
            })
            .map_err(|e| e.to_string())
        });
        match tls {
            Ok(tls) => {
                info!(serial = %trial.serial, "reconnecting with the renewed identity");
                self.tls = Arc::new(tls);
                let until = Instant::now() + r.trial_timeout();
                self.trial = Some((trial, until));
                true
            }
            Err(e) => {
                warn!(error = %e, "the renewed identity is not usable; keeping the current one");
                r.trial_failed(now_unix() as i64);
                false
            }
        }
    }

    /// Connected: a trial that connected is installed; the fleet is told.
    fn renewal_connected(&mut self, io: &mut Io) -> bool {
        let Some(r) = &mut self.renewal else {
            return false;
        };
        let mut fall_back = false;
        if let Some((trial, _)) = self.trial.take() {
            match r.trial_connected(&trial, now_unix() as i64) {
                Ok(()) => {
                    self.home_tls = self.tls.clone();
                    self.not_after = trial.not_after;
                }
                Err(e) => {
                    error!(error = %e, "cannot install the renewed identity; back to the current one");
                    r.trial_failed(now_unix() as i64);
                    self.tls = self.home_tls.clone();
                    fall_back = true;
                }
            }
        }
        if !fall_back && let Some(o) = r.on_connected() {
            io.publish(o, None);
        }
        fall_back
    }

    async fn serve_connection(&mut self, shutdown: &mut ShutdownSignal) -> Served {
        let (client, eventloop) = AsyncClient::new(
            mqtt_options(&self.config, &self.device, &self.core, &self.tls),
            REQUEST_CHANNEL_CAPACITY,
        );
        let (net_tx, mut net_rx) = mpsc::unbounded_channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let b = &self.config.broker;
        let backoff = Backoff::new(
            Duration::from_millis(b.reconnect_min_ms),
            Duration::from_secs(b.reconnect_max_s),
        );
        let tags: Tags = Arc::default();
        let network = tokio::spawn(network_task(
            eventloop,
            backoff,
            self.reconnect_window.clone(),
            net_tx,
            stopping.clone(),
            tags.clone(),
        ));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let mut io = Io {
            client,
            backlog: VecDeque::new(),
            tags,
            acks: Vec::new(),
            connected: false,
            done_tx,
            restart: false,
            reconnect: false,
            expired: false,
            expired_logged: false,
        };

        let days_left = (self.not_after - now_unix() as i64) / 86_400;
        info!(
            device = %self.device,
            broker = %format!("{}:{}", b.host, b.port),
            server_name = b.server_name(),
            state_dir = %self.config.state.dir.display(),
            certificate_days_left = days_left,
            "edgebind-agent {} starting",
            env!("CARGO_PKG_VERSION")
        );
        if days_left < EXPIRY_WARNING_DAYS {
            warn!(
                device = %self.device,
                certificate_days_left = days_left,
                "the device certificate expires soon; issue a new identity bundle"
            );
        }
        self.options
            .notifier
            .notify("READY=1\nSTATUS=identity checked; connecting to broker");

        let mut period = self.core.settings().telemetry_interval_s;
        // The first sample soon after start (CPU use needs two readings a
        // moment apart), then every period.
        let mut telemetry =
            telemetry_timer(period, FIRST_TELEMETRY.min(Duration::from_secs(period)));
        let mut watchdog = self
            .options
            .watchdog
            .map(|d| tokio::time::interval(d.max(Duration::from_millis(100))));

        let mut reconnect = false;
        let mut renewal_tick = tokio::time::interval(Duration::from_secs(1));
        renewal_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let exit = loop {
            io.flush_backlog();
            self.send_outbox(&mut io);
            // What this turn produced goes to the writer thread in one go.
            self.writer.flush();
            let lazy = self.writer.has_pending();
            let paced = self.paced_wait(&io);
            tokio::select! {
                _ = tokio::time::sleep(crate::writer::LAZY_FLUSH), if lazy => {
                    self.writer.flush_all();
                }
                _ = tokio::time::sleep(paced.unwrap_or_default()), if paced.is_some() => {}
                changed = shutdown.0.changed() => {
                    if changed.is_err() || *shutdown.0.borrow() {
                        break Exit::Stopped;
                    }
                }
                event = net_rx.recv() => {
                    let Some(event) = event else {
                        error!("the network task ended unexpectedly");
                        break Exit::Failed;
                    };
                    self.on_net_event(event, &mut io).await;
                    // PUBACKs come in bursts: take what is already there in
                    // the same turn.
                    while let Ok(event) = net_rx.try_recv() {
                        self.on_net_event(event, &mut io).await;
                    }
                }
                Some((id, outcome)) = done_rx.recv() => {
                    let fx = self.core.on_action_done(&id, outcome, now_unix());
                    self.execute(fx, &mut io).await;
                }
                _ = telemetry.tick() => {
                    // Connected or not: samples taken offline wait in the
                    // outbox.
                    let now = now_unix();
                    let sample = self.sampler.sample(now);
                    let fx = self.core.telemetry(&sample, now);
                    self.execute(fx, &mut io).await;
                    if let Some(obs) = &self.options.observer {
                        obs.telemetry(&self.device);
                    }
                }
                _ = async { watchdog.as_mut().unwrap().tick().await }, if watchdog.is_some() => {
                    self.options.notifier.notify("WATCHDOG=1");
                }
                _ = renewal_tick.tick(), if self.renewal.is_some() => {
                    if self.renewal_turn(&mut io) {
                        reconnect = true;
                    }
                }
            }
            if io.restart {
                break Exit::RestartRequested;
            }
            if io.expired {
                break Exit::IdentityExpired;
            }
            if reconnect || io.reconnect {
                break Exit::Stopped;
            }
            let wanted = self
                .throttle
                .telemetry_interval_s(self.core.settings().telemetry_interval_s, now_unix());
            if wanted != period {
                info!(interval_s = wanted, "telemetry period changed");
                period = wanted;
                telemetry = telemetry_timer(period, Duration::from_secs(period));
            }
        };

        // Clean stop: retained `offline`, then DISCONNECT (so the broker
        // does not also fire the will), then leave.
        self.options.notifier.notify("STOPPING=1\nSTATUS=stopping");
        // Acknowledge what was recorded (restart-agent's own command among
        // them), or the broker delivers it again after the restart.
        self.writer.flush_all();
        let acks = std::mem::take(&mut io.acks);
        let _ = tokio::time::timeout(STOP_GRACE / 2, async {
            for h in acks {
                let _ = h.await;
            }
        })
        .await;
        io.flush_backlog();
        if io.connected {
            self.drain_outbox(&mut io, &mut net_rx).await;
            io.publish(self.core.offline_status(Some(now_unix())), None);
            io.flush_backlog();
        }
        stopping.store(true, Ordering::SeqCst);
        if io.connected {
            let _ = io.client.try_disconnect();
            if tokio::time::timeout(STOP_GRACE, network).await.is_err() {
                warn!("broker did not confirm the disconnect in time; leaving anyway");
            }
        } else {
            // Nothing to say goodbye to (the will has fired or will fire);
            // don't wait out a reconnect backoff.
            network.abort();
        }
        if reconnect || io.reconnect {
            Served::Reconnect
        } else {
            Served::Done(exit)
        }
    }

    /// A connection attempt failed: if the certificate has expired, hand
    /// over to the claim identity, or say what the way back is.
    fn on_failed_connect(&self, io: &mut Io) {
        use crate::claim::AfterFailedConnect as A;
        match crate::claim::after_failed_connect(&self.config, self.not_after, now_unix() as i64) {
            A::Retry => {}
            A::Reprovision => {
                warn!(device = %self.device, expired_at = %crate::identity::rfc3339(self.not_after), "the device certificate has expired: re-provisioning through the claim identity");
                io.expired = true;
            }
            A::NoWayBack if !io.expired_logged => {
                error!(device = %self.device, expired_at = %crate::identity::rfc3339(self.not_after), "the device certificate has expired and this device has no claim identity: `edgebind device reissue {}` is the way back", self.device);
                io.expired_logged = true;
            }
            A::NoWayBack => {}
        }
    }

    /// Tell the embedder's observer which kind of record the broker took.
    fn observe_delivered(&self, seq: u64) {
        if let Some(obs) = &self.options.observer
            && let Some(r) = self.core.outbox().records().find(|r| r.seq == seq)
        {
            obs.delivered(&self.device, r.class);
        }
    }

    /// Hand the connection what the outbox may send now (at the throttle's
    /// pace while one is in force).
    fn send_outbox(&mut self, io: &mut Io) {
        if io.connected {
            let now = now_unix();
            let window = self
                .throttle
                .allowance(OUTBOX_WINDOW, std::time::Instant::now(), now);
            let sendable = self.core.take_sendable(window);
            self.throttle.spent(sendable.len(), now);
            for (seq, o) in sendable {
                io.publish(o, Some(seq));
            }
        }
    }

    /// While throttled with records waiting: when the next one may go.
    fn paced_wait(&self, io: &Io) -> Option<Duration> {
        let q = self.core.outbox();
        if !io.connected || q.len() <= q.in_flight() {
            return None;
        }
        self.throttle
            .next_send_in(std::time::Instant::now(), now_unix())
    }

    /// A message on the reconnect-hint topic: the new window is in force at
    /// once and remembered for the next start; acknowledged at once (it is
    /// retained).
    fn on_reconnect_hint(&mut self, publish: &Publish, io: &Io) {
        use crate::reconnect::{Change, HINT_FILE};
        let path = self.config.state.dir.join(HINT_FILE);
        match self.reconnect_window.on_message(&publish.payload) {
            Ok(Change::Set { window_s, persist }) => {
                info!(
                    window_s,
                    "reconnect window from the fleet: retries spread over it"
                );
                self.writer.settings(path, persist);
            }
            Ok(Change::Withdrawn) => {
                info!("the fleet withdrew its reconnect window: configured backoff");
                self.writer.settings(path, Vec::new());
            }
            Ok(Change::Unchanged) => {}
            Err(e) => warn!(error = %e, "ignoring an invalid reconnect hint"),
        }
        if let Err(e) = io.client.try_ack(publish) {
            warn!(error = %e, "could not queue the acknowledgement");
        }
    }

    /// A message on the fleet-wide throttle topic; acknowledged at once (it
    /// is retained: the broker has it anyway).
    fn on_throttle(&mut self, publish: &Publish, io: &Io) {
        use crate::throttle::Change;
        match self
            .throttle
            .on_message(&publish.payload, std::time::Instant::now())
        {
            Ok(Change::Engaged {
                min_interval_s,
                outbox_per_s,
            }) => warn!(
                min_telemetry_interval_s = min_interval_s,
                outbox_per_s,
                "the fleet is throttled: slowing down (unsent data stays in the outbox)"
            ),
            Ok(Change::Lifted) => info!("the fleet throttle is lifted"),
            Ok(Change::Unchanged) => {}
            Err(e) => warn!(error = %e, "ignoring an invalid throttle message"),
        }
        if let Err(e) = io.client.try_ack(publish) {
            warn!(error = %e, "could not queue the acknowledgement");
        }
    }

    /// Before a clean stop: a short while for what the outbox holds to be
    /// acknowledged (what is left goes out after the next start).
    async fn drain_outbox(&mut self, io: &mut Io, net_rx: &mut mpsc::UnboundedReceiver<NetEvent>) {
        let deadline = Instant::now() + STOP_GRACE / 2;
        while io.connected && !self.core.outbox().is_empty() {
            for (seq, o) in self.core.take_sendable(OUTBOX_WINDOW) {
                io.publish(o, Some(seq));
            }
            io.flush_backlog();
            self.writer.flush_all();
            match tokio::time::timeout_at(deadline, net_rx.recv()).await {
                Ok(Some(NetEvent::Delivered(seq))) => {
                    self.observe_delivered(seq);
                    let fx = self.core.on_delivered(seq, now_unix());
                    self.execute(fx, io).await;
                }
                Ok(Some(NetEvent::Lost { .. })) | Ok(None) | Err(_) => break,
                Ok(Some(_)) => {}
            }
        }
    }

    async fn on_net_event(&mut self, event: NetEvent, io: &mut Io) {
        match event {
            NetEvent::Connected { session_present } => {
                io.connected = true;
                let b = &self.config.broker;
                info!(
                    broker = %format!("{}:{}", b.host, b.port),
                    session_present,
                    "connected to broker"
                );
                self.options.notifier.notify("STATUS=connected to broker");
                if let Some(obs) = &self.options.observer {
                    obs.connected(&self.device);
                }
                let uptime = self.options.host.uptime_s();
                let addresses = self.sampler.addresses();
                let fx = self.core.on_connected(uptime, addresses, now_unix());
                self.execute(fx, io).await;
                if self.renewal_connected(io) {
                    io.reconnect = true;
                    return;
                }
                let renewal_topic = self.renewal.as_ref().map(Renewal::response_topic);
                let subs = self
                    .core
                    .subscriptions()
                    .into_iter()
                    .chain(renewal_topic)
                    .chain([
                        edgebind_protocol::throttle::TOPIC.to_owned(),
                        edgebind_protocol::reconnect::TOPIC.to_owned(),
                    ])
                    .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(f, QoS::AtLeastOnce));
                if let Err(e) = io.client.try_subscribe_many(subs) {
                    warn!(error = %e, "could not queue the subscriptions");
                }
            }
            NetEvent::Message(publish)
                if self
                    .renewal
                    .as_ref()
                    .is_some_and(|r| publish.topic == r.response_topic().as_bytes()) =>
            {
                if self.renewal_response(&publish.payload) {
                    io.reconnect = true;
                }
                if let Err(e) = io.client.try_ack(&publish) {
                    warn!(error = %e, "could not queue the acknowledgement");
                }
            }
            NetEvent::Message(publish)
                if publish.topic == edgebind_protocol::throttle::TOPIC.as_bytes() =>
            {
                self.on_throttle(&publish, io);
            }
            NetEvent::Message(publish)
                if publish.topic == edgebind_protocol::reconnect::TOPIC.as_bytes() =>
            {
                self.on_reconnect_hint(&publish, io);
            }
            NetEvent::Message(publish) => {
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                debug!(topic = %topic, bytes = publish.payload.len(), "message received");
                let fx = self.core.on_message(&topic, &publish.payload, now_unix());
                self.execute(fx, io).await;
                // The answers go first: waking the writer thread now could
                // preempt this one before the network task has written them.
                self.send_outbox(io);
                tokio::task::yield_now().await;
                // Only once the id is recorded may the broker forget the
                // message. Waited for on the side, so that a slow card holds
                // up this acknowledgement, not the main loop (watchdog,
                // telemetry, other commands).
                let recorded = self.writer.barrier();
                let client = io.client.clone();
                io.acks.retain(|h| !h.is_finished());
                io.acks.push(tokio::spawn(async move {
                    recorded.await;
                    if let Err(e) = client.try_ack(&publish) {
                        warn!(error = %e, "could not queue the acknowledgement");
                    }
                }));
            }
            NetEvent::Lost { error, retry_in } => {
                if io.connected {
                    warn!(%error, retry_in_ms = retry_in.as_millis() as u64, "connection to broker lost: {error}");
                } else {
                    warn!(%error, retry_in_ms = retry_in.as_millis() as u64, "cannot connect to broker: {error}");
                    self.on_failed_connect(io);
                }
                if let Some(obs) = &self.options.observer {
                    obs.lost(&self.device, io.connected, &error);
                }
                io.connected = false;
                self.core.on_disconnected();
                self.options
                    .notifier
                    .notify(&format!("STATUS=disconnected: {error}"));
            }
            NetEvent::Delivered(seq) => {
                self.observe_delivered(seq);
                let fx = self.core.on_delivered(seq, now_unix());
                self.execute(fx, io).await;
            }
            NetEvent::ServerDisconnect(reason) => {
                warn!(reason = %reason, "broker closed the session");
            }
            NetEvent::PublishRefused { pkid, reason } => {
                warn!(pkid, reason = %reason, "broker refused a publication (ACL or size?)");
            }
            NetEvent::SubscribeRefused(reason) => {
                error!(reason = %reason, "broker refused a subscription; commands will not arrive");
            }
        }
    }

    /// Carry out effects in order; a failed journal write stops the batch so
    /// nothing runs whose id is not on disk.
    async fn execute(&mut self, effects: Vec<Effect>, io: &mut Io) {
        for fx in effects {
            match fx {
                // Handed to the writer in order; the command's ack waits for
                // it (see on_net_event).
                Effect::Note(entry) => self.writer.note(entry),
                Effect::Record(entry) => {
                    // Awaited (the keep-alive runs meanwhile): nothing after
                    // this record, the action included, may happen before it
                    // is on stable storage.
                    if let Err(e) = self.writer.journal(entry.clone(), true).await {
                        error!(
                            id = %entry.id,
                            file = crate::journal::JOURNAL_FILE_NAME,
                            error = %e,
                            "cannot record command id; not running it"
                        );
                        let fx = self
                            .core
                            .on_record_failed(&entry.id, &e.to_string(), now_unix());
                        for f in fx {
                            if let Effect::Store { frames, .. } = f {
                                self.writer.outbox(frames);
                            }
                        }
                        return;
                    }
                }
                Effect::Compact(entries) => self.writer.compact_journal(entries),
                Effect::Store { queued, frames } => {
                    if queued.class == Some(crate::outbox::Class::Result) {
                        info!(topic = %queued.topic, result = %String::from_utf8_lossy(&queued.payload), "command result");
                    }
                    observe_result(&self.options, &self.device, &queued);
                    self.writer.outbox(frames);
                }
                Effect::StoreFrames(frames) => self.writer.outbox_lazy(frames),
                Effect::CompactOutbox(bytes) => self.writer.rewrite_outbox(bytes),
                Effect::Publish(o) => io.publish(o, None),
                Effect::Run { id, job } => {
                    if job == crate::actions::Job::Renew
                        && let Some(r) = &mut self.renewal
                    {
                        r.force(now_unix() as i64);
                    }
                    let tx = io.done_tx.clone();
                    info!(id = %id, job = ?job, "running action");
                    if let (crate::actions::Job::Reboot(_), Some(hook)) =
                        (&job, &self.options.reboot)
                    {
                        let outcome = match hook(&self.device, &id) {
                            Ok(()) => crate::actions::JobOutcome::succeeded(None),
                            Err(why) => crate::actions::JobOutcome::failed(why),
                        };
                        let _ = tx.send((id, outcome));
                        continue;
                    }
                    tokio::spawn(async move {
                        let outcome = job.run(&id).await;
                        let _ = tx.send((id, outcome));
                    });
                }
                Effect::Apply(settings) => {
                    info!(
                        telemetry_interval_s = settings.telemetry_interval_s,
                        log_level = %settings.log_level,
                        "settings in force"
                    );
                    if let Some(log) = &self.options.log {
                        log.set_level(settings.log_level);
                    }
                }
                Effect::SaveSettings(saved) => {
                    let path = self.config.state.dir.join(SETTINGS_FILE);
                    let bytes = serde_json::to_vec_pretty(&saved).unwrap_or_default();
                    self.writer.settings(path, bytes);
                }
                Effect::Restart => {
                    info!(
                        exit_code = RESTART_EXIT_CODE,
                        "restart-agent: leaving so that systemd starts the agent again"
                    );
                    io.restart = true;
                }
            }
        }
    }
}

/// Tell the embedder's observer about a command result going out.
fn observe_result(options: &RunOptions, device: &DeviceId, queued: &Outgoing) {
    if let Some(obs) = &options.observer
        && queued.class == Some(crate::outbox::Class::Result)
        && let Ok(r) =
            serde_json::from_slice::<edgebind_protocol::messages::CommandResult>(&queued.payload)
    {
        obs.result(device, &r.id, r.status);
    }
}

fn mqtt_options(
    config: &AgentConfig,
    device: &DeviceId,
    core: &Core,
    tls: &Arc<rustls::ClientConfig>,
) -> MqttOptions {
    let b = &config.broker;
    let endpoint = edgebind_link::BrokerEndpoint {
        host: b.host.clone(),
        port: b.port,
    };
    let mut o = edgebind_link::options(device.as_str(), &endpoint, tls.clone(), b.keep_alive());
    let will = core.offline_status(None);
    o.set_clean_start(false)
        .set_session_expiry_interval(Some(b.session_expiry_s))
        // Ack a command only after its id is recorded.
        .set_manual_acks(true)
        // rumqttc preallocates one slot per possible in-flight packet id
        // (65535 by default: ~10 MiB); Mosquitto allows 20 anyway.
        .set_outgoing_inflight_upper_limit(MAX_INFLIGHT)
        .set_last_will(LastWill::new(
            will.topic,
            will.payload,
            QoS::AtLeastOnce,
            true,
            None,
        ));
    o
}

fn telemetry_timer(period_s: u64, first: Duration) -> tokio::time::Interval {
    let period = Duration::from_secs(period_s.max(1));
    let mut t = tokio::time::interval_at(Instant::now() + first, period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

/// The saved desired state: `Ok(None)` when there is none, `Err(why)` when
/// the file is there but unusable (never a reason not to start).
pub fn load_saved_settings(path: &Path) -> Result<Option<SavedSettings>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    match std::fs::File::open(path) {
        Ok(f) => {
            f.take(MAX_SETTINGS_READ)
                .read_to_end(&mut bytes)
                .map_err(|e| e.to_string())?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Tags of QoS 1 publications handed to rumqttc and not yet given a packet
/// id, in request order (see the module documentation).
type Tags = Arc<Mutex<VecDeque<Option<u64>>>>;

/// The main loop's handle on the connection.
struct Io {
    client: AsyncClient,
    /// Publications that did not fit in the request channel yet, with their
    /// outbox sequence numbers.
    backlog: VecDeque<(Outgoing, Option<u64>)>,
    tags: Tags,
    /// Acknowledgements of commands waiting for their journal records.
    acks: Vec<tokio::task::JoinHandle<()>>,
    connected: bool,
    done_tx: mpsc::UnboundedSender<(edgebind_protocol::CommandId, crate::actions::JobOutcome)>,
    restart: bool,
    /// Connect again with another identity (renewal).
    reconnect: bool,
    /// The certificate expired and the claim identity can replace it.
    expired: bool,
    /// "No way back" was logged for this connection already.
    expired_logged: bool,
}

impl Io {
    fn publish(&mut self, o: Outgoing, seq: Option<u64>) {
        self.backlog.push_back((o, seq));
        self.flush_backlog();
    }

    fn flush_backlog(&mut self) {
        while let Some((o, seq)) = self.backlog.pop_front() {
            let qos = match o.qos {
                Qos::AtMostOnce => QoS::AtMostOnce,
                Qos::AtLeastOnce => QoS::AtLeastOnce,
            };
            let tagged = qos == QoS::AtLeastOnce;
            let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
            if tagged {
                tags.push_back(seq);
            }
            if let Err(e) =
                self.client
                    .try_publish(o.topic.clone(), qos, o.retain, o.payload.clone())
            {
                if tagged {
                    tags.pop_back();
                }
                debug!(error = %e, "request channel full; publication kept for later");
                self.backlog.push_front((o, seq));
                break;
            }
        }
    }
}

/// What the network task reports.
#[derive(Debug)]
enum NetEvent {
    Connected {
        session_present: bool,
    },
    Message(Publish),
    Lost {
        error: String,
        retry_in: Duration,
    },
    ServerDisconnect(String),
    PublishRefused {
        pkid: u16,
        reason: String,
    },
    /// The broker acknowledged outbox record `seq`.
    Delivered(u64),
    SubscribeRefused(String),
}

/// Owns the event loop: polls it, reports events, and reconnects with
/// backoff. Ends after a DISCONNECT once `stopping` is set.
async fn network_task(
    mut eventloop: EventLoop,
    mut backoff: Backoff,
    window: crate::reconnect::Window,
    tx: mpsc::UnboundedSender<NetEvent>,
    stopping: Arc<AtomicBool>,
    tags: Tags,
) {
    let mut connected_at: Option<Instant> = None;
    let mut pkids = PkidTags::default();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(packet)) => {
                if let Packet::PubAck(ack) = &packet
                    && let Some(seq) = pkids.acked(ack.pkid)
                    && tx.send(NetEvent::Delivered(seq)).is_err()
                {
                    return;
                }
                let ev = match packet {
                    Packet::ConnAck(ack) => {
                        connected_at = Some(Instant::now());
                        Some(NetEvent::Connected {
                            session_present: ack.session_present,
                        })
                    }
                    Packet::Publish(p) => Some(NetEvent::Message(p)),
                    Packet::PubAck(ack)
                        if !matches!(
                            ack.reason,
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                        ) =>
                    {
                        Some(NetEvent::PublishRefused {
                            pkid: ack.pkid,
                            reason: format!("{:?}", ack.reason),
                        })
                    }
                    Packet::SubAck(ack) => {
                        use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as R;
                        let bad: Vec<String> = ack
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, R::Success(_)))
                            .map(|c| format!("{c:?}"))
                            .collect();
                        (!bad.is_empty()).then(|| NetEvent::SubscribeRefused(bad.join(", ")))
                    }
                    Packet::Disconnect(d) => Some(NetEvent::ServerDisconnect(format!(
                        "{:?}{}",
                        d.reason_code,
                        d.properties
                            .and_then(|p| p.reason_string)
                            .map(|s| format!(": {s}"))
                            .unwrap_or_default()
                    ))),
                    _ => None,
                };
                if let Some(ev) = ev
                    && tx.send(ev).is_err()
                {
                    return;
                }
            }
            Ok(Event::Outgoing(MqttOutgoing::Publish(pkid))) if pkid != 0 => {
                pkids.sent(pkid, || {
                    tags.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pop_front()
                        .flatten()
                });
            }
            Ok(Event::Outgoing(MqttOutgoing::AwaitAck(pkid))) => {
                let tag = tags
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop_front()
                    .flatten();
                pkids.collided(pkid, tag);
            }
            Ok(Event::Outgoing(_)) => {}
            Err(e) => {
                if stopping.load(Ordering::SeqCst) || matches!(e, ConnectionError::RequestsDone) {
                    return;
                }
                if connected_at.is_some_and(|t| t.elapsed() >= STABLE_CONNECTION) {
                    backoff.reset();
                }
                connected_at = None;
                let retry_in = backoff.next_delay_in(window.get());
                if tx
                    .send(NetEvent::Lost {
                        error: describe(&e),
                        retry_in,
                    })
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

/// Which outbox record each packet id in flight carries.
#[derive(Debug, Default)]
struct PkidTags {
    in_flight: HashMap<u16, Option<u64>>,
    /// rumqttc held back a publication whose pkid was still in use; it sends
    /// it (as `Outgoing::Publish`) once that pkid is acknowledged.
    held: Vec<(u16, Option<u64>)>,
}

impl PkidTags {
    fn sent(&mut self, pkid: u16, next_tag: impl FnOnce() -> Option<u64>) {
        if self.in_flight.contains_key(&pkid) {
            return; // a retransmission after a reconnect
        }
        let tag = match self.held.iter().position(|(p, _)| *p == pkid) {
            Some(i) => self.held.remove(i).1,
            None => next_tag(),
        };
        self.in_flight.insert(pkid, tag);
    }

    fn collided(&mut self, pkid: u16, tag: Option<u64>) {
        self.held.push((pkid, tag));
    }

    fn acked(&mut self, pkid: u16) -> Option<u64> {
        self.in_flight.remove(&pkid).flatten()
    }
}

/// A connection error in words a field engineer can act on.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection ({code:?})")
        }
        ConnectionError::Timeout(_) => "connection attempt timed out".into(),
        other => other.to_string(),
    }
}

/// `Agent::run` must be spawnable on a multi-threaded runtime (the fleet
/// tests run hundreds of agents in one process): checked at compile time.
#[allow(dead_code)]
fn run_future_is_send(agent: Agent, signal: ShutdownSignal) {
    fn is_send<T: Send>(_: &T) {}
    is_send(&agent.run(signal));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_bytes_as_saved_settings_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(SETTINGS_FILE);
            std::fs::write(&path, &bytes).unwrap();
            // Ok or Err, never a panic; prepare() turns Err into defaults.
            let _ = load_saved_settings(&path);
        }
    }

    #[test]
    fn pkid_tags_follow_request_order_retransmissions_and_collisions() {
        let mut t = PkidTags::default();
        let mut fifo: VecDeque<Option<u64>> = [Some(10), None, Some(11), Some(12)].into();
        let mut next = || fifo.pop_front().flatten();
        t.sent(1, &mut next);
        t.sent(2, &mut next); // a status message: no tag
        t.sent(1, || panic!("a retransmission takes no new tag"));
        t.collided(3, Some(11)); // pkid 3 still in use: held back
        assert_eq!(t.acked(1), Some(10));
        assert_eq!(t.acked(2), None);
        t.sent(3, || panic!("the held publication keeps its tag"));
        assert_eq!(t.acked(3), Some(11));
        t.sent(4, || Some(12));
        assert_eq!(t.acked(4), Some(12));
        assert_eq!(t.acked(4), None);
    }
}
