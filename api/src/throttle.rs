//! Login and registration throttling, shared by every API instance through Redis.
//!
//! - Sliding windows of `AUTH_WINDOW_SECS`: login attempts per client address and per
//!   username, registrations per client address. An attempt over any limit is refused with 429
//!   before anything is looked up or hashed, with the same body whether or not the user exists.
//! - Failures per username: after `LOGIN_FAILURES_BEFORE_BACKOFF` consecutive failures (each
//!   within `AUTH_WINDOW_SECS` of the last until the first lock) each further one locks the
//!   username for twice as long as the last (1 s, 2 s, 4 s …, at most `LOGIN_BACKOFF_MAX_SECS`);
//!   a successful login clears it.
//!
//! Usernames are hashed into the keys, so key length is bounded and no name is stored.
use std::net::IpAddr;
use std::sync::LazyLock;

use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Counts one attempt in every window of `KEYS[2..]` unless one is full or the username lock
/// `KEYS[1]` is held; answers the milliseconds to wait (0: admitted). `ARGV`: window ms, then
/// the limit of each window key, then a member unique to this attempt. Redis's clock, so every
/// instance agrees.
static ADMIT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local wait = 0
local locked = tonumber(redis.call('hget', KEYS[1], 'until') or '0')
if locked > now then wait = locked - now end
for i = 2, #KEYS do
  local key = KEYS[i]
  redis.call('zremrangebyscore', key, '-inf', now - window)
  if redis.call('zcard', key) >= tonumber(ARGV[i]) then
    local oldest = redis.call('zrange', key, 0, 0, 'withscores')
    local left = tonumber(oldest[2]) + window - now
    if left > wait then wait = left end
  end
end
if wait > 0 then return wait end
for i = 2, #KEYS do
  redis.call('zadd', KEYS[i], now, ARGV[#ARGV])
  redis.call('pexpire', KEYS[i], window)
end
return 0
"#,
    )
});

/// Records a failed login of one username; `ARGV`: failures before backoff, longest lock ms,
/// window ms. Until a lock exists the count lives one window past its last failure, so a failed
/// guess of an unknown name (every one of which is recorded, alike with known names) costs
/// Redis a key for minutes, not a day; a locked name's count lives a day past its longest lock.
static FAILED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = redis.call('hincrby', KEYS[1], 'n', 1)
local free = tonumber(ARGV[1])
local longest = tonumber(ARGV[2])
if n >= free then
  local lock = math.min(1000 * 2 ^ math.min(n - free, 40), longest)
  redis.call('hset', KEYS[1], 'until', now + lock)
  redis.call('pexpire', KEYS[1], longest + 86400000)
else
  redis.call('pexpire', KEYS[1], tonumber(ARGV[3]))
end
return n
"#,
    )
});

/// Attempts refused by a window or a lock, by action.
pub const THROTTLED_METRIC: &str = "aichat_auth_throttled_total";
/// Logins refused for wrong credentials.
pub const FAILED_LOGINS_METRIC: &str = "aichat_login_failures_total";

/// What an attempt is.
#[derive(Debug, Clone, Copy)]
pub enum Attempt {
    Login,
    Register,
}

impl Attempt {
    fn name(self) -> &'static str {
        match self {
            Attempt::Login => "login",
            Attempt::Register => "register",
        }
    }
}

/// Admits one attempt from `address` (and, for a login, for `username`), or answers 429 with
/// the seconds to wait.
pub async fn admit(
    state: &AppState,
    attempt: Attempt,
    address: Option<IpAddr>,
    username: &str,
) -> ApiResult<()> {
    let settings = &state.settings;
    let ns = &state.ns;
    let user = subject(username);
    let mut windows: Vec<(String, u64)> = Vec::with_capacity(2);
    let per_address = match attempt {
        Attempt::Login => settings.login_attempts_per_address,
        Attempt::Register => settings.registrations_per_address,
    };
    if per_address > 0
        && let Some(address) = address
    {
        windows.push((
            ns.auth_window(attempt.name(), "address", &subject(&address.to_string())),
            per_address,
        ));
    }
    if matches!(attempt, Attempt::Login) && settings.login_attempts_per_username > 0 {
        windows.push((
            ns.auth_window(attempt.name(), "username", &user),
            settings.login_attempts_per_username,
        ));
    }
    let lock = ns.login_failures(&user);
    let mut script = ADMIT.prepare_invoke();
    script.key(&lock);
    script.arg(settings.auth_window_secs.saturating_mul(1000));
    for (key, limit) in &windows {
        script.key(key);
        script.arg(*limit);
    }
    script.arg(uuid::Uuid::new_v4().simple().to_string());
    let mut redis = state.redis.clone();
    let wait_ms: u64 = script
        .invoke_async(&mut redis)
        .await
        .map_err(aichat_shared::Error::from)?;
    if wait_ms > 0 {
        metrics::counter!(THROTTLED_METRIC, "action" => attempt.name()).increment(1);
        return Err(ApiError::TooManyAttempts {
            retry_after_secs: wait_ms.div_ceil(1000).max(1),
        });
    }
    Ok(())
}

/// Records a failed login for `username` (its backoff grows).
pub async fn login_failed(state: &AppState, username: &str) -> ApiResult<()> {
    metrics::counter!(FAILED_LOGINS_METRIC).increment(1);
    let settings = &state.settings;
    let mut redis = state.redis.clone();
    let _: i64 = FAILED
        .key(state.ns.login_failures(&subject(username)))
        .arg(settings.login_failures_before_backoff.max(1))
        .arg(settings.login_backoff_max_secs.saturating_mul(1000))
        .arg(settings.auth_window_secs.saturating_mul(1000))
        .invoke_async(&mut redis)
        .await
        .map_err(aichat_shared::Error::from)?;
    Ok(())
}

/// Clears `username`'s failures after a successful login.
pub async fn login_succeeded(state: &AppState, username: &str) -> ApiResult<()> {
    let mut redis = state.redis.clone();
    let _: i64 = redis::cmd("DEL")
        .arg(state.ns.login_failures(&subject(username)))
        .query_async(&mut redis)
        .await
        .map_err(aichat_shared::Error::from)?;
    Ok(())
}

/// A key-safe, bounded stand-in for a username or an address.
fn subject(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..16])
}
