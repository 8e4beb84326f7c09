//! The burst budget: how much the broker queues for the fleet service, on
//! purpose.
//!
//! The burst to survive is a whole fleet coming back after an outage and
//! draining its outboxes at once: `devices × outage_s / telemetry_interval_s`
//! samples. An agent drains far faster than the service ingests (about
//! 10,000 samples/s each on loopback), so in the worst case the whole burst
//! arrives before much of it is committed and the broker must hold it all
//! for the service's sessions. The queue is sized for twice the burst:
//! push-back engages at [`Budget::push_back_at`] (half the queue), and the
//! other half absorbs what keeps arriving until the throttle reaches the
//! devices (one `$SYS` interval to see it, then one publication).
//!
//! Mosquitto counts `max_queued_bytes` in payload bytes; each queued
//! message also costs the broker its store entry, topic and queue link,
//! [`BROKER_OVERHEAD_BYTES`] by estimate. [`Limits::memory_bytes`] is what
//! a full queue costs one service session (each instance has its own).

use serde::{Deserialize, Serialize};

/// Broker memory per queued message beyond its payload (Mosquitto 2.0's
/// message store entry, the topic string, the per-client queue link):
/// an estimate, stated so that the memory figure is honest about it.
pub const BROKER_OVERHEAD_BYTES: u64 = 256;

/// The queue holds this many bursts: push-back engages at one.
const HEADROOM: u64 = 2;

/// Fewest messages queued per client whatever the budget says (Mosquitto's
/// own default is 1000; a service restart alone needs more).
const MIN_QUEUED_MESSAGES: u64 = 10_000;

/// What the broker limits are derived from. Stored in `settings.toml`,
/// changed with `edgebind broker config --budget-*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Devices in the fleet.
    pub devices: u64,
    /// Their telemetry period (seconds).
    pub telemetry_interval_s: u64,
    /// The outage whose backlog must fit (seconds).
    pub outage_s: u64,
    /// Bytes of one telemetry message (payload; ~420 measured by the agent's
    /// outbox benchmark, rounded up).
    pub message_bytes: u64,
    /// Messages a second the fleet service commits (the measured ingest
    /// ceiling): how fast the backlog drains, and what push-back paces the
    /// fleet to.
    pub ingest_per_s: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            devices: 1000,
            telemetry_interval_s: 10,
            outage_s: 600,
            message_bytes: 512,
            ingest_per_s: 8000,
        }
    }
}

/// The generated limits and what they cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Samples the fleet's outboxes hold after the outage.
    pub burst_messages: u64,
    /// Seconds the service needs to commit the burst at `ingest_per_s`.
    pub drain_s: u64,
    /// `max_queued_messages`.
    pub max_queued_messages: u64,
    /// `max_queued_bytes`.
    pub max_queued_bytes: u64,
    /// Broker memory of one full service queue (payload + overhead).
    pub memory_bytes: u64,
    /// Messages waiting at the broker at which the service pushes back.
    pub push_back_at: u64,
    /// Messages waiting below which it lifts the throttle again.
    pub release_at: u64,
}

