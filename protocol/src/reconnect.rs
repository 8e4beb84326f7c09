//! The fleet's reconnect hint: how long the whole fleet should take to come
//! back after losing its broker.
//!
//! ```text
//! edgebind/v2/reconnect    fleet service -> every device, retained, QoS 1
//! ```
//!
//! A device cannot know how many others lost the broker at the same instant,
//! nor how many handshakes a second the broker can take: the fleet can. The
//! service sizes `window_s` as the fleet size ÷ the broker's accept rate
//! ([`window_for`]), and every agent spreads its first retry uniformly over
//! that window (see the agent's `backoff` module), so the fleet offers the
//! broker about what it can accept instead of everything in one second.
//!
//! A topic of its own rather than a field of the throttle message: the
//! throttle refuses unknown fields, so agents of earlier versions would drop
//! a throttle that carried the hint. On this topic they simply never
//! subscribe. For the same reason this message tolerates fields it does not
//! know: a later version may add some without older agents refusing it.
//!
//! An empty payload (the retained message cleared) withdraws the hint: the
//! agents go back to their configured backoff.

use serde::{Deserialize, Serialize};

/// The one reconnect-hint topic (one level below the namespace, like the
/// throttle: no device topic is there, so no `%u` expansion reaches it).
pub const TOPIC: &str = "edgebind/v2/reconnect";

/// Windows a hint may carry (seconds): one second up to an hour. A longer
/// one would keep a device that lost only its own link away for too long.
pub const WINDOW_RANGE_S: (u32, u32) = (1, 3600);

/// The accept rate [`window_for`] assumes when the operator configured none
/// (connections a second): below what the test Mosquitto measured on a busy
/// 2-core machine, so the window errs long rather than overloading.
pub const DEFAULT_ACCEPT_PER_S: f64 = 50.0;

/// A reconnect hint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconnectHint {
    /// Spread the first retry after losing the broker over this many seconds.
    pub window_s: u32,
    /// Who set it (`service:fleet`), for the journal.
    #[serde(default)]
    pub by: String,
}

/// Why a hint is refused (the agent logs it and keeps the one it had).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HintError {
    #[error("reconnect hint: invalid JSON: {0}")]
    Json(String),
    #[error("reconnect hint: window_s must be in {lo}..={hi}, got {got}")]
    Window { lo: u32, hi: u32, got: u32 },
}

impl ReconnectHint {
    pub fn new(window_s: u32, by: &str) -> ReconnectHint {
        ReconnectHint {
            window_s,
            by: by.to_owned(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a hint serializes")
    }

    /// Parse and check a received hint; `None` for an empty payload (the
    /// hint withdrawn).
    pub fn decode(payload: &[u8]) -> Result<Option<ReconnectHint>, HintError> {
        if payload.is_empty() {
            return Ok(None);
        }
        let h: ReconnectHint =
            serde_json::from_slice(payload).map_err(|e| HintError::Json(e.to_string()))?;
        let (lo, hi) = WINDOW_RANGE_S;
        if !(lo..=hi).contains(&h.window_s) {
            return Err(HintError::Window {
                lo,
                hi,
                got: h.window_s,
            });
        }
        Ok(Some(h))
    }
}

/// The window for a fleet of `devices` behind a broker that accepts
/// `accept_per_s` mutual-TLS connections a second: the time the broker
/// needs for all of them, rounded up, within [`WINDOW_RANGE_S`]. An accept
/// rate that is not a positive number gives the longest window.
pub fn window_for(devices: u64, accept_per_s: f64) -> u32 {
    let (lo, hi) = WINDOW_RANGE_S;
    if !accept_per_s.is_finite() || accept_per_s <= 0.0 {
        return hi;
    }
    let s = (devices as f64 / accept_per_s).ceil();
    if s >= f64::from(hi) {
        hi
    } else {
        (s as u32).max(lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_an_empty_payload_withdraws_it() {
        let h = ReconnectHint::new(63, "service:fleet");
        assert_eq!(ReconnectHint::decode(&h.encode()), Ok(Some(h)));
        assert_eq!(ReconnectHint::decode(b""), Ok(None));
    }

    #[test]
    fn refuses_windows_out_of_range_and_junk_but_tolerates_new_fields() {
        for (bad, needle) in [
            (&br#"{"window_s":0}"#[..], "got 0"),
            (br#"{"window_s":3601}"#, "1..=3600"),
            (br#"{"window_s":-5}"#, "invalid JSON"),
            (br#"{"by":"x"}"#, "window_s"),
            (b"junk", "invalid JSON"),
        ] {
            let e = ReconnectHint::decode(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let later = ReconnectHint::decode(br#"{"window_s":10,"jitter":"x"}"#).unwrap();
        assert_eq!(later.map(|h| h.window_s), Some(10));
    }

    #[test]
    fn the_window_is_the_time_the_broker_needs_for_the_fleet() {
        assert_eq!(window_for(5000, 100.0), 50);
        assert_eq!(window_for(5001, 100.0), 51, "rounded up");
        assert_eq!(window_for(10, 1000.0), 1, "at least a second");
        assert_eq!(window_for(0, 100.0), 1);
        assert_eq!(window_for(10_000_000, 10.0), 3600, "at most an hour");
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(window_for(5000, bad), 3600, "{bad}");
        }
        assert_eq!(window_for(5000, DEFAULT_ACCEPT_PER_S), 100);
    }
}
