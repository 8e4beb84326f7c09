//! The thin I/O shell around [`Core`]: MQTT connection, timers, journal
//! file, reboot requests, systemd notifications.
//!
//! Two tasks: the *network* task owns rumqttc's event loop (so that no timer
//! in the main loop ever cancels a half-written packet) and handles
//! reconnects with capped, fully jittered exponential backoff; the *main*
//! loop feeds what arrives to the core and carries out the effects in order.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::{Action, MAX_PACKET_BYTES, now_unix};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PubAckReason, Publish};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{NetworkOptions, TlsConfiguration, Transport};
use rustls::pki_types::UnixTime;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::{AgentConfig, ConfigError};
use crate::core::{Core, CoreConfig, Effect, Outgoing, Qos, SavedSettings, Settings};
use crate::host::HostPaths;
use crate::identity::{Identity, IdentityError};
use crate::journal::{JournalFile, Ledger, Retention, write_atomically};
use crate::logging::LogControl;
use crate::systemd::Notifier;
use crate::telemetry::Sampler;
use crate::tls::TlsError;

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
/// Room for results queued while the connection is down.
const REQUEST_CHANNEL_CAPACITY: usize = 256;

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
}

impl Exit {
    pub fn code(self) -> i32 {
        match self {
            Exit::Stopped => 0,
            Exit::RestartRequested => RESTART_EXIT_CODE,
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
#[derive(Debug)]
pub struct ShutdownSignal(watch::Receiver<bool>);

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
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            host: HostPaths::default(),
            notifier: Notifier::disabled(),
            watchdog: None,
            log: None,
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
    sampler: Sampler,
    options: RunOptions,
    not_after: i64,
}

impl Agent {
    /// Every refusal-to-start check, without touching the network: identity
    /// files, chain, key, validity, CN; state directory and journal.
    pub fn prepare(config: AgentConfig, options: RunOptions) -> Result<Agent, StartError> {
        let provider = crate::tls::provider();
        let identity = Identity::load(
            &config.identity,
            config.device_id.as_ref(),
            &provider,
            UnixTime::now(),
        )?;
        let tls = crate::tls::client_config(&identity, config.broker.server_name(), provider)?;

        let dir = &config.state.dir;
        let state_err = |source| StartError::State {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(state_err)?;
        let (mut journal, records, report) = JournalFile::open(dir).map_err(state_err)?;
        if report.skipped_lines > 0 {
            warn!(
                file = %journal.path().display(),
                skipped = report.skipped_lines,
                "skipped unreadable journal lines (an interrupted write); the records before them are intact"
            );
        }
        let saved = load_saved_settings(&dir.join(SETTINGS_FILE));

        let agent_version = env!("CARGO_PKG_VERSION").to_owned();
        let boot_id = options.host.boot_id();
        let core_cfg = CoreConfig {
            device: identity.device_id.clone(),
            inventory: options.host.inventory(&agent_version, &boot_id),
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
            now_unix(),
        );
        // Reconciliation records (a reboot that happened) must be durable
        // before anything else; a failure here is a state-dir problem.
        for fx in &startup {
            match fx {
                Effect::Record(e) | Effect::Note(e) => journal.append(e).map_err(state_err)?,
                Effect::Compact(all) => journal.rewrite(all).map_err(state_err)?,
                _ => {}
            }
        }
        let sampler = Sampler::new(dir);
        let agent = Agent {
            device: identity.device_id.clone(),
            not_after: identity.not_after,
            tls: Arc::new(tls),
            core,
            journal,
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

    fn mqtt_options(&self) -> MqttOptions {
        let b = &self.config.broker;
        let mut o = MqttOptions::new(self.device.as_str(), b.host.clone(), b.port);
        let will = self.core.offline_status(None);
        o.set_keep_alive(b.keep_alive())
            .set_clean_start(false)
            .set_session_expiry_interval(Some(b.session_expiry_s))
            // Also the incoming limit: larger commands reach the core and are
            // rejected there; the broker drops anything above this for us.
            .set_max_packet_size(Some(MAX_PACKET_BYTES as u32))
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
            ))
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                self.tls.clone(),
            )));
        let mut net = NetworkOptions::new();
        // Without it every QoS 1 round trip and TLS connect waits ~40 ms
        // for Nagle + delayed ACK.
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(10);
        o.set_network_options(net);
        o
    }

