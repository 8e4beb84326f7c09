//! The fleet service: keeps the registry in step with the broker.
//!
//! ```text
//!  broker ──QoS1──> event loop ──channel──> writer thread ──> registry (one transaction per batch)
//!                      ^                         │
//!                      └──── PUBACK after commit ┘
//!                                                └──connected devices──> outbox thread
//!  outbox thread: publishes retained desired settings, queued commands and
//!  on-connect actions, polling the registry (the CLI writes to it directly).
//! ```
//!
//! Durability: the service subscribes with QoS 1 on a persistent MQTT 5
//! session (clean start off, a session that never expires) and acknowledges
//! each message only after the transaction holding it has committed (rumqttc
//! manual acks). A crash or `kill -9` at any point leaves unacknowledged
//! messages with the broker, which re-sends them when the instance
//! reconnects, so nothing acknowledged is lost. Every write is idempotent
//! (see the registry's `apply`): a message written, then delivered again
//! after a crash, changes nothing the second time. While an instance is down
//! the broker queues its share for its session up to Mosquitto's
//! `max_queued_messages`.
//!
//! Scaling out: every instance is a member of one MQTT 5 shared subscription
//! group ([`edgebind_protocol::topics::FLEET_SHARE_GROUP`]), so the broker
//! hands each message to one instance. Each instance has its own service
//! identity (`service:NAME`, the CN is the client id on the broker) and so
//! its own session: Mosquitto keeps queueing a killed instance's share in
//! that session and delivers it when the instance comes back (systemd
//! restarts it), or to whoever drains it with `fleet serve --retire`.
//! What the outbox publishes is claimed in the registry first, so two
//! instances never publish the same command or settings revision.
//!
//! Overload: every instance reads the broker's dropped and stored message
//! counters (`$SYS`, every `sys_interval`), logs drops loudly and records
//! them with its lag in the registry; the instance holding the push-back
//! lease throttles the fleet before the broker's queue for the services
//! fills ([`push_back`]). `--metrics` serves [`metrics::Metrics`].

pub mod metrics;
mod outbox;
pub mod provision;
pub mod push_back;
mod renewal;
mod writer;

pub use renewal::{RenewalCounters, RenewalService};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgebind_protocol::CommandId;
use edgebind_protocol::messages::now_unix;
use edgebind_protocol::topics::{BROKER_COUNTERS, BROKER_DROPPED, BROKER_RETAINED, BROKER_STORED};
use rumqttc::v5::Event;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use tokio::sync::mpsc;

use crate::ingest;
use crate::mqtt::{self, BrokerEndpoint, ClientIdentity, MqttSetupError};
use crate::registry::{self, RegistryError, RegistryUrl, Retention};

/// The name (`service:fleet`) of the first fleet service instance; others
/// are named by `fleet serve --instance NAME`.
pub const SERVICE_NAME: &str = "fleet";

/// Messages the broker may have in flight to one instance (MQTT 5 receive
/// maximum): enough to fill a batch while the previous one commits.
pub const RECEIVE_MAXIMUM: u16 = 2000;

pub struct ServiceConfig {
    /// This instance's service name: its identity is `service:NAME`.
    pub instance: String,
    /// `sqlite:PATH` (or a plain path) or `postgres://…`.
    pub registry: RegistryUrl,
    pub endpoint: BrokerEndpoint,
    pub identity: ClientIdentity,
    pub keep_alive: Duration,
    /// Most messages written in one transaction.
    pub batch_max: usize,
    /// Longest a batch keeps collecting while messages keep arriving.
    pub batch_window: Duration,
    /// How often the registry is polled for desired settings and queued
    /// commands written by the CLI.
    pub poll_interval: Duration,
    /// Ask every device that connects for its inventory.
    pub inventory_on_connect: bool,
    pub retention: Retention,
    /// Answer devices' renewal requests (signing with the home's PKI);
    /// `None`: this instance does not subscribe to them.
    pub renewal: Option<RenewalService>,
    /// Answer claim requests on the provisioning listener ([`provision`]).
    pub provisioning: Option<provision::ProvisionConfig>,
    /// Throttle the fleet when the broker's queue nears the budget (`None`: never).
    pub push_back: Option<push_back::PushBackPolicy>,
    /// Serve Prometheus metrics on this (loopback) listener.
    pub metrics: Option<metrics::MetricsListener>,
    /// The broker's accept rate (connections a second) the fleet's
    /// reconnect window is sized for: the outbox publishes the window for
    /// the registered devices retained on every connect, and again whenever
    /// the registry's count changes it (`None`: this instance leaves the
    /// topic alone).
    pub reconnect_accept_rate: Option<f64>,
}

