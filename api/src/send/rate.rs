//! The per-user send rate limit, shared by every API instance through Redis: a fixed window of
//! a minute per user, opened by the first send after the last one ended.
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::{ApiError, ApiResult};
use crate::send::limits::{LimitsLeft, RateLeft};
use crate::state::AppState;

const WINDOW: Duration = Duration::from_secs(60);

/// Counts one send in the user's current window; returns the count and the window's
/// remaining milliseconds.
static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local count = redis.call('incr', KEYS[1])
if count == 1 then redis.call('pexpire', KEYS[1], ARGV[1]) end
local ttl = redis.call('pttl', KEYS[1])
if ttl < 0 then redis.call('pexpire', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return { count, ttl }
"#,
    )
});

/// One send counted: whether it is within the limit, and where the user stands after it.
#[derive(Debug, Clone, Copy)]
pub struct Counted {
    pub admitted: bool,
    pub left: RateLeft,
}

/// Counts one send of `user_id` in their current window; `None` when there is no send rate.
pub async fn count(state: &AppState, user_id: i64) -> ApiResult<Option<Counted>> {
    let limit = state.settings.send_rate_per_minute;
    if limit == 0 {
        return Ok(None);
    }
    let mut conn = state.redis.clone();
    let (count, ttl_ms): (u64, u64) = SCRIPT
        .key(state.ns.send_rate(user_id))
        .arg(WINDOW.as_millis() as u64)
        .invoke_async(&mut conn)
        .await
        .map_err(aichat_shared::Error::from)?;
    Ok(Some(Counted {
        admitted: count <= limit,
        left: RateLeft {
            limit,
            remaining: limit.saturating_sub(count),
            reset_secs: reset_secs(ttl_ms),
        },
    }))
}

/// Admits one send of `user_id` (what is left of the rate, `None` without one), or answers
/// 429 with the seconds until the window ends.
pub async fn admit(state: &AppState, user_id: i64) -> ApiResult<Option<RateLeft>> {
    match count(state, user_id).await? {
        Some(counted) if !counted.admitted => Err(ApiError::TooManyRequests {
            retry_after_secs: counted.left.reset_secs,
            left: LimitsLeft {
                rate: Some(counted.left),
                budget: None,
            },
        }),
        counted => Ok(counted.map(|counted| counted.left)),
    }
}

/// Where a user stands in the send rate, counting nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateNow {
    pub limit: u64,
    pub remaining: u64,
    /// When the current window ends; `None` when no window is open (no send in the last
    /// minute): the next send opens one.
    pub resets_at: Option<DateTime<Utc>>,
}

/// Where `user_id` stands in the send rate; `None` when there is no send rate.
pub async fn peek(
    state: &AppState,
    user_id: i64,
    now: DateTime<Utc>,
) -> ApiResult<Option<RateNow>> {
    let limit = state.settings.send_rate_per_minute;
    if limit == 0 {
        return Ok(None);
    }
    let key = state.ns.send_rate(user_id);
    let (count, ttl_ms): (Option<u64>, i64) = redis::pipe()
        .get(&key)
        .pttl(&key)
        .query_async(&mut state.redis.clone())
        .await
        .map_err(aichat_shared::Error::from)?;
    // A key without a time to live (-1) or gone between the two reads (-2) is no window.
    Ok(Some(match count.filter(|_| ttl_ms >= 0) {
        Some(count) => RateNow {
            limit,
            remaining: limit.saturating_sub(count),
            resets_at: Some(now + chrono::Duration::milliseconds(ttl_ms)),
        },
        None => RateNow {
            limit,
            remaining: limit,
            resets_at: None,
        },
    }))
}

/// Whole seconds until a window with `ttl_ms` left ends, at least 1.
fn reset_secs(ttl_ms: u64) -> u64 {
    ttl_ms.div_ceil(1000).max(1)
}
