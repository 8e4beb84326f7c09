//! What the simulated devices did, counted as it happens: the agents'
//! [`Observer`] calls land here (atomics only: thousands of agents call in
//! from the runtime's worker threads), and a [`Snapshot`] reads them at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use edgebind_agent::embed::{Class, Observer};
use edgebind_protocol::messages::CommandStatus;
use edgebind_protocol::{CommandId, DeviceId};
use serde::Serialize;

/// Why a connection attempt failed, from the agent's description of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    /// Nothing listened (the broker is down): no handshake was tried.
    Refused,
    /// TCP connected but TLS or MQTT did not complete (reset, timeout,
    /// handshake error, CONNACK refusal): a failed handshake.
    Handshake,
}

impl AttemptFailure {
    /// Classify rumqttc's error text as the agent reports it.
    pub fn of(error: &str) -> AttemptFailure {
        if error.contains("Connection refused") || error.contains("os error 111") {
            AttemptFailure::Refused
        } else {
            AttemptFailure::Handshake
        }
    }
}

/// Per-device flags, by index.
struct DeviceFlags {
    online: AtomicBool,
    ever: AtomicBool,
}

/// Counters shared by every simulated device.
pub struct Counters {
    index: HashMap<DeviceId, usize>,
    flags: Vec<DeviceFlags>,
    online: AtomicU64,
    ever_connected: AtomicU64,
    connects: AtomicU64,
    refused: AtomicU64,
    handshake_failures: AtomicU64,
    lost: AtomicU64,
    answered: AtomicU64,
    answered_ok: AtomicU64,
    accepted: AtomicU64,
    telemetry: AtomicU64,
    telemetry_delivered: AtomicU64,
    reboots: AtomicU64,
    restarts: AtomicU64,
    agent_errors: AtomicU64,
}

/// The counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub devices: u64,
    /// Devices connected now.
    pub online: u64,
    /// Devices that connected at least once.
    pub ever_connected: u64,
    /// Connection attempts: accepted ones plus failed ones.
    pub attempts: u64,
    /// Accepted connections (CONNACK).
    pub connects: u64,
    /// Attempts refused at TCP (nothing listening).
    pub refused: u64,
    /// Attempts that reached the broker and failed (TLS, MQTT, timeout, reset).
    pub handshake_failures: u64,
    /// Open connections lost.
    pub lost: u64,
    /// Final command results sent (succeeded, failed, rejected, timed out).
    pub answered: u64,
    /// ... of which succeeded.
    pub answered_ok: u64,
    /// `accepted` results sent.
    pub accepted: u64,
    /// Telemetry samples taken.
    pub telemetry: u64,
    /// Telemetry samples the broker acknowledged (PUBACK).
    pub telemetry_delivered: u64,
    /// Simulated reboots carried out.
    pub reboots: u64,
    /// `restart-agent` restarts carried out.
    pub restarts: u64,
    /// Agents that refused to start or failed.
    pub agent_errors: u64,
}

impl Snapshot {
    /// Every error the summary reports as one number.
    pub fn errors(&self) -> u64 {
        self.handshake_failures + self.agent_errors
    }
}

impl Counters {
    pub fn new(devices: &[DeviceId]) -> Counters {
        Counters {
            index: devices
                .iter()
                .enumerate()
                .map(|(i, d)| (d.clone(), i))
                .collect(),
            flags: devices
                .iter()
                .map(|_| DeviceFlags {
                    online: AtomicBool::new(false),
                    ever: AtomicBool::new(false),
                })
                .collect(),
            online: AtomicU64::new(0),
            ever_connected: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            answered_ok: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            telemetry: AtomicU64::new(0),
            telemetry_delivered: AtomicU64::new(0),
            reboots: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            agent_errors: AtomicU64::new(0),
        }
    }

    fn flags(&self, device: &DeviceId) -> Option<&DeviceFlags> {
        self.index.get(device).map(|&i| &self.flags[i])
    }

