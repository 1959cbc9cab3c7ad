//! Exponential backoff: how long a retry loop waits before its next attempt. Every retry loop
//! of the workspace takes its waits from here: the ceiling alone (deterministic), full jitter,
//! or half jitter.
use std::time::Duration;

use rand::Rng;

/// Waits that double from `base` up to `max`, each drawn uniformly below its ceiling so that
/// callers that failed together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max }
    }

    /// The ceiling after `failures` failures (1 for the first): `min(max, base × 2^(failures-1))`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doubling = 1u32 << failures.saturating_sub(1).min(20);
        self.base.saturating_mul(doubling).min(self.max)
    }

    /// The wait after `failures` failures: uniform in `[0, ceiling]`.
    pub fn delay(&self, failures: u32) -> Duration {
        self.delay_with(failures, &mut rand::rng())
    }

    /// The wait after `failures` failures with half of it fixed: in `[ceiling / 2, ceiling]`
    /// (no wait before the first attempt, `failures == 0`). For loops that must not spin while
    /// still spreading callers that failed together.
    pub fn delay_at_least_half(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let half = self.ceiling(failures) / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    /// [`Backoff::delay`] drawn from `rng` (a seeded one in tests).
    pub fn delay_with(&self, failures: u32, rng: &mut impl Rng) -> Duration {
        let ceiling_us = u64::try_from(self.ceiling(failures).as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rng.random_range(0..=ceiling_us))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_up_to_the_maximum_and_every_wait_stays_under_it() {
        let backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(70));
        let ceilings: Vec<u128> = (1..=5).map(|f| backoff.ceiling(f).as_millis()).collect();
        assert_eq!(ceilings, [10, 20, 40, 70, 70]);
        for failures in 1..=5 {
            for _ in 0..100 {
                assert!(backoff.delay(failures) <= backoff.ceiling(failures));
            }
        }
    }
}
