//! Push-back: when what waits at the broker for the fleet service nears the
//! burst budget, slow the fleet down before the broker has to drop.
//!
//! The measure is the broker's own: `$SYS/broker/store/messages/count` less
//! `$SYS/broker/retained messages/count`, published every `sys_interval`.
//! Every message the service holds uncommitted is still in that count (it
//! is acknowledged only after its commit), so it is the service's whole lag,
//! the part still queued at the broker included, which the service itself
//! cannot see. It counts every client's queue, so with several instances it
//! is their sum: push-back engages earlier, never later.
//!
//! Rules ([`Controller::step`], one step per new reading):
//! - waiting ≥ `engage_at` (half the queue the budget sized): publish the
//!   throttle (retained, fleet-wide);
//! - while engaged, refresh it every `refresh_s` (it expires after `ttl_s`,
//!   so a service that dies while throttling frees the fleet by itself);
//! - waiting ≤ `release_at` on two readings in a row: replace it with a
//!   lifted one;
//! - the first reading after this instance starts (or takes over) publishes
//!   a lifted throttle unless waiting is already over `engage_at`: a stale
//!   throttle of an instance that died is replaced at once.
//!
//! Several instances: only the holder of the registry lease [`LEASE_KEY`]
//! steps the controller and publishes, so two instances never publish
//! contradicting throttles (one lifting what the other just set). They all
//! read the same broker counters, so any of them decides the same way; the
//! lease only picks one. A holder that dies loses the lease after
//! [`LEASE_TTL_S`] and another takes over.

use edgebind_protocol::messages::UnixSeconds;
use edgebind_protocol::throttle::Throttle;

/// The registry lease whose holder publishes the throttle.
pub const LEASE_KEY: &str = "push-back/throttle";
/// How long a holder's lease lasts without renewal (renewed every reading).
pub const LEASE_TTL_S: u64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushBackPolicy {
    /// Messages waiting at the broker at which the fleet is throttled.
    pub engage_at: u64,
    /// Messages waiting at or below which the throttle is lifted.
    pub release_at: u64,
    /// The throttle's shortest telemetry period.
    pub min_telemetry_interval_s: u64,
    /// The throttle's outbox pace per device.
    pub outbox_per_s: u32,
    /// Lifetime of one throttle message.
    pub ttl_s: u64,
    /// How often an engaged throttle is published again.
    pub refresh_s: u64,
}

impl PushBackPolicy {
    /// The policy that follows from the broker's burst budget.
    pub fn from_budget(budget: &edgebind_broker::Budget) -> PushBackPolicy {
        let limits = budget.limits();
        PushBackPolicy {
            engage_at: limits.push_back_at,
            release_at: limits.release_at,
            min_telemetry_interval_s: budget.throttled_interval_s(),
            outbox_per_s: budget.throttled_outbox_per_s(),
            ttl_s: 120,
            refresh_s: 30,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing published by this instance yet.
    Unknown,
    Lifted,
    Engaged {
        published_at: UnixSeconds,
    },
}

#[derive(Debug)]
pub struct Controller {
    policy: PushBackPolicy,
    state: State,
    low_readings: u32,
}

impl Controller {
    pub fn new(policy: PushBackPolicy) -> Controller {
        Controller {
            policy,
            state: State::Unknown,
            low_readings: 0,
        }
    }

    pub fn engaged(&self) -> bool {
        matches!(self.state, State::Engaged { .. })
    }

    /// This instance no longer holds the lease: whoever does decides.
    pub fn lost_lease(&mut self) {
        self.state = State::Unknown;
        self.low_readings = 0;
    }

    /// A new reading of what waits at the broker; the throttle to publish, if any.
    pub fn step(&mut self, waiting: u64, now: UnixSeconds, by: &str) -> Option<Throttle> {
        let p = self.policy;
        let engage =
            || Throttle::engaged(p.min_telemetry_interval_s, p.outbox_per_s, now, p.ttl_s, by);
        if waiting <= p.release_at {
            self.low_readings += 1;
        } else {
            self.low_readings = 0;
        }
        match self.state {
            State::Unknown | State::Lifted if waiting >= p.engage_at => {
                self.state = State::Engaged { published_at: now };
                self.low_readings = 0;
                Some(engage())
            }
            State::Unknown => {
                self.state = State::Lifted;
                Some(Throttle::lifted(now, by))
            }
            State::Lifted => None,
            State::Engaged { .. } if self.low_readings >= 2 => {
                self.state = State::Lifted;
                Some(Throttle::lifted(now, by))
            }
            State::Engaged { published_at } if now >= published_at + p.refresh_s => {
                self.state = State::Engaged { published_at: now };
                Some(engage())
            }
            State::Engaged { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PushBackPolicy {
        PushBackPolicy {
            engage_at: 1000,
            release_at: 20,
            min_telemetry_interval_s: 60,
            outbox_per_s: 4,
            ttl_s: 120,
            refresh_s: 30,
        }
    }

    #[test]
    fn engages_near_the_budget_and_lifts_when_the_lag_is_gone() {
        let mut c = Controller::new(policy());
        let first = c.step(10, 100, "service:fleet").unwrap();
        assert!(!first.active, "a stale throttle is replaced at start");
        assert_eq!(c.step(999, 102, "s"), None, "below the budget's half");
        let t = c.step(1000, 104, "service:fleet").unwrap();
        assert!(t.in_force(104));
        assert_eq!((t.min_telemetry_interval_s, t.outbox_per_s), (60, 4));
        assert_eq!(t.expires_at, 224);
        assert!(c.engaged());
        assert_eq!(c.step(5000, 106, "s"), None, "published once");
        assert_eq!(c.step(500, 108, "s"), None, "draining, not gone");
        let refreshed = c.step(300, 134, "s").unwrap();
        assert!(refreshed.in_force(134) && refreshed.expires_at == 254);
        assert_eq!(c.step(20, 136, "s"), None, "one low reading is not enough");
        let lifted = c.step(0, 138, "s").unwrap();
        assert!(!lifted.active);
        assert!(!c.engaged());
        assert_eq!(c.step(0, 140, "s"), None);
    }

    #[test]
    fn a_low_reading_between_high_ones_does_not_lift() {
        let mut c = Controller::new(policy());
        assert!(c.step(2000, 0, "s").unwrap().active, "engaged at once");
        assert_eq!(c.step(0, 2, "s"), None);
        assert_eq!(c.step(50, 4, "s"), None);
        assert_eq!(c.step(0, 6, "s"), None);
        assert!(!c.step(0, 8, "s").unwrap().active);
    }

    #[test]
    fn a_new_holder_decides_afresh() {
        let mut c = Controller::new(policy());
        c.step(2000, 0, "s");
        c.lost_lease();
        assert!(!c.engaged());
        assert!(!c.step(500, 10, "s").unwrap().active);
    }

    #[test]
    fn the_policy_follows_the_budget() {
        let b = edgebind_broker::Budget::default();
        let p = PushBackPolicy::from_budget(&b);
        assert_eq!(p.engage_at, b.limits().push_back_at);
        assert!(p.release_at < p.engage_at);
        assert!(
            p.refresh_s * 2 < p.ttl_s,
            "refreshed well before it expires"
        );
        assert_eq!(p.outbox_per_s, b.throttled_outbox_per_s());
    }
}
