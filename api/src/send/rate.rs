//! The per-user send rate limit, shared by every API instance through Redis.
use std::time::Duration;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

const WINDOW: Duration = Duration::from_secs(60);

/// Counts one send in the user's current window; returns the count and the window's
/// remaining milliseconds.
const SCRIPT: &str = r#"
local count = redis.call('incr', KEYS[1])
if count == 1 then redis.call('pexpire', KEYS[1], ARGV[1]) end
local ttl = redis.call('pttl', KEYS[1])
if ttl < 0 then redis.call('pexpire', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return { count, ttl }
"#;

/// Admits one message of `user_id`, or answers 429 with the seconds until the window ends.
pub async fn admit(state: &AppState, user_id: i64) -> ApiResult<()> {
    let limit = state.settings.send_rate_per_minute;
    if limit == 0 {
        return Ok(());
    }
    let mut conn = state.redis.clone();
    let (count, ttl_ms): (u64, u64) = redis::Script::new(SCRIPT)
        .key(state.ns.send_rate(user_id))
        .arg(WINDOW.as_millis() as u64)
        .invoke_async(&mut conn)
        .await
        .map_err(aichat_shared::Error::from)?;
    if count > limit {
        return Err(ApiError::TooManyRequests {
            retry_after_secs: ttl_ms.div_ceil(1000).max(1),
        });
    }
    Ok(())
}
