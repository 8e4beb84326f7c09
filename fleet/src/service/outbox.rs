//! The outbox thread: what the fleet tells devices.
//!
//! - desired settings whose revision has not been published yet (retained,
//!   QoS 1, on the device's own `desired` topic);
//! - queued commands of devices that are online;
//! - on-connect rules and the inventory request, when a device connects.
//!
//! Only this thread publishes to devices, so a queued command is handed to
//! the broker once: it is marked `sent` right after publishing, and the
//! agent's record of command ids makes a re-send after a crash harmless.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::{Action, Command, now_unix};
use edgebind_protocol::topics::Topic;
use rumqttc::{AsyncClient, QoS};
use serde_json::Map;

use super::{Counters, SERVICE_NAME, new_command_id};
use crate::registry::{
    CommandRecord, Delivery, Lifecycle, NewCommand, RegistryError, SERVICE_HEARTBEAT_S,
    ServicePresence, Store,
};

pub(super) struct Outbox {
    pub store: Box<dyn Store>,
    pub client: AsyncClient,
    pub runtime: tokio::runtime::Handle,
    pub counters: Arc<Counters>,
    pub poll_interval: Duration,
    pub inventory_on_connect: bool,
    pub stopping: Arc<AtomicBool>,
    /// The broker connection as the event loop sees it, recorded in the
    /// registry so presence can say when it is stale.
    pub link: Arc<super::Link>,
    pub service_name: String,
}

impl Outbox {
    pub fn run(mut self, connected: Receiver<Vec<DeviceId>>) {
        let mut recorded: Option<(bool, u64)> = None;
        let mut beat_at = 0u64;
        loop {
            let now = now_unix();
            let link = self.link.get();
            if recorded != Some(link) || now >= beat_at + SERVICE_HEARTBEAT_S {
                let presence = ServicePresence {
                    name: self.service_name.clone(),
                    connected: link.0,
                    since: link.1,
                    seen_at: now,
                };
                match self.store.record_service(&presence) {
                    Ok(()) => {
                        recorded = Some(link);
                        beat_at = now;
                    }
                    Err(e) => tracing::error!(error = %e, "recording the service heartbeat failed"),
                }
            }
            if self.stopping.load(Ordering::Relaxed) {
                self.record_stopped();
                return;
            }
            match connected.recv_timeout(self.poll_interval) {
                Ok(devices) => {
                    for device in devices {
                        if let Err(e) = self.on_connect(&device) {
                            tracing::error!(device = %device, error = %e, "on-connect actions failed");
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.record_stopped();
                    return;
                }
            }
            if let Err(e) = self.publish_desired() {
                tracing::error!(error = %e, "publishing desired settings failed");
            }
            if let Err(e) = self.deliver_queued() {
                tracing::error!(error = %e, "delivering queued commands failed");
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

    fn on_connect(&mut self, device: &DeviceId) -> Result<(), RegistryError> {
        let d = self.store.device(device)?;
        if d.lifecycle == Lifecycle::Revoked || !d.online {
            return Ok(());
        }
        // Queued commands first, in the order they were queued.
        for record in self.store.queued_for(device)? {
            self.deliver(&record)?;
        }
        let mut commands: Vec<NewCommand> = self
            .store
            .on_connect_rules(device)?
            .into_iter()
            .map(|rule| NewCommand {
                id: new_command_id("oc"),
                device: device.clone(),
                action: rule.action,
                args: rule.args,
                delivery: Delivery::OnConnect,
                requested_by: Some(format!("service:{SERVICE_NAME}")),
                expires_at: None,
                rule_id: Some(rule.id),
            })
            .collect();
        if self.inventory_on_connect {
            commands.push(NewCommand {
                id: new_command_id("inv"),
                device: device.clone(),
                action: edgebind_protocol::actions::INVENTORY,
                args: Map::new(),
                delivery: Delivery::Auto,
                requested_by: Some(format!("service:{SERVICE_NAME}")),
                expires_at: None,
                rule_id: None,
            });
        }
        if commands.is_empty() {
            return Ok(());
        }
        // Record first, so the results that follow have a log entry to land in.
        self.store.insert_commands(&commands)?;
        for c in &commands {
            let command = Command {
                id: c.id.clone(),
                action: c.action.clone(),
                args: c.args.clone(),
                expires_at: None,
            };
            self.publish_command(device, &command);
        }
        Ok(())
    }
}
