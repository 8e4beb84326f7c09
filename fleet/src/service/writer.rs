//! The writer thread: batches broker messages into registry transactions and
//! acknowledges each message only after its transaction committed.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::now_unix;
use rumqttc::Publish;
use tokio::sync::mpsc::{self, error::TryRecvError};

use super::Counters;
use crate::ingest::{self, Dropped};
use crate::registry::{Store, Update};

pub(super) struct Writer {
    pub store: Box<dyn Store>,
    /// Committed messages go to the ack task. Never blocking here matters:
    /// the event loop may itself be waiting for room in the writer's channel.
    pub acks: mpsc::UnboundedSender<Vec<Publish>>,
    pub counters: Arc<Counters>,
    pub connected: std::sync::mpsc::Sender<Vec<DeviceId>>,
    pub batch_max: usize,
    pub batch_window: Duration,
}

impl Writer {
    pub fn run(mut self, mut rx: mpsc::Receiver<Publish>) {
        let mut warned_unknown: HashSet<DeviceId> = HashSet::new();
        let mut warned_kinds: HashSet<String> = HashSet::new();
        let mut publishes: Vec<Publish> = Vec::with_capacity(self.batch_max);
        let mut updates: Vec<Update> = Vec::with_capacity(self.batch_max);
        // Block for the first message of a batch, then take whatever is
        // already waiting: under load batches grow (up to batch_max or
        // batch_window), when idle each message commits at once.
        while let Some(first) = rx.blocking_recv() {
            let started = Instant::now();
            publishes.push(first);
            let mut closed = false;
            while publishes.len() < self.batch_max && started.elapsed() < self.batch_window {
                match rx.try_recv() {
                    Ok(p) => publishes.push(p),
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
                match ingest::decode(&p.topic, &p.payload, received_at) {
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
            let report = self.commit(&updates);
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
            if !report.connected.is_empty() {
                let _ = self.connected.send(report.connected);
            }
            publishes.clear();
            updates.clear();
            if closed {
                break;
            }
        }
    }

    /// Commit `updates`, retrying while the database is unavailable (another
    /// process holding a long write lock, a full disk being cleaned): nothing
    /// is acknowledged until this succeeds.
    fn commit(&mut self, updates: &[Update]) -> crate::registry::BatchReport {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.store.apply(updates) {
                Ok(report) => return report,
                Err(e) => {
                    tracing::error!(error = %e, batch = updates.len(), "registry write failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
