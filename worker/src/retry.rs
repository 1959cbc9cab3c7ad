//! When to try the model again: which failed attempts are worth another one ([`classify`]),
//! and after what wait: exponential backoff with full jitter, floored by the provider's
//! `Retry-After` (seconds or an HTTP date).
use std::time::Duration;

use aichat_shared::backoff::Backoff;
use async_openai::error::OpenAIError;
use chrono::{DateTime, Utc};
use rand::Rng;
use reqwest::StatusCode;

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

/// The longest `Retry-After` taken at its word: a longer one means the same (no job waits a
/// day; it gives up at its deadline), and a wait added to an instant must not overflow it.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// `Retry-After` as seconds (integer or decimal) or an HTTP date, at most a day.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else if let Ok(secs) = value.parse::<f64>() {
        if !(secs.is_finite() && secs >= 0.0) {
            return None;
        }
        Duration::from_secs_f64(secs.min(LONGEST_RETRY_AFTER.as_secs_f64()))
    } else {
        let at = DateTime::parse_from_rfc2822(value).ok()?;
        (at.with_timezone(&Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
    };
    Some(wait.min(LONGEST_RETRY_AFTER))
}

/// Why a model call failed: a short fixed name for logs and metric labels, and what the user
/// is told (never the provider's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    RateLimited,
    /// The shared rate limit kept the call waiting past its deadline.
    RateLimitWait,
    InsufficientQuota,
    ServerError,
    Timeout,
    Conflict,
    Auth,
    NotFound,
    BadRequest,
    BadResponse,
    Connection,
    Stream,
    /// The stream ended before the model said it was done.
    Truncated,
    ClientError,
    /// The question alone does not fit the model's context budget (no call is made).
    TooLong,
}

impl FailureReason {
    /// The reasons a call is tried again for: each is a metric series from the start.
    pub const RETRIED: [FailureReason; 7] = [
        FailureReason::RateLimited,
        FailureReason::ServerError,
        FailureReason::Timeout,
        FailureReason::Conflict,
        FailureReason::Connection,
        FailureReason::Stream,
        FailureReason::BadResponse,
    ];

