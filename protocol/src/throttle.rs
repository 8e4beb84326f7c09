//! The fleet-wide throttle: how the fleet service pushes back before the
//! broker's queue for it overflows.
//!
//! ```text
//! edgebind/v2/throttle    fleet service -> every device, retained, QoS 1
//! ```
//!
//! One retained message for the whole fleet (not one per device: push-back
//! must reach ten thousand devices with one publication). While it is in
//! force an agent takes telemetry samples no more often than
//! `min_telemetry_interval_s` and hands its durable outbox to the broker at
//! no more than `outbox_per_s` records a second; whatever waits stays in the
//! outbox on disk, so slowing down loses nothing. The service lifts it by
//! replacing the retained message with one that has `active: false`.
//!
//! A throttle carries its own expiry: if the service that set it dies and no
//! other takes over, the fleet speeds up again by itself at `expires_at`
//! instead of staying slow for good. The service refreshes it well before.
//!
//! Only fleet services may write it; devices (and operators) may only read
//! it: see [`crate::acl`].

use serde::{Deserialize, Serialize};

use crate::messages::UnixSeconds;
use crate::settings::TELEMETRY_INTERVAL_RANGE_S;

/// The one throttle topic. One level below the namespace, where no device
/// topic is (every kind has its id below it), so no `%u` expansion reaches it.
pub const TOPIC: &str = "edgebind/v2/throttle";

/// Outbox records a second an agent may be held to, at the least.
pub const MIN_OUTBOX_PER_S: u32 = 1;

/// A throttle message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Throttle {
    /// `false`: lifted; the other fields are then ignored.
    pub active: bool,
    /// The shortest telemetry period the agents may use meanwhile (seconds);
    /// an agent set to a longer one keeps its own.
    #[serde(default)]
    pub min_telemetry_interval_s: u64,
    /// Most outbox records (telemetry, events, results) an agent sends a second.
    #[serde(default)]
    pub outbox_per_s: u32,
    /// When it was set or last refreshed.
    pub ts: UnixSeconds,
    /// After this instant the throttle no longer applies (a service that
    /// died while throttling does not slow the fleet forever).
    #[serde(default)]
    pub expires_at: UnixSeconds,
    /// Who set it (`service:fleet`), for the journal.
    #[serde(default)]
    pub by: String,
}

/// Why a throttle message is refused (the agent logs it and keeps what it had).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThrottleError {
    #[error("throttle: invalid JSON: {0}")]
    Json(String),
    #[error("throttle: min_telemetry_interval_s must be in {lo}..={hi}, got {got}")]
    Interval { lo: u64, hi: u64, got: u64 },
    #[error("throttle: outbox_per_s must be at least {MIN_OUTBOX_PER_S}, got {0}")]
    Pace(u32),
    #[error("throttle: expires_at ({expires_at}) is not after ts ({ts})")]
    Expiry {
        ts: UnixSeconds,
        expires_at: UnixSeconds,
    },
}

impl Throttle {
    /// A throttle in force from `now` for `ttl_s` seconds.
    pub fn engaged(
        min_telemetry_interval_s: u64,
        outbox_per_s: u32,
        now: UnixSeconds,
        ttl_s: u64,
        by: &str,
    ) -> Throttle {
        Throttle {
            active: true,
            min_telemetry_interval_s,
            outbox_per_s,
            ts: now,
            expires_at: now + ttl_s,
            by: by.to_owned(),
        }
    }

    /// The message that lifts a throttle.
    pub fn lifted(now: UnixSeconds, by: &str) -> Throttle {
        Throttle {
            active: false,
            min_telemetry_interval_s: 0,
            outbox_per_s: 0,
            ts: now,
            expires_at: 0,
            by: by.to_owned(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a throttle serializes")
    }

    /// Parse and check a received throttle. An empty payload (a cleared
    /// retained message) is a lifted throttle.
    pub fn decode(payload: &[u8]) -> Result<Throttle, ThrottleError> {
        if payload.is_empty() {
            return Ok(Throttle::lifted(0, ""));
        }
        let t: Throttle =
            serde_json::from_slice(payload).map_err(|e| ThrottleError::Json(e.to_string()))?;
        if t.active {
            let (lo, hi) = TELEMETRY_INTERVAL_RANGE_S;
            if !(lo..=hi).contains(&t.min_telemetry_interval_s) {
                return Err(ThrottleError::Interval {
                    lo,
                    hi,
                    got: t.min_telemetry_interval_s,
                });
            }
            if t.outbox_per_s < MIN_OUTBOX_PER_S {
                return Err(ThrottleError::Pace(t.outbox_per_s));
            }
            if t.expires_at <= t.ts {
                return Err(ThrottleError::Expiry {
                    ts: t.ts,
                    expires_at: t.expires_at,
                });
            }
        }
        Ok(t)
    }

    /// Whether it applies at `now`.
    pub fn in_force(&self, now: UnixSeconds) -> bool {
        self.active && now < self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_expires() {
        let t = Throttle::engaged(120, 5, 1000, 300, "service:fleet");
        assert_eq!(Throttle::decode(&t.encode()), Ok(t.clone()));
        assert!(t.in_force(1000) && t.in_force(1299));
        assert!(!t.in_force(1300), "expired: the fleet speeds up by itself");
        let lifted = Throttle::lifted(1400, "service:fleet");
        assert_eq!(Throttle::decode(&lifted.encode()), Ok(lifted.clone()));
        assert!(!lifted.in_force(1400));
        assert!(!Throttle::decode(b"").unwrap().in_force(0));
    }

    #[test]
    fn refuses_what_an_agent_must_not_obey() {
        let ok = Throttle::engaged(60, 5, 10, 100, "x");
        let mut zero_pace = ok.clone();
        zero_pace.outbox_per_s = 0;
        let mut bad_interval = ok.clone();
        bad_interval.min_telemetry_interval_s = 0;
        let mut huge_interval = ok.clone();
        huge_interval.min_telemetry_interval_s = 86_401;
        let mut no_expiry = ok.clone();
        no_expiry.expires_at = 0;
        for (bad, needle) in [
            (zero_pace, "outbox_per_s"),
            (bad_interval, "1..=86400"),
            (huge_interval, "86401"),
            (no_expiry, "expires_at"),
        ] {
            let e = Throttle::decode(&bad.encode()).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        for junk in [
            &b"not json"[..],
            br#"{"active":true}"#,
            br#"{"active":1,"ts":1}"#,
        ] {
            assert!(Throttle::decode(junk).is_err());
        }
        let e = Throttle::decode(br#"{"active":false,"ts":1,"colour":"red"}"#).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