impl Budget {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("devices", self.devices),
            ("telemetry_interval_s", self.telemetry_interval_s),
            ("outage_s", self.outage_s),
            ("message_bytes", self.message_bytes),
            ("ingest_per_s", self.ingest_per_s),
        ] {
            if v == 0 {
                return Err(format!("budget {name} must be positive"));
            }
        }
        if self.limits().max_queued_bytes > i64::MAX as u64 / 2 {
            return Err("budget too large: the queue would not fit any machine".into());
        }
        Ok(())
    }

    /// The broker limits that follow from this budget.
    pub fn limits(&self) -> Limits {
        let interval = self.telemetry_interval_s.max(1);
        let burst = self
            .devices
            .saturating_mul(self.outage_s)
            .div_ceil(interval);
        let queued = burst.saturating_mul(HEADROOM).max(MIN_QUEUED_MESSAGES);
        let bytes = queued.saturating_mul(self.message_bytes);
        Limits {
            burst_messages: burst,
            drain_s: burst.div_ceil(self.ingest_per_s.max(1)),
            max_queued_messages: queued,
            max_queued_bytes: bytes,
            memory_bytes: queued.saturating_mul(self.message_bytes + BROKER_OVERHEAD_BYTES),
            push_back_at: queued / HEADROOM,
            release_at: (queued / 50).max(1),
        }
    }

    /// What a throttled agent may send a second, so that the whole fleet
    /// offers half of what the service commits: the backlog at the broker
    /// then shrinks at least as fast as it grew.
    pub fn throttled_outbox_per_s(&self) -> u32 {
        let per = self.ingest_per_s / 2 / self.devices.max(1);
        per.clamp(1, u32::MAX as u64) as u32
    }

    /// The telemetry period a throttled agent keeps at the least: new samples
    /// of the whole fleet take at most a tenth of the ingest meanwhile.
    pub fn throttled_interval_s(&self) -> u64 {
        let fleet_rate_cap = (self.ingest_per_s / 10).max(1);
        self.devices
            .div_ceil(fleet_rate_cap)
            .max(self.telemetry_interval_s)
            .clamp(1, 86_400)
    }

    /// One line for `broker config` and the README.
    pub fn describe(&self) -> String {
        let l = self.limits();
        format!(
            "burst budget: {} devices x {} s outage / {} s telemetry = {} messages ({} s to commit \
             at {} msg/s); max_queued_messages {} (x{HEADROOM}), max_queued_bytes {} ({} B each), \
             about {} MiB of broker memory per service instance at worst; push-back at {} waiting, \
             lifted below {}",
            self.devices,
            self.outage_s,
            self.telemetry_interval_s,
            l.burst_messages,
            l.drain_s,
            self.ingest_per_s,
            l.max_queued_messages,
            l.max_queued_bytes,
            self.message_bytes,
            l.memory_bytes.div_ceil(1024 * 1024),
            l.push_back_at,
            l.release_at,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_budget_holds_a_10_minute_outage_of_1000_devices_twice() {
        let l = Budget::default().limits();
        assert_eq!(l.burst_messages, 60_000);
        assert_eq!(l.drain_s, 8);
        assert_eq!(l.max_queued_messages, 120_000);
        assert_eq!(l.max_queued_bytes, 120_000 * 512);
        assert_eq!(l.memory_bytes, 120_000 * (512 + 256));
        assert_eq!(l.push_back_at, 60_000);
        assert_eq!(l.release_at, 2400);
        assert!(Budget::default().describe().contains("88 MiB"));
    }

    #[test]
    fn limits_follow_each_input() {
        let base = Budget::default();
        let bigger = Budget {
            devices: 10_000,
            telemetry_interval_s: 1,
            ..base
        };
        assert_eq!(bigger.limits().burst_messages, 6_000_000);
        assert_eq!(bigger.limits().max_queued_messages, 12_000_000);
        let longer = Budget {
            outage_s: 1200,
            ..base
        };
        assert_eq!(
            longer.limits().max_queued_messages,
            2 * base.limits().max_queued_messages
        );
        let fatter = Budget {
            message_bytes: 1024,
            ..base
        };
        assert_eq!(
            fatter.limits().max_queued_bytes,
            2 * base.limits().max_queued_bytes
        );
        // A tiny fleet still gets a queue deeper than Mosquitto's default.
        let tiny = Budget { devices: 1, ..base };
        assert_eq!(tiny.limits().max_queued_messages, MIN_QUEUED_MESSAGES);
        assert!(tiny.limits().push_back_at < tiny.limits().max_queued_messages);
    }

    #[test]
    fn the_throttle_paces_the_fleet_below_the_ceiling() {
        let b = Budget::default();
        assert_eq!(b.throttled_outbox_per_s(), 4, "8000/2 over 1000 devices");
        assert!(u64::from(b.throttled_outbox_per_s()) * b.devices <= b.ingest_per_s / 2);
        let huge = Budget {
            devices: 1_000_000,
            ..b
        };
        assert_eq!(huge.throttled_outbox_per_s(), 1, "never zero");
        assert_eq!(
            huge.throttled_interval_s(),
            1250,
            "1e6 devices at 800 msg/s"
        );
        assert_eq!(
            b.throttled_interval_s(),
            10,
            "never shorter than the fleet's own"
        );
    }

    #[test]
    fn zero_inputs_are_refused_by_name() {
        for field in [
            "devices",
            "telemetry_interval_s",
            "outage_s",
            "message_bytes",
            "ingest_per_s",
        ] {
            let mut b = Budget::default();
            match field {
                "devices" => b.devices = 0,
                "telemetry_interval_s" => b.telemetry_interval_s = 0,
                "outage_s" => b.outage_s = 0,
                "message_bytes" => b.message_bytes = 0,
                _ => b.ingest_per_s = 0,
            }
            assert!(b.validate().unwrap_err().contains(field), "{field}");
        }
        let absurd = Budget {
            devices: u64::MAX,
            ..Budget::default()
        };
        assert!(absurd.validate().is_err());
    }
}
