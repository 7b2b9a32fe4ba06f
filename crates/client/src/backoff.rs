//! The reconnect schedule: exponential backoff with jitter.
//!
//! Round `n` (0-based, counted since the last successful HELLO) waits a
//! uniformly random delay in `[c/2, c]` with `c = min(min_delay · 2ⁿ,
//! max_delay)` before trying the endpoints again ("equal jitter": never a
//! hot loop, and many clients cut off together do not come back in step).
//! The first round after a disconnect also waits, so a server that accepts
//! and drops connections costs at most a few attempts per second.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with equal jitter.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A schedule from `min` doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The next delay, in `[ceiling/2, ceiling]`; advances the schedule.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rng.gen_range(0..=spread))
    }

    /// The same schedule as if `attempts` rounds had passed.
    pub fn after(mut self, attempts: u32) -> Backoff {
        self.attempt = attempts;
        self
    }

    /// Start over (after a successful HELLO).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Rounds since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let mut b = Backoff::new(100 * MS, 2000 * MS);
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = vec![];
        for _ in 0..8 {
            ceilings.push(b.ceiling());
            b.next_delay(&mut rng);
        }
        let want: Vec<Duration> = [100, 200, 400, 800, 1600, 2000, 2000, 2000]
            .iter()
            .map(|&m| m * MS)
            .collect();
        assert_eq!(ceilings, want);
        assert_eq!(b.attempts(), 8);
        b.reset();
        assert_eq!(b.ceiling(), 100 * MS);
    }

    #[test]
    fn delays_are_jittered_within_half_to_full() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut b = Backoff::new(100 * MS, 2000 * MS);
            for _ in 0..10 {
                let c = b.ceiling();
                let d = b.next_delay(&mut rng);
                assert!(d >= c / 2 && d <= c, "{d:?} outside [{:?}, {c:?}]", c / 2);
                seen.insert(d);
            }
        }
        assert!(seen.len() > 100, "jitter spreads the delays");
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX);
        let mut rng = StdRng::seed_from_u64(0);
        for _ in 0..100 {
            b.next_delay(&mut rng);
        }
        assert!(b.ceiling() >= Duration::from_secs(1 << 30));
        let mut b = Backoff::new(5 * MS, MS);
        assert_eq!(b.ceiling(), 5 * MS, "max below min is raised to min");
        assert!(b.next_delay(&mut rng) <= 5 * MS);
    }
}