    /// Failures after which a model with a fallback hands the message over at once instead of
    /// spending its retries: the provider is down or slow (5xx, time-out, connection), or does
    /// not have the model (404). Any other failure falls back once its retries are spent, as
    /// long as none of the reply's text went out.
    pub const fn falls_back_at_once(self) -> bool {
        matches!(
            self,
            FailureReason::ServerError
                | FailureReason::Timeout
                | FailureReason::Connection
                | FailureReason::NotFound
        )
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            FailureReason::RateLimited => "rate_limited",
            FailureReason::RateLimitWait => "rate_limit_wait",
            FailureReason::InsufficientQuota => "insufficient_quota",
            FailureReason::ServerError => "server_error",
            FailureReason::Timeout => "timeout",
            FailureReason::Conflict => "conflict",
            FailureReason::Auth => "auth",
            FailureReason::NotFound => "not_found",
            FailureReason::BadRequest => "bad_request",
            FailureReason::BadResponse => "bad_response",
            FailureReason::Connection => "connection",
            FailureReason::Stream => "stream",
            FailureReason::Truncated => "truncated",
            FailureReason::ClientError => "client_error",
            FailureReason::TooLong => "too_long",
        }
    }

    /// What the user is told when their message failed for this reason.
    pub const fn user_message(self) -> &'static str {
        match self {
            FailureReason::RateLimited | FailureReason::RateLimitWait => {
                "The AI service is busy right now. Please try again in a moment."
            }
            FailureReason::InsufficientQuota | FailureReason::Auth => {
                "The AI service is currently unavailable. Please try again later."
            }
            FailureReason::BadRequest | FailureReason::NotFound | FailureReason::ClientError => {
                "The AI service could not process this message."
            }
            FailureReason::TooLong => "This message is too long for the AI model's context.",
            FailureReason::ServerError
            | FailureReason::Timeout
            | FailureReason::Conflict
            | FailureReason::BadResponse
            | FailureReason::Connection
            | FailureReason::Stream
            | FailureReason::Truncated => "The AI service did not respond. Please try again later.",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one attempt failed. `detail` may hold the provider's text: logs only.
#[derive(Debug)]
pub struct AttemptError {
    pub retryable: bool,
    pub reason: FailureReason,
    pub retry_after: Option<Duration>,
    pub detail: String,
}

impl AttemptError {
    pub fn retryable(reason: FailureReason, retry_after: Option<Duration>, detail: String) -> Self {
        AttemptError {
            retryable: true,
            reason,
            retry_after,
            detail,
        }
    }

    pub fn permanent(reason: FailureReason, detail: String) -> Self {
        AttemptError {
            retryable: false,
            reason,
            retry_after: None,
            detail,
        }
    }
}

/// Sorts a failed attempt into retry-or-not, with a short fixed reason for logs and metrics.
/// `status` and `retry_after` are those of the error response as the transport saw them:
/// async-openai keeps an error's status but drops its headers.
pub fn classify(
    err: OpenAIError,
    status: Option<StatusCode>,
    retry_after: Option<Duration>,
) -> AttemptError {
    match err {
        OpenAIError::ApiError(api) => {
            let detail = format!("HTTP {}: {}", api.status_code, api.api_error.message);
            let quota = api.api_error.r#type.as_deref() == Some("insufficient_quota")
                || api.api_error.code.as_deref() == Some("insufficient_quota");
            classify_status(api.status_code, quota, retry_after, detail)
        }
        // An error response whose body is not OpenAI's JSON: the status still decides.
        OpenAIError::JSONDeserialize(err, _) => match status {
            Some(status) => classify_status(status, false, retry_after, err.to_string()),
            None => AttemptError::retryable(FailureReason::BadResponse, None, err.to_string()),
        },
        OpenAIError::Reqwest(err) if err.is_builder() => {
            AttemptError::permanent(FailureReason::BadRequest, err.to_string())
        }
        OpenAIError::Reqwest(err) if err.is_timeout() => {
            AttemptError::retryable(FailureReason::Timeout, None, err.to_string())
        }
        OpenAIError::Reqwest(err) => {
            AttemptError::retryable(FailureReason::Connection, None, err.to_string())
        }
        OpenAIError::StreamError(err) => {
            AttemptError::retryable(FailureReason::Stream, None, err.to_string())
        }
        OpenAIError::Boxed(err) => {
            AttemptError::retryable(FailureReason::Connection, None, err.to_string())
        }
        other => AttemptError::permanent(FailureReason::ClientError, other.to_string()),
    }
}

fn classify_status(
    status: StatusCode,
    quota: bool,
    retry_after: Option<Duration>,
    detail: String,
) -> AttemptError {
    match status.as_u16() {
        429 if quota => AttemptError::permanent(FailureReason::InsufficientQuota, detail),
        429 => AttemptError::retryable(FailureReason::RateLimited, retry_after, detail),
        408 => AttemptError::retryable(FailureReason::Timeout, retry_after, detail),
        409 => AttemptError::retryable(FailureReason::Conflict, retry_after, detail),
        code if code >= 500 => {
            AttemptError::retryable(FailureReason::ServerError, retry_after, detail)
        }
        401 | 403 => AttemptError::permanent(FailureReason::Auth, detail),
        404 => AttemptError::permanent(FailureReason::NotFound, detail),
        _ => AttemptError::permanent(FailureReason::BadRequest, detail),
    }
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
        for huge in [
            "1e20",
            "18446744073709551615",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            assert_eq!(
                parse_retry_after(huge, now),
                Some(LONGEST_RETRY_AFTER),
                "{huge}"
            );
        }
    }

    #[test]
    fn statuses_split_into_retryable_and_permanent() {
        let cases = [
            (429, false, true, FailureReason::RateLimited),
            (429, true, false, FailureReason::InsufficientQuota),
            (500, false, true, FailureReason::ServerError),
            (503, false, true, FailureReason::ServerError),
            (408, false, true, FailureReason::Timeout),
            (400, false, false, FailureReason::BadRequest),
            (401, false, false, FailureReason::Auth),
            (404, false, false, FailureReason::NotFound),
        ];
        for (code, quota, retryable, reason) in cases {
            let status = StatusCode::from_u16(code).expect("status");
            let err = classify_status(status, quota, None, String::new());
            assert_eq!((err.retryable, err.reason), (retryable, reason), "{code}");
        }
    }
}