    /// Connect and serve until shut down or asked to restart.
    pub async fn run(mut self, mut shutdown: ShutdownSignal) -> Exit {
        let (client, eventloop) = AsyncClient::new(self.mqtt_options(), REQUEST_CHANNEL_CAPACITY);
        let (net_tx, mut net_rx) = mpsc::unbounded_channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let b = &self.config.broker;
        let backoff = Backoff::new(
            Duration::from_millis(b.reconnect_min_ms),
            Duration::from_secs(b.reconnect_max_s),
        );
        let network = tokio::spawn(network_task(eventloop, backoff, net_tx, stopping.clone()));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let mut io = Io {
            client,
            backlog: VecDeque::new(),
            connected: false,
            done_tx,
            restart: false,
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

        let exit = loop {
            io.flush_backlog();
            tokio::select! {
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
                    self.on_net_event(event, &mut io);
                }
                Some((id, outcome)) = done_rx.recv() => {
                    let fx = self.core.on_action_done(&id, outcome, now_unix());
                    self.execute(fx, &mut io);
                }
                _ = telemetry.tick() => {
                    if io.connected {
                        let sample = self.sampler.sample(now_unix());
                        io.publish(self.core.telemetry(&sample));
                    }
                }
                _ = async { watchdog.as_mut().unwrap().tick().await }, if watchdog.is_some() => {
                    self.options.notifier.notify("WATCHDOG=1");
                }
            }
            if io.restart {
                break Exit::RestartRequested;
            }
            let wanted = self.core.settings().telemetry_interval_s;
            if wanted != period {
                info!(interval_s = wanted, "telemetry period changed");
                period = wanted;
                telemetry = telemetry_timer(period, Duration::from_secs(period));
            }
        };

        // Clean stop: retained `offline`, then DISCONNECT (so the broker
        // does not also fire the will), then leave.
        self.options.notifier.notify("STOPPING=1\nSTATUS=stopping");
        io.flush_backlog();
        if io.connected {
            io.publish(self.core.offline_status(Some(now_unix())));
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
        info!(exit = ?exit, "edgebind-agent stopped");
        exit
    }

    fn on_net_event(&mut self, event: NetEvent, io: &mut Io) {
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
                let uptime = self.options.host.uptime_s();
                let addresses = self.sampler.addresses();
                let fx = self.core.on_connected(uptime, addresses, now_unix());
                self.execute(fx, io);
                let subs = self
                    .core
                    .subscriptions()
                    .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(f, QoS::AtLeastOnce));
                if let Err(e) = io.client.try_subscribe_many(subs) {
                    warn!(error = %e, "could not queue the subscriptions");
                }
            }
            NetEvent::Message(publish) => {
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                debug!(topic = %topic, bytes = publish.payload.len(), "message received");
                let fx = self.core.on_message(&topic, &publish.payload, now_unix());
                self.execute(fx, io);
                // Only now, with the id durably recorded, tell the broker it
                // may forget the message.
                if let Err(e) = io.client.try_ack(&publish) {
                    warn!(error = %e, "could not queue the acknowledgement");
                }
            }
            NetEvent::Lost { error, retry_in } => {
                if io.connected {
                    warn!(%error, retry_in_ms = retry_in.as_millis() as u64, "connection to broker lost: {error}");
                } else {
                    warn!(%error, retry_in_ms = retry_in.as_millis() as u64, "cannot connect to broker: {error}");
                }
                io.connected = false;
                self.options
                    .notifier
                    .notify(&format!("STATUS=disconnected: {error}"));
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
    fn execute(&mut self, effects: Vec<Effect>, io: &mut Io) {
        for fx in effects {
            let durable = matches!(fx, Effect::Record(_));
            match fx {
                Effect::Record(entry) | Effect::Note(entry) => {
                    let written = if durable {
                        self.journal.append(&entry)
                    } else {
                        self.journal.append_unsynced(&entry)
                    };
                    if let Err(e) = written {
                        error!(
                            id = %entry.id,
                            file = %self.journal.path().display(),
                            error = %e,
                            "cannot record command id; not running it"
                        );
                        let fx = self
                            .core
                            .on_record_failed(&entry.id, &e.to_string(), now_unix());
                        for f in fx {
                            if let Effect::Publish(o) = f {
                                io.publish(o);
                            }
                        }
                        return;
                    }
                }
                Effect::Compact(entries) => {
                    if let Err(e) = self.journal.rewrite(&entries) {
                        warn!(file = %self.journal.path().display(), error = %e, "journal compaction failed; appending to the old file");
                    }
                }
                Effect::Publish(o) => {
                    if o.topic.contains("/cmd-result/") {
                        info!(topic = %o.topic, result = %String::from_utf8_lossy(&o.payload), "command result");
                    }
                    io.publish(o);
                }
                Effect::Run { id, action } => {
                    let tx = io.done_tx.clone();
                    let reboot = self.config.actions.reboot.clone();
                    info!(id = %id, action = %action, "running action");
                    tokio::spawn(async move {
                        let outcome = match action {
                            Action::Reboot => crate::actions::reboot(&reboot, &id).await,
                            other => Err(format!("action {other} has no side effect to run")),
                        };
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
                    if let Err(e) = write_atomically(&path, &bytes) {
                        warn!(file = %path.display(), error = %e, "cannot save applied settings; they hold until restart");
                    }
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

fn telemetry_timer(period_s: u64, first: Duration) -> tokio::time::Interval {
    let period = Duration::from_secs(period_s.max(1));
    let mut t = tokio::time::interval_at(Instant::now() + first, period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

fn load_saved_settings(path: &Path) -> Option<SavedSettings> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "ignoring unreadable saved settings");
            None
        }
    }
}

/// The main loop's handle on the connection.
struct Io {
    client: AsyncClient,
    /// Publications that did not fit in the request channel yet.
    backlog: VecDeque<Outgoing>,
    connected: bool,
    done_tx: mpsc::UnboundedSender<(edgebind_protocol::CommandId, Result<(), String>)>,
    restart: bool,
}

impl Io {
    fn publish(&mut self, o: Outgoing) {
        self.backlog.push_back(o);
        self.flush_backlog();
    }

    fn flush_backlog(&mut self) {
        while let Some(o) = self.backlog.pop_front() {
            let qos = match o.qos {
                Qos::AtMostOnce => QoS::AtMostOnce,
                Qos::AtLeastOnce => QoS::AtLeastOnce,
            };
            if let Err(e) =
                self.client
                    .try_publish(o.topic.clone(), qos, o.retain, o.payload.clone())
            {
                debug!(error = %e, "request channel full; publication kept for later");
                self.backlog.push_front(o);
                break;
            }
        }
    }
}

/// What the network task reports.
#[derive(Debug)]
enum NetEvent {
    Connected { session_present: bool },
    Message(Publish),
    Lost { error: String, retry_in: Duration },
    ServerDisconnect(String),
    PublishRefused { pkid: u16, reason: String },
    SubscribeRefused(String),
}

/// Owns the event loop: polls it, reports events, and reconnects with
/// backoff. Ends after a DISCONNECT once `stopping` is set.
async fn network_task(
    mut eventloop: EventLoop,
    mut backoff: Backoff,
    tx: mpsc::UnboundedSender<NetEvent>,
    stopping: Arc<AtomicBool>,
) {
    let mut connected_at: Option<Instant> = None;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(packet)) => {
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
            Ok(Event::Outgoing(_)) => {}
            Err(e) => {
                if stopping.load(Ordering::SeqCst) || matches!(e, ConnectionError::RequestsDone) {
                    return;
                }
                if connected_at.is_some_and(|t| t.elapsed() >= STABLE_CONNECTION) {
                    backoff.reset();
                }
                connected_at = None;
                let retry_in = backoff.next_delay();
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