impl ServiceConfig {
    pub fn new(
        registry: impl Into<RegistryUrl>,
        endpoint: BrokerEndpoint,
        identity: ClientIdentity,
    ) -> Self {
        ServiceConfig {
            instance: SERVICE_NAME.to_owned(),
            registry: registry.into(),
            endpoint,
            identity,
            keep_alive: Duration::from_secs(30),
            batch_max: 5000,
            batch_window: Duration::from_millis(100),
            poll_interval: Duration::from_millis(250),
            inventory_on_connect: true,
            retention: Retention::default(),
            renewal: None,
            provisioning: None,
            push_back: Some(push_back::PushBackPolicy::from_budget(
                &edgebind_broker::Budget::default(),
            )),
            metrics: None,
            reconnect_accept_rate: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Setup(#[from] MqttSetupError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("fleet service: {0}")]
    Internal(String),
}

/// The broker connection: (connected, since when), written by the event
/// loop, recorded in the registry by the outbox thread.
#[derive(Debug, Default)]
pub(crate) struct Link(std::sync::Mutex<(bool, u64)>);

impl Link {
    fn set(&self, connected: bool) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 != connected || g.1 == 0 {
            *g = (connected, now_unix());
        }
    }

    fn get(&self) -> (bool, u64) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counters for logs, tests and the benchmark.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages taken from the broker.
    pub received: AtomicU64,
    /// Messages whose update is committed (and acknowledged).
    pub committed: AtomicU64,
    /// Messages dropped as malformed or from unknown devices (still acknowledged).
    pub dropped: AtomicU64,
    pub batches: AtomicU64,
    /// Commands and desired settings published by the outbox.
    pub published: AtomicU64,
    /// Times the connection to the broker was (re)established.
    pub connects: AtomicU64,
    /// The broker's dropped-messages counter as last read (`None`: not yet).
    pub broker_dropped: std::sync::Mutex<Option<u64>>,
    /// Renewals signed, refused, confirmed, retired.
    pub renewal: RenewalCounters,
    /// The provisioning connection's requests and answers.
    pub provision: Arc<provision::ProvisionCounters>,
    /// The broker's stored and retained message counts as last read.
    pub broker_store: std::sync::Mutex<BrokerStore>,
    /// When the oldest message not committed yet was taken from the broker
    /// (the first of the batch the writer holds).
    pub oldest_uncommitted: std::sync::Mutex<Option<Instant>>,
    /// What Prometheus sees (`fleet serve --metrics`).
    pub metrics: metrics::Metrics,
}

/// Mosquitto's message store counters, as last read from `$SYS`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BrokerStore {
    pub stored: Option<u64>,
    pub retained: Option<u64>,
    /// Readings of `stored` so far: each new one is a push-back step.
    pub readings: u64,
    /// The most that waited in any reading since push-back last took one
    /// (see [`Counters::take_peak_waiting`]).
    pub peak_waiting: Option<u64>,
}

impl BrokerStore {
    /// Messages the broker holds that are not retained: queued for sessions
    /// (the fleet services' above all) and in flight.
    pub fn waiting(&self) -> Option<u64> {
        Some(self.stored?.saturating_sub(self.retained?))
    }
}

impl Counters {
    pub fn get(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Messages taken from the broker and not committed yet.
    pub fn lag(&self) -> u64 {
        self.get(&self.received)
            .saturating_sub(self.get(&self.committed))
    }

    /// The metrics text, the gauges of this instant included.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        m.lag.set(i64::try_from(self.lag()).unwrap_or(i64::MAX));
        m.oldest_uncommitted_s.set(
            self.oldest_uncommitted_s()
                .map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)),
        );
        m.render()
    }

    pub fn broker_store(&self) -> BrokerStore {
        *self.broker_store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The highest reading of what waits at the broker since the last call.
    /// Push-back steps on this rather than on the latest reading: a service
    /// that resumes its session receives the retained reading from while
    /// it was away and, often within the same poll, a fresh one taken after
    /// it drained part of the backlog; the backlog it came back to must not
    /// be missed.
    pub fn take_peak_waiting(&self) -> Option<u64> {
        self.broker_store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peak_waiting
            .take()
    }

    /// Seconds since the oldest uncommitted message was taken from the broker.
    pub fn oldest_uncommitted_s(&self) -> Option<u64> {
        self.oldest_uncommitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|at| at.elapsed().as_secs())
    }

    pub(crate) fn set_oldest_uncommitted(&self, at: Option<Instant>) {
        *self
            .oldest_uncommitted
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = at;
    }

    pub fn broker_dropped(&self) -> Option<u64> {
        *self
            .broker_dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A new reading of the broker's counter; says how many more it dropped
    /// since the previous reading.
    fn saw_broker_dropped(&self, now: u64) -> Option<u64> {
        let mut g = self
            .broker_dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = g.replace(now);
        before.map(|b| now.saturating_sub(b))
    }
}

