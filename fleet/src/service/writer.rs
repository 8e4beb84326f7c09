//! The writer thread: batches broker messages into registry transactions and
//! acknowledges each message only after its transaction committed.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::now_unix;
use rumqttc::v5::mqttbytes::v5::Publish;
use tokio::sync::mpsc::{self, error::TryRecvError};

use super::{Counters, metrics};
use crate::ingest::{self, Dropped};
use crate::registry::{RegistryError, Store, Update};

/// Failed commits of one batch before the service gives up and exits non-zero
/// (about 20 s of backoff): a registry that stays unwritable must reach an
/// operator through systemd, not a log line repeated forever.
pub(super) const MAX_COMMIT_ATTEMPTS: u32 = 8;

pub(super) struct Writer {
    pub store: Box<dyn Store>,
    /// Set when the service stops: a batch still being retried is abandoned
    /// (it was never acknowledged, so the broker delivers it again).
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
    /// Told when the writer gives up, so the service stops at once.
    pub failed: Arc<tokio::sync::Notify>,
    /// Committed messages go to the ack task. Never blocking here matters:
    /// the event loop may itself be waiting for room in the writer's channel.
    pub acks: mpsc::UnboundedSender<Vec<Publish>>,
    pub counters: Arc<Counters>,
    pub connected: std::sync::mpsc::Sender<Vec<DeviceId>>,
    pub batch_max: usize,
    pub batch_window: Duration,
    /// What a new connection queues (in the batch's own transaction).
    pub on_connect: crate::registry::ConnectPolicy,
}

impl Writer {
    /// Returns the registry error that made it give up, if it did.
    pub fn run(mut self, mut rx: mpsc::Receiver<(Instant, Publish)>) -> Result<(), RegistryError> {
        let mut warned_unknown: HashSet<DeviceId> = HashSet::new();
        let mut warned_kinds: HashSet<String> = HashSet::new();
        let mut publishes: Vec<Publish> = Vec::with_capacity(self.batch_max);
        let mut updates: Vec<Update> = Vec::with_capacity(self.batch_max);
        // Block for the first message of a batch, then take whatever is
        // already waiting: under load batches grow (up to batch_max or
        // batch_window), when idle each message commits at once.
        while let Some((taken_at, first)) = rx.blocking_recv() {
            // The channel is in arrival order: the batch's first message is
            // the oldest not committed.
            self.counters.set_oldest_uncommitted(Some(taken_at));
            let started = Instant::now();
            publishes.push(first);
            let mut closed = false;
            while publishes.len() < self.batch_max && started.elapsed() < self.batch_window {
                match rx.try_recv() {
                    Ok((_, p)) => publishes.push(p),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            let received_at = now_unix();
            let mut dropped = 0u64;
            for p in &publishes {
                let topic = String::from_utf8_lossy(&p.topic);
                match ingest::decode(&topic, &p.payload, received_at) {
                    Ok(u) => updates.push(u),
                    Err(reason) => {
                        dropped += 1;
                        let key = match &reason {
                            Dropped::ForeignTopic(t) => t.clone(),
                            Dropped::Empty { topic }
                            | Dropped::NotIngested { topic }
                            | Dropped::Invalid { topic, .. } => topic.clone(),
                        };
                        if warned_kinds.len() < 10_000 && warned_kinds.insert(key) {
                            tracing::warn!(%reason, "dropping message");
                        }
                    }
                }
            }
            let commit_started = Instant::now();
            let report = match self.commit(&updates) {
                Ok(report) => report,
                Err(e) => {
                    self.failed.notify_one();
                    return Err(e);
                }
            };
            self.count_committed(&publishes, &updates, &report, dropped, commit_started);
            for device in &report.unknown_devices {
                if warned_unknown.insert(device.clone()) {
                    tracing::warn!(
                        device = %device,
                        "ignoring messages from a device that is not in the registry (logged once)"
                    );
                }
            }
            let unknown_msgs = updates
                .iter()
                .filter(|u| report.unknown_devices.contains(u.device()))
                .count() as u64;
            let n = publishes.len() as u64;
            // The ack task may be gone at shutdown; the broker then re-sends,
            // which is the safe direction.
            let _ = self.acks.send(std::mem::replace(
                &mut publishes,
                Vec::with_capacity(self.batch_max),
            ));
            self.counters
                .dropped
                .fetch_add(dropped + unknown_msgs, Ordering::Relaxed);
            self.counters.committed.fetch_add(n, Ordering::Relaxed);
            self.counters.batches.fetch_add(1, Ordering::Relaxed);
            self.counters.set_oldest_uncommitted(None);
            for device in &report.connected {
                tracing::info!(device = %device, "device connected");
            }
            if report.queued_on_connect > 0 {
                tracing::info!(
                    commands = report.queued_on_connect,
                    "queued on-connect commands"
                );
            }
            if !report.connected.is_empty() {
                let _ = self.connected.send(report.connected);
            }
            publishes.clear();
            updates.clear();
            if closed {
                break;
            }
        }
        Ok(())
    }

    /// The metrics of a committed batch.
    fn count_committed(
        &self,
        publishes: &[Publish],
        updates: &[Update],
        report: &crate::registry::BatchReport,
        invalid: u64,
        commit_started: Instant,
    ) {
        use edgebind_protocol::topics::Kind;
        let m = &self.counters.metrics;
        m.commit_seconds
            .observe(commit_started.elapsed().as_secs_f64());
        for p in publishes {
            m.committed
                .get_or_create(&metrics::kind_label(&p.topic))
                .inc();
        }
        m.duplicated
            .get_or_create(&metrics::kind_of(Kind::Telemetry))
            .inc_by(report.duplicate_telemetry as u64);
        m.duplicated
            .get_or_create(&metrics::kind_of(Kind::Events))
            .inc_by(report.duplicate_events as u64);
        let unknown = updates
            .iter()
            .filter(|u| report.unknown_devices.contains(u.device()))
            .count() as u64;
        m.invalid.inc_by(invalid + unknown);
        for u in updates {
            if let Update::CommandResult { result, .. } = u
                && !report.unknown_devices.contains(u.device())
            {
                m.command_results
                    .get_or_create(&metrics::OutcomeLabel {
                        outcome: metrics::outcome_label(result.status),
                    })
                    .inc();
            }
        }
    }

    /// Commit `updates`, retrying while the database is unavailable (another
    /// process holding a long write lock, a full disk being cleaned): nothing
    /// is acknowledged until this succeeds. Gives up after
    /// [`MAX_COMMIT_ATTEMPTS`], or at once when the service is stopping.
    fn commit(
        &mut self,
        updates: &[Update],
    ) -> Result<crate::registry::BatchReport, RegistryError> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let e = match self.store.apply_with(updates, &self.on_connect) {
                Ok(report) => return Ok(report),
                Err(e) => e,
            };
            self.counters.metrics.registry_errors.inc();
            if attempt >= MAX_COMMIT_ATTEMPTS {
                tracing::error!(error = %e, batch = updates.len(), attempts = attempt,
                    "registry write failed {attempt} times; giving up (nothing of this batch was acknowledged)");
                return Err(e);
            }
            tracing::error!(error = %e, batch = updates.len(), attempt,
                "registry write failed; retrying in {} ms", delay.as_millis());
            // Sleep in slices so a SIGTERM is acted on within a fraction of a second.
            let until = Instant::now() + delay;
            while Instant::now() < until {
                if self.stopping.load(Ordering::Relaxed) {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
            }
            delay = (delay * 2).min(Duration::from_secs(5));
            attempt += 1;
        }
    }
}