    /// The device's agent stopped (reboot, restart, end): it is no longer
    /// connected, whether or not a loss was reported.
    pub fn agent_stopped(&self, device: &DeviceId) {
        if let Some(f) = self.flags(device)
            && f.online.swap(false, Ordering::Relaxed)
        {
            self.online.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn rebooted(&self) {
        self.reboots.fetch_add(1, Ordering::Relaxed);
    }

    pub fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn agent_error(&self) {
        self.agent_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Is this device connected now?
    pub fn is_online(&self, device: &DeviceId) -> bool {
        self.flags(device)
            .is_some_and(|f| f.online.load(Ordering::Relaxed))
    }

    /// Did this device connect at least once?
    pub fn has_connected(&self, device: &DeviceId) -> bool {
        self.flags(device)
            .is_some_and(|f| f.ever.load(Ordering::Relaxed))
    }

    /// Devices not connected now.
    pub fn offline_devices(&self) -> Vec<DeviceId> {
        let mut out: Vec<DeviceId> = self
            .index
            .iter()
            .filter(|(_, i)| !self.flags[**i].online.load(Ordering::Relaxed))
            .map(|(d, _)| d.clone())
            .collect();
        out.sort();
        out
    }

    pub fn snapshot(&self) -> Snapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let connects = get(&self.connects);
        let refused = get(&self.refused);
        let handshake_failures = get(&self.handshake_failures);
        Snapshot {
            devices: self.flags.len() as u64,
            online: get(&self.online),
            ever_connected: get(&self.ever_connected),
            attempts: connects + refused + handshake_failures,
            connects,
            refused,
            handshake_failures,
            lost: get(&self.lost),
            answered: get(&self.answered),
            answered_ok: get(&self.answered_ok),
            accepted: get(&self.accepted),
            telemetry: get(&self.telemetry),
            telemetry_delivered: get(&self.telemetry_delivered),
            reboots: get(&self.reboots),
            restarts: get(&self.restarts),
            agent_errors: get(&self.agent_errors),
        }
    }
}

impl Observer for Counters {
    fn connected(&self, device: &DeviceId) {
        self.connects.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = self.flags(device) {
            if !f.online.swap(true, Ordering::Relaxed) {
                self.online.fetch_add(1, Ordering::Relaxed);
            }
            if !f.ever.swap(true, Ordering::Relaxed) {
                self.ever_connected.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn lost(&self, device: &DeviceId, was_connected: bool, error: &str) {
        if was_connected {
            self.lost.fetch_add(1, Ordering::Relaxed);
        } else {
            match AttemptFailure::of(error) {
                AttemptFailure::Refused => &self.refused,
                AttemptFailure::Handshake => &self.handshake_failures,
            }
            .fetch_add(1, Ordering::Relaxed);
        }
        self.agent_stopped(device);
    }

    fn result(&self, _device: &DeviceId, _command: &CommandId, status: CommandStatus) {
        match status {
            CommandStatus::Accepted => self.accepted.fetch_add(1, Ordering::Relaxed),
            CommandStatus::Succeeded => {
                self.answered_ok.fetch_add(1, Ordering::Relaxed);
                self.answered.fetch_add(1, Ordering::Relaxed)
            }
            _ => self.answered.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn telemetry(&self, _device: &DeviceId) {
        self.telemetry.fetch_add(1, Ordering::Relaxed);
    }

    fn delivered(&self, _device: &DeviceId, class: Class) {
        if class == Class::Telemetry {
            self.telemetry_delivered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn online_counts_each_device_once_and_stops_count_as_offline() {
        let c = Counters::new(&[id("a"), id("b")]);
        c.connected(&id("a"));
        c.connected(&id("a"));
        c.connected(&id("b"));
        assert_eq!(c.snapshot().online, 2);
        c.lost(&id("a"), true, "connection reset");
        c.agent_stopped(&id("b"));
        c.agent_stopped(&id("b"));
        let s = c.snapshot();
        assert_eq!(
            (s.online, s.ever_connected, s.connects, s.lost),
            (0, 2, 3, 1)
        );
        assert_eq!(c.offline_devices(), [id("a"), id("b")]);
    }

    #[test]
    fn failed_attempts_are_told_apart_by_cause() {
        let c = Counters::new(&[id("a")]);
        c.lost(&id("a"), false, "I/O: Connection refused (os error 111)");
        c.lost(&id("a"), false, "TLS: handshake failure");
        c.lost(&id("a"), false, "connection attempt timed out");
        c.connected(&id("a"));
        let s = c.snapshot();
        assert_eq!((s.refused, s.handshake_failures, s.attempts), (1, 2, 4));
        assert_eq!(s.errors(), 2);
    }

    #[test]
    fn results_count_final_answers_and_successes() {
        let c = Counters::new(&[id("a")]);
        let cmd = CommandId::new("c1").unwrap();
        c.result(&id("a"), &cmd, CommandStatus::Accepted);
        c.result(&id("a"), &cmd, CommandStatus::Succeeded);
        c.result(&id("a"), &cmd, CommandStatus::Rejected);
        let s = c.snapshot();
        assert_eq!((s.accepted, s.answered, s.answered_ok), (1, 2, 1));
    }
}