/// A fresh command id: time-ordered and unique enough for a fleet.
pub fn new_command_id(prefix: &str) -> CommandId {
    let r: u32 = rand::random();
    CommandId::new(format!("{prefix}-{}-{r:08x}", now_unix()))
        .expect("prefix is a valid id and the rest is alphanumeric")
}

/// The subscriptions a (re)connect still has to queue. They are queued with
/// `try_`, never awaited: only the event loop drains the client's request
/// queue, and on a reconnect the acks and commands held while the link was
/// down may have filled it, so an awaited subscribe would wait for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resubscribe {
    fleet: bool,
    counters: bool,
}

impl Resubscribe {
    const NONE: Self = Self {
        fleet: false,
        counters: false,
    };
    const BOTH: Self = Self {
        fleet: true,
        counters: true,
    };

    /// Queue what is still pending; what finds the queue full stays pending.
    fn retry(
        &mut self,
        client: &rumqttc::v5::AsyncClient,
        fleet: &[String],
    ) -> Result<(), ServiceError> {
        use rumqttc::v5::mqttbytes::v5::Filter;
        if self.fleet {
            let filters = fleet
                .iter()
                .map(|f| Filter::new(f.clone(), QoS::AtLeastOnce));
            self.fleet = !queued(client.try_subscribe_many(filters))?;
        }
        if self.counters {
            // Not shared: every instance watches the broker's counters.
            let filters = BROKER_COUNTERS
                .iter()
                .map(|t| Filter::new(*t, QoS::AtMostOnce));
            self.counters = !queued(client.try_subscribe_many(filters))?;
        }
        Ok(())
    }
}

/// Whether a `try_` request was queued: `false` when the queue is full.
/// (rumqttc reports a full queue, a closed one and an invalid filter alike as
/// `TryRequest`; the loop holds the event loop open and the filters are the
/// protocol's own, which the subscription tests prove the broker grants.)
fn queued(sent: Result<(), rumqttc::v5::ClientError>) -> Result<bool, ServiceError> {
    match sent {
        Ok(()) => Ok(true),
        Err(rumqttc::v5::ClientError::TryRequest(_)) => Ok(false),
        Err(e @ rumqttc::v5::ClientError::Request(_)) => {
            Err(ServiceError::Internal(format!("subscribe: {e}")))
        }
    }
}

