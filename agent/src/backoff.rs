//! Reconnect delays: capped exponential backoff with full jitter (the delay
//! is uniform below a cap that doubles per failure), so a fleet that lost
//! its broker at the same instant does not come back in lockstep.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cap: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        // Per-process random seed from the standard library's SipHash keys
        // (OS randomness): no extra crate for a few random numbers.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Backoff::with_seed(min, max, seed)
    }

    pub fn with_seed(min: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            cap: min,
            rng: splitmix64(seed) | 1,
        }
    }

    /// The next delay; the cap doubles up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let cap_ms = self.cap.as_millis().max(1) as u64;
        let delay = Duration::from_millis(self.random() % (cap_ms + 1));
        self.cap = (self.cap * 2).min(self.max);
        delay
    }

    /// The current cap (the largest delay the next call can return).
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// After a connection that proved stable.
    pub fn reset(&mut self) {
        self.cap = self.min;
    }

    fn random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Spreads nearby seeds (pids, counters) over the whole state space.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_doubles_to_the_maximum_and_delays_stay_below_it() {
        let mut b = Backoff::with_seed(Duration::from_millis(100), Duration::from_secs(2), 7);
        let mut caps = Vec::new();
        for _ in 0..8 {
            let cap = b.cap();
            let d = b.next_delay();
            assert!(d <= cap, "{d:?} > {cap:?}");
            caps.push(cap.as_millis());
        }
        assert_eq!(caps, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.cap(), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_spread_not_in_lockstep() {
        let delays: Vec<_> = (0..50u64)
            .map(|seed| {
                let mut b =
                    Backoff::with_seed(Duration::from_secs(10), Duration::from_secs(10), seed);
                b.next_delay().as_millis()
            })
            .collect();
        let mut distinct = delays.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 40, "{delays:?}");
    }
}
