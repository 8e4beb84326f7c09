//! The outbox thread: what the fleet tells devices.
//!
//! - desired settings whose revision has not been published yet (retained,
//!   QoS 1, on the device's own `desired` topic);
//! - queued commands of devices that are online, among them those a new
//!   connection queued (on-connect rules, the inventory request: the writer
//!   records them in the transaction that records the connection);
//! - the fleet's reconnect window (retained), when the service is given the
//!   broker's accept rate: on every connect, and again when the registered
//!   device count (read with the metrics' overview) changes the window.
//!
//! Every instance of the service runs an outbox. Each item is claimed in the
//! registry before it is published ([`Store::claim`]), so two instances
//! never both publish it; it is marked `sent` (or published) right after.
//! An instance that dies between the two leaves a claim that expires after
//! [`CLAIM_TTL_S`], and another publishes the item again: the agent's record
//! of command ids makes that re-send harmless.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::{Action, Command, now_unix};

/// How long an instance's claim on an item it is publishing lasts.
pub const CLAIM_TTL_S: u64 = 30;
use edgebind_protocol::topics::Topic;
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;

use super::{Counters, push_back};
use crate::registry::{CommandRecord, RegistryError, SERVICE_HEARTBEAT_S, ServicePresence, Store};

pub(super) struct Outbox {
    pub store: Box<dyn Store>,
    pub client: AsyncClient,
    pub runtime: tokio::runtime::Handle,
    pub counters: Arc<Counters>,
    pub poll_interval: Duration,
    pub stopping: Arc<AtomicBool>,
    /// The broker connection as the event loop sees it, recorded in the
    /// registry so presence can say when it is stale.
    pub link: Arc<super::Link>,
    pub service_name: String,
    /// The push-back controller (`None`: push-back off).
    pub push_back: Option<super::push_back::Controller>,
    /// The accept rate the reconnect window is sized for (`None`: the
    /// window is not this instance's to publish).
    pub reconnect_accept_rate: Option<f64>,
}

/// The reconnect window as last published: its length and the connection
/// (`Counters::connects`) it went out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WindowSent {
    window_s: u32,
    connection: u64,
}