/// Run the service until `shutdown` resolves. Returns after the last batch
/// is committed and acknowledged.
pub async fn run(
    config: ServiceConfig,
    counters: Arc<Counters>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServiceError> {
    // Open both connections first so a bad registry path fails before connecting.
    let writer_store = registry::open_store(&config.registry, config.retention)?;
    let outbox_store = registry::open_store(&config.registry, config.retention)?;
    tracing::info!(registry = %config.registry, "registry open");

    let client_id = format!("service:{}", config.instance);
    // Relayed so that thousands of acknowledgements a second reach the
    // broker in few TLS records (why: crate::mqtt::relay).
    let tls = Arc::new(edgebind_link::tls_from_files(&config.identity)?);
    let relay = mqtt::relay::Relay::start(&config.endpoint, tls)
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    let mut opts = relay.options(&client_id, config.keep_alive);
    opts.set_clean_start(false)
        .set_session_expiry_interval(Some(u32::MAX))
        .set_manual_acks(true)
        .set_receive_maximum(Some(RECEIVE_MAXIMUM))
        .set_outgoing_inflight_upper_limit(100);
    let (client, mut eventloop) = crate::mqtt::connect(opts, 10_000);

    let (to_writer, writer_rx) = mpsc::channel::<(Instant, Publish)>(20_000);
    let (connected_tx, connected_rx) = std::sync::mpsc::channel();
    let stopping = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Handle::current();

    // Acks are sent from a task of their own so that neither the writer nor
    // the event loop ever waits for the other.
    let (acks, mut acks_rx) = mpsc::unbounded_channel::<Vec<Publish>>();
    let ack_client = client.clone();
    let acker = tokio::spawn(async move {
        while let Some(batch) = acks_rx.recv().await {
            for p in &batch {
                if ack_client.ack(p).await.is_err() {
                    return;
                }
            }
        }
    });
    let renew_acks = acks.clone();
    let writer_failed = Arc::new(tokio::sync::Notify::new());
    let writer = writer::Writer {
        store: writer_store,
        stopping: stopping.clone(),
        failed: writer_failed.clone(),
        acks,
        counters: counters.clone(),
        connected: connected_tx.clone(),
        batch_max: config.batch_max.max(1),
        batch_window: config.batch_window,
        on_connect: registry::ConnectPolicy {
            inventory: config.inventory_on_connect,
            requested_by: Some(format!("service:{}", config.instance)),
        },
    };
    let writer_thread = std::thread::Builder::new()
        .name("fleet-writer".into())
        .spawn(move || writer.run(writer_rx))
        .map_err(|e| ServiceError::Internal(format!("cannot start the writer thread: {e}")))?;

    let (renew_tx, renewer_thread) = match &config.renewal {
        None => {
            drop(renew_acks);
            (None, None)
        }
        Some(service) => {
            let pki = service
                .home
                .open_pki()
                .map_err(|e| ServiceError::Internal(format!("renewal: {e}")))?;
            let renewer = renewal::Renewer {
                service: service.clone(),
                pki,
                store: registry::open_store(&config.registry, config.retention)?,
                client: client.clone(),
                runtime: runtime.clone(),
                acks: renew_acks,
                counters: counters.clone(),
                stopping: stopping.clone(),
                holder: format!("service:{}", config.instance),
            };
            let (tx, rx) = std::sync::mpsc::channel::<Publish>();
            let thread = std::thread::Builder::new()
                .name("fleet-renewal".into())
                .spawn(move || renewer.run(rx))
                .map_err(|e| {
                    ServiceError::Internal(format!("cannot start the renewal thread: {e}"))
                })?;
            (Some(tx), Some(thread))
        }
    };

    let metrics_server = config.metrics.map(|listener| {
        if let Some(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
        }
        tokio::spawn(listener.serve_counters(counters.clone()))
    });
    let link = Arc::new(Link::default());
    link.set(false);
    let outbox = outbox::Outbox {
        push_back: config.push_back.map(push_back::Controller::new),
        link: link.clone(),
        service_name: config.instance.clone(),
        reconnect_accept_rate: config.reconnect_accept_rate,
        store: outbox_store,
        client: client.clone(),
        runtime,
        counters: counters.clone(),
        poll_interval: config.poll_interval,
        stopping: stopping.clone(),
    };
    let outbox_thread = std::thread::Builder::new()
        .name("fleet-outbox".into())
        .spawn(move || outbox.run(connected_rx))
        .map_err(|e| ServiceError::Internal(format!("cannot start the outbox thread: {e}")))?;
    drop(connected_tx);

    let (stop_provisioning, provisioning_stopped) = tokio::sync::watch::channel(false);
    // A provisioning connection that fails is logged loudly; the device
    // side of the service goes on (devices already provisioned are served).
    let provisioner = config.provisioning.clone().map(|p| {
        let work = provision::run(
            config.instance.clone(),
            config.registry.clone(),
            config.retention,
            config.identity.clone(),
            config.keep_alive,
            p,
            counters.provision.clone(),
            provisioning_stopped,
        );
        tokio::spawn(async move {
            if let Err(e) = work.await {
                tracing::error!(error = %e, "claim provisioning stopped: units cannot provision");
            }
        })
    });

    let mut subscriptions = ingest::subscriptions();
    if renew_tx.is_some() {
        subscriptions.push(edgebind_protocol::renewal::Leg::Request.filter_shared());
    }
    let mut resubscribe = Resubscribe::NONE;
    tokio::pin!(shutdown);
    loop {
        // Every pass drains some of the request queue, so a subscription that
        // found it full goes out a few passes later.
        resubscribe.retry(&client, &subscriptions)?;
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = writer_failed.notified() => break,
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    counters.connects.fetch_add(1, Ordering::Relaxed);
                    link.set(true);
                    tracing::info!(
                        broker = %format!("{}:{}", config.endpoint.host, config.endpoint.port),
                        session_present = ack.session_present,
                        "fleet service connected"
                    );
                    // Re-subscribing on a resumed session is harmless and
                    // covers a broker that lost the session.
                    resubscribe = Resubscribe::BOTH;
                    resubscribe.retry(&client, &subscriptions)?;
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as R;
                    if let Some(bad) = ack.return_codes.iter().find(|c| !matches!(c, R::Success(_))) {
                        return Err(ServiceError::Internal(format!(
                            "the broker refused the fleet subscriptions ({bad:?}): is service:{} in the broker policy?",
                            config.instance
                        )));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic.starts_with(b"$SYS/") => {
                    // Never awaited here: only this loop drains the client's
                    // request queue, which the acks may have filled; a full
                    // queue just means trying again at a later reading.
                    if broker_counter(&counters, &publish.topic, &publish.payload)
                        && let Err(e) = client.try_subscribe(BROKER_DROPPED, QoS::AtMostOnce)
                    {
                        tracing::debug!(error = %e, "subscribing to the dropped counter again failed; retrying later");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish)))
                    if renew_tx.is_some() && is_renewal(&publish.topic) =>
                {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    if let Some(tx) = &renew_tx && tx.send(publish).is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    counters.metrics.received.get_or_create(&metrics::kind_label(&publish.topic)).inc();
                    if to_writer.send((Instant::now(), publish)).await.is_err() {
                        break; // the writer gave up: its error is reported below
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    link.set(false);
                    tracing::warn!(error = %e, "broker connection lost; reconnecting");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    // Orderly stop: the writer commits and acknowledges what it holds while
    // the event loop keeps running to send those acks out; messages not yet
    // forwarded stay unacknowledged and come back on the next start.
    tracing::info!("fleet service stopping");
    stopping.store(true, Ordering::Relaxed);
    drop(to_writer);
    drop(renew_tx);
    if let Some(t) = renewer_thread {
        // It answers what it holds (the event loop keeps running below for
        // the publishes it makes), then drops its ack sender.
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    let writer_done = async move {
        let joined = tokio::task::spawn_blocking(move || writer_thread.join()).await;
        // The writer's sender is gone now: the ack task ends after the last batch.
        let _ = acker.await;
        match joined {
            Ok(Ok(result)) => result,
            _ => Err(RegistryError::backend(
                "the registry writer thread panicked",
            )),
        }
    };
    tokio::pin!(writer_done);
    let written = loop {
        tokio::select! {
            result = &mut writer_done => break result,
            event = eventloop.poll() => if event.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let _ = tokio::task::spawn_blocking(move || outbox_thread.join()).await;
    let _ = stop_provisioning.send(true);
    if let Some(task) = provisioner {
        let _ = task.await;
    }
    if let Some(server) = metrics_server {
        server.abort();
    }
    let _ = client.disconnect().await;
    // Flush the queued acks and the DISCONNECT.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
    }
    written.map_err(ServiceError::from)
}

fn is_renewal(topic: &[u8]) -> bool {
    let prefix = format!(
        "{}/{}/",
        edgebind_protocol::topics::NAMESPACE,
        edgebind_protocol::renewal::SEGMENT
    );
    topic.starts_with(prefix.as_bytes())
}

/// The broker published one of the `$SYS` counters the service reads.
/// Returns whether to subscribe to the dropped-messages counter again.
///
/// Mosquitto publishes that counter only when it changes, so a service
/// normally learns it from the retained copy its subscription brings. A
/// first start subscribes right after adding its own grant to the broker
/// policy, and a subscription the broker handled before it reloaded that
/// policy gets no retained copy; the other counters, republished every
/// `sys_interval`, then arrive and show that the grant is in force, and a
/// fresh subscription fetches the retained copy.
fn broker_counter(counters: &Counters, topic: &[u8], payload: &[u8]) -> bool {
    let Some(value) = std::str::from_utf8(payload)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
    else {
        tracing::warn!(topic = %String::from_utf8_lossy(topic), payload = %String::from_utf8_lossy(payload), "unreadable broker counter");
        return false;
    };
    tracing::debug!(topic = %String::from_utf8_lossy(topic), value, "broker counter");
    if topic == BROKER_DROPPED.as_bytes() {
        counters
            .metrics
            .broker_dropped
            .set(i64::try_from(value).unwrap_or(i64::MAX));
        broker_dropped(counters, value);
        return false;
    }
    let mut store = counters
        .broker_store
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if topic == BROKER_STORED.as_bytes() {
        store.stored = Some(value);
        store.readings += 1;
    } else if topic == BROKER_RETAINED.as_bytes() {
        store.retained = Some(value);
    }
    if let Some(waiting) = store.waiting() {
        store.peak_waiting = Some(store.peak_waiting.map_or(waiting, |p| p.max(waiting)));
        counters
            .metrics
            .broker_waiting
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }
    topic == BROKER_STORED.as_bytes()
        && counters.broker_dropped().is_none()
        && store.readings % 5 == 1
}

/// A new reading of the broker's dropped-messages counter: a drop is loud.
fn broker_dropped(counters: &Counters, now: u64) {
    match counters.saw_broker_dropped(now) {
        Some(0) => {}
        Some(more) => tracing::error!(
            dropped = more,
            total = now,
            "the broker DROPPED {more} messages (a client's queue was full): data devices \
             believe delivered may be lost; see `edgebind fleet stats` and the README's overload section"
        ),
        None if now > 0 => tracing::warn!(
            total = now,
            "the broker has dropped {now} messages since it started (a client's queue was full)"
        ),
        None => {}
    }
}

/// A service running on its own runtime thread (tests, benchmark).
pub struct ServiceHandle {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServiceError>>>,
    pub counters: Arc<Counters>,
}

impl ServiceHandle {
    pub fn start(config: ServiceConfig) -> Result<ServiceHandle, ServiceError> {
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("fleet-service".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|e| ServiceError::Internal(format!("tokio runtime: {e}")))?;
                rt.block_on(run(config, c, async {
                    let _ = stopped.await;
                }))
            })
            .map_err(|e| ServiceError::Internal(format!("cannot start the service thread: {e}")))?;
        Ok(ServiceHandle {
            stop: Some(stop),
            thread: Some(thread),
            counters,
        })
    }

    /// Stop and wait until everything received is committed.
    pub fn stop(mut self) -> Result<(), ServiceError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), ServiceError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| ServiceError::Internal("service thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One `sys_interval` tick, in the order Mosquitto publishes it.
    fn reading(counters: &Counters, stored: u64, retained: u64) {
        broker_counter(
            counters,
            BROKER_STORED.as_bytes(),
            stored.to_string().as_bytes(),
        );
        broker_counter(
            counters,
            BROKER_RETAINED.as_bytes(),
            retained.to_string().as_bytes(),
        );
    }

    #[test]
    fn a_full_request_queue_leaves_subscriptions_pending_instead_of_waiting() {
        let opts = rumqttc::v5::MqttOptions::new("service:t", "127.0.0.1", 1);
        // One request deep and never polled: what a reconnect finds when
        // the acks held while the link was down have filled the queue.
        let (client, _eventloop) = crate::mqtt::connect(opts, 1);
        let fleet = ingest::subscriptions();
        let mut pending = Resubscribe::BOTH;
        pending.retry(&client, &fleet).unwrap();
        assert_eq!(
            pending,
            Resubscribe {
                fleet: false,
                counters: true
            },
            "the first fits, the second waits for room"
        );
        pending.retry(&client, &fleet).unwrap();
        assert!(pending.counters, "still full: still pending, not dropped");
    }

    #[test]
    fn push_back_sees_the_backlog_even_when_a_lower_reading_follows_before_it_looks() {
        let counters = Counters::default();
        assert_eq!(counters.take_peak_waiting(), None, "nothing read yet");
        // The retained reading from while the service was away, then a
        // fresh one after it drained part of the backlog.
        reading(&counters, 11_040, 40);
        reading(&counters, 5_822, 40);
        assert_eq!(counters.take_peak_waiting(), Some(11_000));
        assert_eq!(
            counters.broker_store().waiting(),
            Some(5_782),
            "the latest stays the gauge"
        );
        assert_eq!(counters.take_peak_waiting(), None, "taken once");
        reading(&counters, 1_040, 40);
        assert_eq!(counters.take_peak_waiting(), Some(1_000));
    }
}
