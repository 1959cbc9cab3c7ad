//! When to try the model again: exponential backoff with full jitter, floored by the
//! provider's `Retry-After` (seconds or an HTTP date).
use std::time::Duration;

use aichat_shared::backoff::Backoff;
use chrono::{DateTime, Utc};
use rand::Rng;

/// How hard to try before a message is given up.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    /// Longest silence of one attempt: before the response headers, or between two chunks.
    pub attempt_timeout: Duration,
    /// No new attempt or rate-limit wait starts past this much time after the first one.
    pub max_total: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl RetryPolicy {
    /// Full jitter: uniform in `[0, min(max, base × 2^(failures-1))]`.
    pub fn backoff(&self, failures: u32, rng: &mut impl Rng) -> Duration {
        Backoff::new(self.backoff_base, self.backoff_max).delay_with(failures, rng)
    }

    /// The wait before the next attempt: the backoff, but never shorter than `Retry-After`.
    pub fn delay(
        &self,
        failures: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        let backoff = self.backoff(failures, rng);
        retry_after.map_or(backoff, |server| server.max(backoff))
    }
}

/// `Retry-After` as seconds (integer or decimal) or an HTTP date.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            attempt_timeout: Duration::from_secs(60),
            max_total: Duration::from_secs(120),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(4),
        }
    }

    #[test]
    fn backoff_is_jittered_below_a_doubling_capped_ceiling() {
        let policy = policy();
        let mut rng = StdRng::seed_from_u64(7);
        for (failures, ceiling_ms) in [(1, 500), (2, 1000), (3, 2000), (4, 4000), (9, 4000)] {
            let samples: Vec<Duration> = (0..200)
                .map(|_| policy.backoff(failures, &mut rng))
                .collect();
            assert!(
                samples
                    .iter()
                    .all(|d| *d <= Duration::from_millis(ceiling_ms))
            );
            // Full jitter spreads over the whole range, not just near the top.
            assert!(
                samples
                    .iter()
                    .any(|d| *d < Duration::from_millis(ceiling_ms / 4))
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor_for_the_delay() {
        let policy = policy();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let delay = policy.delay(1, Some(Duration::from_secs(3)), &mut rng);
            assert!(delay >= Duration::from_secs(3));
        }
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:27:50Z")
            .map(|d| d.with_timezone(&Utc))
            .expect("date");
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after(" 0.5 ", now),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }
}