/// A retained, fleet-wide message (the throttle, the reconnect window), QoS
/// 1, counted as published once the client has queued it. (Free of `self`:
/// the throttle is published while its controller is borrowed.)
fn publish_fleet_wide(
    runtime: &tokio::runtime::Handle,
    client: &AsyncClient,
    counters: &Counters,
    topic: &str,
    payload: Vec<u8>,
) -> Result<(), String> {
    runtime
        .block_on(client.publish(topic, QoS::AtLeastOnce, true, payload))
        .map_err(|e| e.to_string())?;
    counters.published.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// How often the device counts of the metrics are refreshed from the registry.
const DEVICE_METRICS_EVERY_S: u64 = 2;

impl Outbox {
    pub fn run(mut self, connected: Receiver<Vec<DeviceId>>) {
        let mut recorded: Option<((bool, u64), Option<u64>, bool)> = None;
        let mut beat_at = 0u64;
        let mut devices_at = 0u64;
        let mut readings_seen = 0u64;
        let mut registered: Option<u64> = None;
        let mut window_sent: Option<WindowSent> = None;
        loop {
            let now = now_unix();
            let link = self.link.get();
            let dropped = self.counters.broker_dropped();
            let store = self.counters.broker_store();
            if store.readings != readings_seen && link.0 {
                readings_seen = store.readings;
                if let Some(waiting) = self.counters.take_peak_waiting() {
                    self.push_back_step(waiting, now);
                }
            }
            let throttling = self.push_back.as_ref().is_some_and(|c| c.engaged());
            // A change of the broker's drop count or of the throttle is recorded at once.
            if recorded != Some((link, dropped, throttling)) || now >= beat_at + SERVICE_HEARTBEAT_S
            {
                let presence = ServicePresence {
                    name: self.service_name.clone(),
                    connected: link.0,
                    since: link.1,
                    seen_at: now,
                    broker_dropped: dropped,
                    lag: self.counters.lag(),
                    broker_waiting: store.waiting(),
                    oldest_uncommitted_s: self.counters.oldest_uncommitted_s(),
                    push_back: throttling,
                };
                match self.store.record_service(&presence) {
                    Ok(()) => {
                        recorded = Some((link, dropped, throttling));
                        beat_at = now;
                    }
                    Err(e) => {
                        self.counters.metrics.registry_errors.inc();
                        tracing::error!(error = %e, "recording the service heartbeat failed")
                    }
                }
            }
            if now >= devices_at + DEVICE_METRICS_EVERY_S {
                devices_at = now;
                match self.store.overview(now) {
                    Ok(o) => {
                        self.counters.metrics.set_devices(&o);
                        registered = Some(o.total);
                    }
                    Err(e) => {
                        self.counters.metrics.registry_errors.inc();
                        tracing::error!(error = %e, "counting devices for the metrics failed")
                    }
                }
            }
            if let (Some(devices), true) = (registered, link.0) {
                self.publish_reconnect_window(devices, &mut window_sent);
            }
            if self.stopping.load(Ordering::Relaxed) {
                self.record_stopped();
                return;
            }
            // A connection wakes the outbox at once: what it queued goes out
            // without waiting for the next poll.
            match connected.recv_timeout(self.poll_interval) {
                Ok(_devices) => {}
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.record_stopped();
                    return;
                }
            }
            if let Err(e) = self.publish_desired() {
                self.counters.metrics.registry_errors.inc();
                tracing::error!(error = %e, "publishing desired settings failed");
            }
            if let Err(e) = self.deliver_queued() {
                self.counters.metrics.registry_errors.inc();
                tracing::error!(error = %e, "delivering queued commands failed");
            }
        }
    }

    /// One push-back step on a new reading of what waits at the broker,
    /// taken only by the holder of the push-back lease.
    fn push_back_step(&mut self, waiting: u64, now: u64) {
        let by = self.principal();
        let Some(controller) = self.push_back.as_mut() else {
            return;
        };
        match self.store.claim(
            push_back::LEASE_KEY,
            &self.service_name,
            push_back::LEASE_TTL_S,
        ) {
            Ok(true) => {}
            Ok(false) => {
                controller.lost_lease();
                self.counters.metrics.push_back.set(0);
                return;
            }
            Err(e) => {
                // Without the lease nobody may publish: leave the throttle
                // as it is (it expires by itself).
                self.counters.metrics.registry_errors.inc();
                tracing::error!(error = %e, "taking the push-back lease failed");
                return;
            }
        }
        let Some(throttle) = controller.step(waiting, now, &by) else {
            return;
        };
        let engaged = controller.engaged();
        if throttle.active {
            tracing::warn!(
                waiting,
                min_telemetry_interval_s = throttle.min_telemetry_interval_s,
                outbox_per_s = throttle.outbox_per_s,
                "push-back: {waiting} messages wait at the broker; throttling the fleet"
            );
        } else {
            tracing::info!(waiting, "push-back: the fleet may go at its own pace");
        }
        match publish_fleet_wide(
            &self.runtime,
            &self.client,
            &self.counters,
            edgebind_protocol::throttle::TOPIC,
            throttle.encode(),
        ) {
            Ok(()) => {
                self.counters.metrics.push_back.set(i64::from(engaged));
            }
            Err(e) => {
                tracing::error!(error = %e, "publishing the throttle failed");
                // Decide again on the next reading.
                controller.lost_lease();
            }
        }
    }

    /// This instance's principal (`service:NAME`), the `by` of what it publishes.
    fn principal(&self) -> String {
        format!(
            "{}{}",
            edgebind_protocol::principal::SERVICE_PREFIX,
            self.service_name
        )
    }

    /// Publish the fleet's reconnect window (retained) when this connection
    /// has not had it yet, a broker may have lost it, or the registered
    /// fleet has grown or shrunk to another window since.
    fn publish_reconnect_window(&self, devices: u64, sent: &mut Option<WindowSent>) {
        let Some(rate) = self.reconnect_accept_rate else {
            return;
        };
        let by = self.principal();
        let hint = crate::ops::reconnect::hint_for(devices, rate, &by);
        let now = WindowSent {
            window_s: hint.window_s,
            connection: self.counters.connects.load(Ordering::Relaxed),
        };
        if *sent == Some(now) {
            return;
        }
        match publish_fleet_wide(
            &self.runtime,
            &self.client,
            &self.counters,
            edgebind_protocol::reconnect::TOPIC,
            hint.encode(),
        ) {
            Ok(()) => {
                if sent.map(|s| s.window_s) != Some(now.window_s) {
                    tracing::info!(
                        window_s = now.window_s,
                        devices,
                        accept_per_s = rate,
                        "reconnect window: {} s ({devices} devices at {rate}/s)",
                        now.window_s
                    );
                }
                *sent = Some(now);
            }
            Err(e) => {
                tracing::warn!(error = %e, "publishing the reconnect window failed; trying again");
            }
        }
    }

    /// Presence is no longer kept from this moment.
    fn record_stopped(&mut self) {
        let now = now_unix();
        let presence = ServicePresence {
            name: self.service_name.clone(),
            connected: false,
            since: now,
            seen_at: now,
            broker_dropped: self.counters.broker_dropped(),
            lag: self.counters.lag(),
            broker_waiting: self.counters.broker_store().waiting(),
            oldest_uncommitted_s: self.counters.oldest_uncommitted_s(),
            push_back: false,
        };
        if let Err(e) = self.store.record_service(&presence) {
            tracing::error!(error = %e, "recording the service stop failed");
        }
    }

    fn publish(&self, topic: Topic, payload: Vec<u8>, retain: bool) -> bool {
        let result = self.runtime.block_on(self.client.publish(
            topic.render(),
            QoS::AtLeastOnce,
            retain,
            payload,
        ));
        match result {
            Ok(()) => {
                self.counters.published.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::error!(topic = %topic, error = %e, "publish failed");
                false
            }
        }
    }

    fn publish_command(&self, record_device: &DeviceId, command: &Command) -> bool {
        self.publish(
            Topic::Cmd(record_device.clone(), command.id.clone()),
            command.encode(),
            false,
        )
    }

    fn publish_desired(&mut self) -> Result<(), RegistryError> {
        for (device, desired) in self.store.unpublished_desired()? {
            let key = format!("desired/{device}/{}", desired.revision);
            if !self.store.claim(&key, &self.service_name, CLAIM_TTL_S)? {
                continue; // another instance is publishing it
            }
            let payload = serde_json::to_vec(&desired).expect("Desired serializes");
            if self.publish(Topic::Desired(device.clone()), payload, true) {
                self.store
                    .mark_desired_published(&device, desired.revision)?;
                tracing::info!(device = %device, revision = desired.revision, "published desired settings");
            }
        }
        Ok(())
    }

    fn deliver_queued(&mut self) -> Result<(), RegistryError> {
        for record in self.store.deliverable_queued()? {
            self.deliver(&record)?;
        }
        Ok(())
    }

    fn deliver(&mut self, record: &CommandRecord) -> Result<(), RegistryError> {
        let Some(action) = record
            .action
            .as_deref()
            .and_then(|a| a.parse::<Action>().ok())
        else {
            tracing::warn!(command = %record.id, "queued command has no known action; skipping");
            return Ok(());
        };
        if !self.store.claim(
            &format!("cmd/{}", record.id),
            &self.service_name,
            CLAIM_TTL_S,
        )? {
            return Ok(()); // another instance is delivering it
        }
        let command = Command {
            id: record.id.clone(),
            action: action.clone(),
            args: record.args.clone(),
            expires_at: record.expires_at,
        };
        if self.publish_command(&record.device, &command) {
            self.store
                .mark_sent(std::slice::from_ref(&record.id), now_unix())?;
            tracing::info!(device = %record.device, command = %record.id, action = %action, "delivered queued command");
        }
        Ok(())
    }
}
