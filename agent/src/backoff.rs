//! Reconnect delays.
//!
//! Without a fleet hint: capped exponential backoff with full jitter (the
//! delay is uniform below a cap that doubles per failure, from
//! `reconnect_min_ms` to `reconnect_max_s`), so a lone device that lost its
//! link is back within a second or so and keeps trying every half minute.
//!
//! That schedule fails a fleet. When thousands of devices lose the broker at
//! the same instant, every one of them retries within `reconnect_min_ms`:
//! measured with 5,000 simulated devices, 2,271 handshakes reached a broker
//! that accepts ~70–90 a second, in the second after its return, and the
//! overload turned into timeouts and more retries. After a long outage the
//! caps have all grown to `reconnect_max_s`, so the fleet offers
//! N ÷ (max/2) attempts a second and the last device waits up to `max`.
//! No device can fix that alone: it does not know how many others failed
//! with it nor what the broker can take.
//!
//! With the fleet's reconnect hint (`edgebind_protocol::reconnect`: a window
//! W = fleet size ÷ the broker's accept rate, retained, remembered across
//! reboots) the schedule is:
//! - the first retry after a connection is lost (or the first connection
//!   fails) waits uniformly in [0, W]: the fleet offers about N ÷ W
//!   attempts a second, what the broker accepts, and all are done within W;
//! - every further retry waits uniformly in [3W/4, W]. The phases that the
//!   first retry spread stay spread, so after an outage of any length the
//!   broker again sees about N ÷ W a second (at most 4/3 of it), and every
//!   device tries once within W of its return. A shorter retry would only
//!   pile refused devices onto the second the broker comes back; a longer
//!   one would miss the "back within W" bound.
//!
//! The window replaces the cap: it is the fleet's statement of its own size
//! and the broker's capacity, which a device's `reconnect_max_s` cannot know.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cap: Duration,
    /// Failed attempts since the last reset: the first is spread over the
    /// whole window, the others over its last quarter.
    failures: u32,
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
            failures: 0,
            rng: splitmix64(seed) | 1,
        }
    }

    /// The next delay, with the fleet's reconnect window if there is one
    /// (see the module documentation); without one the cap doubles up to
    /// `max`.
    pub fn next_delay_in(&mut self, window: Option<Duration>) -> Duration {
        let delay = match window.filter(|w| !w.is_zero()) {
            Some(w) if self.failures == 0 => self.uniform(Duration::ZERO, w),
            Some(w) => self.uniform(w - w / 4, w),
            None => self.uniform(Duration::ZERO, self.cap),
        };
        self.failures = self.failures.saturating_add(1);
        self.cap = (self.cap * 2).min(self.max);
        delay
    }

    /// The next delay without a window: full jitter below a doubling cap.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_in(None)
    }

    /// Uniform in `[lo, hi]`, in whole milliseconds.
    fn uniform(&mut self, lo: Duration, hi: Duration) -> Duration {
        let lo_ms = lo.as_millis() as u64;
        let hi_ms = (hi.as_millis() as u64).max(lo_ms);
        Duration::from_millis(lo_ms + self.random() % (hi_ms - lo_ms + 1))
    }

    /// The current cap (the largest delay the next call can return).
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// After a connection that proved stable.
    pub fn reset(&mut self) {
        self.cap = self.min;
        self.failures = 0;
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

    /// First delays of `n` devices (seeds) that lost the broker together.
    fn first_delays(n: u64, window: Duration) -> Vec<Duration> {
        (0..n)
            .map(|seed| {
                let mut b =
                    Backoff::with_seed(Duration::from_millis(500), Duration::from_secs(60), seed);
                b.next_delay_in(Some(window))
            })
            .collect()
    }

    #[test]
    fn with_a_window_the_first_retries_spread_evenly_over_it() {
        let w = Duration::from_secs(50);
        let delays = first_delays(5000, w);
        assert!(delays.iter().all(|d| *d <= w));
        // Each tenth of the window gets about a tenth (500) of the fleet.
        let mut tenths = [0u32; 10];
        for d in &delays {
            tenths[((d.as_secs_f64() / w.as_secs_f64() * 10.0) as usize).min(9)] += 1;
        }
        for (i, n) in tenths.iter().enumerate() {
            assert!(
                (400..=600).contains(n),
                "tenth {i}: {n} of 5000: {tenths:?}"
            );
        }
    }

    #[test]
    fn with_a_window_later_retries_stay_in_its_last_quarter_and_never_exceed_it() {
        let w = Duration::from_secs(40);
        let mut b = Backoff::with_seed(Duration::from_millis(500), Duration::from_secs(5), 3);
        let first = b.next_delay_in(Some(w));
        assert!(first <= w);
        let mut later = Vec::new();
        for _ in 0..200 {
            let d = b.next_delay_in(Some(w));
            assert!(d >= Duration::from_secs(30) && d <= w, "{d:?}");
            later.push(d);
        }
        // Spread over the quarter, not one value: the phases stay apart.
        let (lo, hi) = (later.iter().min().unwrap(), later.iter().max().unwrap());
        assert!(*hi - *lo > Duration::from_secs(8), "{lo:?}..{hi:?}");
        // A stable connection resets it: the next loss spreads over all of W.
        b.reset();
        let again: Vec<_> = (0..50)
            .map(|_| {
                let d = b.next_delay_in(Some(w));
                b.reset();
                d
            })
            .collect();
        assert!(
            again.iter().any(|d| *d < Duration::from_secs(10)),
            "{again:?}"
        );
    }

    #[test]
    fn a_window_withdrawn_or_zero_falls_back_to_the_configured_backoff() {
        let mut b = Backoff::with_seed(Duration::from_millis(100), Duration::from_secs(2), 9);
        for _ in 0..3 {
            b.next_delay_in(Some(Duration::from_secs(30)));
        }
        // The cap kept doubling meanwhile: a withdrawn hint resumes there.
        assert_eq!(b.cap(), Duration::from_millis(800));
        assert!(b.next_delay() <= Duration::from_millis(800));
        for _ in 0..20 {
            assert!(b.next_delay_in(Some(Duration::ZERO)) <= Duration::from_secs(2));
        }
    }
}
