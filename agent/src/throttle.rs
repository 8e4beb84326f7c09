//! Obeying the fleet-wide throttle (`edgebind_protocol::throttle`).
//!
//! While a throttle is in force the agent samples telemetry no more often
//! than its `min_telemetry_interval_s` and hands its outbox to the broker at
//! no more than `outbox_per_s` records a second (a token bucket holding at
//! most one second's worth). What waits stays in the durable outbox, so
//! nothing is lost; the outbox's own size cap still applies. A throttle that
//! is invalid is ignored (the one in force stays), one that expired no
//! longer applies, and a lifted one ends it.
//!
//! No I/O here: the runtime feeds it messages and clock readings.

use std::time::{Duration, Instant};

use edgebind_protocol::messages::UnixSeconds;
use edgebind_protocol::throttle::{Throttle, ThrottleError};

/// What a throttle message changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Engaged {
        min_interval_s: u64,
        outbox_per_s: u32,
    },
    Lifted,
    /// The same throttle again (a refresh).
    Unchanged,
}

#[derive(Debug)]
pub struct Pacer {
    throttle: Option<Throttle>,
    tokens: f64,
    refilled_at: Instant,
}

impl Pacer {
    pub fn new(now: Instant) -> Pacer {
        Pacer {
            throttle: None,
            tokens: 0.0,
            refilled_at: now,
        }
    }

    /// A message on the throttle topic.
    pub fn on_message(&mut self, payload: &[u8], now: Instant) -> Result<Change, ThrottleError> {
        let t = Throttle::decode(payload)?;
        if !t.active {
            let was = self.throttle.take().is_some();
            return Ok(if was {
                Change::Lifted
            } else {
                Change::Unchanged
            });
        }
        let same = self.throttle.as_ref().is_some_and(|old| {
            (old.min_telemetry_interval_s, old.outbox_per_s)
                == (t.min_telemetry_interval_s, t.outbox_per_s)
        });
        if self.throttle.is_none() {
            // Start with one second's worth, so the pace starts at once.
            self.tokens = f64::from(t.outbox_per_s);
            self.refilled_at = now;
        }
        let change = Change::Engaged {
            min_interval_s: t.min_telemetry_interval_s,
            outbox_per_s: t.outbox_per_s,
        };
        self.throttle = Some(t);
        Ok(if same { Change::Unchanged } else { change })
    }

    /// The throttle in force at `now_unix`, if any.
    pub fn in_force(&self, now_unix: UnixSeconds) -> Option<&Throttle> {
        self.throttle.as_ref().filter(|t| t.in_force(now_unix))
    }

    /// The telemetry period to use: the agent's own, or the throttle's
    /// minimum when that is longer.
    pub fn telemetry_interval_s(&self, own: u64, now_unix: UnixSeconds) -> u64 {
        match self.in_force(now_unix) {
            Some(t) => own.max(t.min_telemetry_interval_s),
            None => own,
        }
    }

    fn refill(&mut self, now: Instant, per_s: u32) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.refilled_at = now;
        self.tokens = (self.tokens + elapsed * f64::from(per_s)).min(f64::from(per_s));
    }

    /// How many outbox records may be handed over now, at most `window`.
    pub fn allowance(&mut self, window: usize, now: Instant, now_unix: UnixSeconds) -> usize {
        let Some(per_s) = self.in_force(now_unix).map(|t| t.outbox_per_s) else {
            return window;
        };
        self.refill(now, per_s);
        (self.tokens.floor() as usize).min(window)
    }

    /// `n` records were handed over.
    pub fn spent(&mut self, n: usize, now_unix: UnixSeconds) {
        if self.in_force(now_unix).is_some() {
            self.tokens = (self.tokens - n as f64).max(0.0);
        }
    }

    /// How long until the next record may go, while throttled.
    pub fn next_send_in(&self, now: Instant, now_unix: UnixSeconds) -> Option<Duration> {
        let per_s = self.in_force(now_unix)?.outbox_per_s;
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        let have = self.tokens + elapsed * f64::from(per_s);
        let missing = (1.0 - have).max(0.0);
        Some(Duration::from_secs_f64(missing / f64::from(per_s)).max(Duration::from_millis(5)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(interval: u64, per_s: u32, now: UnixSeconds) -> Vec<u8> {
        Throttle::engaged(interval, per_s, now, 120, "service:fleet").encode()
    }

    #[test]
    fn a_throttle_slows_telemetry_and_the_outbox_until_lifted() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        assert_eq!(p.telemetry_interval_s(10, 1000), 10);
        assert_eq!(
            p.allowance(16, t0, 1000),
            16,
            "no throttle: the whole window"
        );
        assert_eq!(
            p.on_message(&throttle(60, 4, 1000), t0),
            Ok(Change::Engaged {
                min_interval_s: 60,
                outbox_per_s: 4
            })
        );
        assert_eq!(p.telemetry_interval_s(10, 1000), 60);
        assert_eq!(
            p.telemetry_interval_s(300, 1000),
            300,
            "a longer own period stays"
        );
        assert_eq!(p.allowance(16, t0, 1000), 4, "one second's worth at once");
        p.spent(4, 1000);
        assert_eq!(p.allowance(16, t0, 1000), 0);
        let wait = p.next_send_in(t0, 1000).unwrap();
        assert!(
            wait >= Duration::from_millis(240) && wait <= Duration::from_millis(260),
            "{wait:?}"
        );
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(p.allowance(16, t1, 1000), 2);
        // Tokens never pile up beyond a second's worth.
        let t2 = t0 + Duration::from_secs(60);
        assert_eq!(p.allowance(16, t2, 1000), 4);
        // A refresh changes nothing.
        assert_eq!(
            p.on_message(&throttle(60, 4, 1030), t2),
            Ok(Change::Unchanged)
        );
        assert_eq!(
            p.on_message(&Throttle::lifted(1040, "service:fleet").encode(), t2),
            Ok(Change::Lifted)
        );
        assert_eq!(p.telemetry_interval_s(10, 1040), 10);
        assert_eq!(p.allowance(16, t2, 1040), 16);
        assert_eq!(p.next_send_in(t2, 1040), None);
    }

    #[test]
    fn an_expired_throttle_no_longer_applies() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        p.on_message(&throttle(60, 1, 1000), t0).unwrap();
        assert_eq!(p.telemetry_interval_s(10, 1119), 60);
        assert_eq!(p.telemetry_interval_s(10, 1120), 10, "expired");
        assert_eq!(p.allowance(16, t0, 1120), 16);
    }

    #[test]
    fn a_bad_throttle_is_refused_and_the_one_in_force_stays() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        p.on_message(&throttle(60, 4, 1000), t0).unwrap();
        for bad in [&b"garbage"[..], br#"{"active":true,"ts":1,"min_telemetry_interval_s":0,"outbox_per_s":1,"expires_at":5}"#] {
            assert!(p.on_message(bad, t0).is_err());
        }
        assert_eq!(p.telemetry_interval_s(10, 1000), 60);
        // A cleared retained message lifts it.
        assert_eq!(p.on_message(b"", t0), Ok(Change::Lifted));
    }
}
