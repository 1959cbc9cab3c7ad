//! The rate limit every worker process shares: requests and tokens per window, per model,
//! enforced atomically by a Lua script in Redis (a sliding-window log, timed by the Redis
//! server's clock so workers on different machines agree).
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use rand::Rng;
use redis::Script;
use redis::aio::ConnectionManager;
use tokio::sync::watch;
use tokio::time::Instant;

use aichat_shared::keys::Namespace;

/// Admits one request if the window has room for it and its tokens.
///
/// KEYS: 1 request log (zset id → admission ms), 2 token log (zset "id:tokens" → admission ms),
/// 3 tokens currently in the window (string).
/// ARGV: 1 how long an admission holds its slot (ms), 2 most requests (0: any), 3 most tokens
/// (0: any), 4 tokens to reserve, 5 reservation id.
/// Returns `{0, now_ms}` when admitted, else `{ms to wait, now_ms}`.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold = tonumber(ARGV[1])
local max_req = tonumber(ARGV[2])
local max_tok = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local cutoff = now - hold

local function tokens_of(member)
  return tonumber(string.match(member, ':(%d+)$')) or 0
end

local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
if #expired > 0 then
  local freed = 0
  for _, member in ipairs(expired) do
    freed = freed + tokens_of(member)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  if redis.call('DECRBY', KEYS[3], freed) < 0 then
    redis.call('SET', KEYS[3], 0)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)

local wait = 0
if max_req > 0 then
  local count = redis.call('ZCARD', KEYS[1])
  if count >= max_req then
    -- the (count - max_req + 1) oldest admissions must leave the window first
    local last = redis.call('ZRANGE', KEYS[1], count - max_req, count - max_req, 'WITHSCORES')
    wait = math.max(wait, tonumber(last[2]) + hold - now)
  end
end
if max_tok > 0 then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  -- a request larger than the whole budget is let through alone rather than never
  if used > 0 and used + tokens > max_tok then
    local need = used + tokens - max_tok
    local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    local freed = 0
    local until_ms = nil
    for i = 1, #entries, 2 do
      freed = freed + tokens_of(entries[i])
      if freed >= need then
        until_ms = tonumber(entries[i + 1])
        break
      end
    end
    if until_ms then
      wait = math.max(wait, until_ms + hold - now)
    else
      wait = math.max(wait, hold)
    end
  end
end
if wait > 0 then
  return {wait, now}
end

redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('ZADD', KEYS[2], now, ARGV[5] .. ':' .. tokens)
redis.call('INCRBY', KEYS[3], tokens)
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], hold + 1000)
end
return {0, now}
"#,
    )
});

/// Replaces a reservation's estimated tokens with the real count.
/// KEYS: 2 and 3 of [`ACQUIRE`]. ARGV: 1 reservation id, 2 reserved tokens, 3 real tokens.
static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local old = ARGV[1] .. ':' .. ARGV[2]
local score = redis.call('ZSCORE', KEYS[1], old)
if not score then
  return 0
end
redis.call('ZREM', KEYS[1], old)
redis.call('ZADD', KEYS[1], score, ARGV[1] .. ':' .. ARGV[3])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[3]) - tonumber(ARGV[2]))
return 1
"#,
    )
});

/// Longest single sleep between two tries, so a waiter notices a freed slot (a settled
/// reservation) without depending on the script's estimate alone.
const MAX_NAP: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests per window; 0 disables the request limit.
    pub requests: u64,
    /// Tokens per window; 0 disables the token limit.
    pub tokens: u64,
    pub window: Duration,
    /// Added to `window` for each admission (see `RATE_LIMIT_MARGIN_MS`).
    pub margin: Duration,
}

impl Limits {
    fn unlimited(&self) -> bool {
        self.requests == 0 && self.tokens == 0
    }

    fn hold_ms(&self) -> u64 {
        u64::try_from((self.window + self.margin).as_millis()).unwrap_or(u64::MAX)
    }
}

/// A granted slot: its tokens can be corrected once the provider reports the real usage.
#[derive(Debug, Clone)]
pub struct Reservation {
    model: String,
    id: String,
    tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("no room under the rate limit before the deadline")]
    DeadlinePassed,
    #[error("the worker is shutting down")]
    Cancelled,
    #[error("rate limit state unavailable: {0}")]
    Redis(#[from] redis::RedisError),
}

/// What one try returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Granted,
    /// Try again after this long.
    Wait(Duration),
}

#[derive(Clone)]
pub struct RateLimiter {
    conn: ConnectionManager,
    ns: Namespace,
    /// Of models the registry gives no limits of their own.
    limits: Limits,
    /// Registry models with limits of their own (`rpm`/`tpm` in `MODELS_FILE`).
    per_model: Arc<HashMap<String, Limits>>,
}

impl RateLimiter {
    pub fn new(conn: ConnectionManager, ns: Namespace, limits: Limits) -> Self {
        RateLimiter {
            conn,
            ns,
            limits,
            per_model: Arc::default(),
        }
    }

    /// The same limiter, with `model`'s own limits.
    pub fn with_model_limits(mut self, model: &str, limits: Limits) -> Self {
        Arc::make_mut(&mut self.per_model).insert(model.to_owned(), limits);
        self
    }

    fn limits(&self, model: &str) -> Limits {
        self.per_model.get(model).copied().unwrap_or(self.limits)
    }

    fn keys(&self, model: &str) -> [String; 3] {
        let base = self.ns.rate_limit(model);
        [
            format!("{base}:requests"),
            format!("{base}:tokens"),
            format!("{base}:token_sum"),
        ]
    }

    /// One atomic try at reserving a request of `tokens` for `model`.
    pub async fn try_acquire(
        &self,
        model: &str,
        tokens: u64,
        id: &str,
    ) -> Result<Admission, redis::RedisError> {
        let [requests, token_log, token_sum] = self.keys(model);
        let limits = self.limits(model);
        let mut conn = self.conn.clone();
        let (wait_ms, _now_ms): (u64, u64) = ACQUIRE
            .key(requests)
            .key(token_log)
            .key(token_sum)
            .arg(limits.hold_ms())
            .arg(limits.requests)
            .arg(limits.tokens)
            .arg(tokens)
            .arg(id)
            .invoke_async(&mut conn)
            .await?;
        Ok(if wait_ms == 0 {
            Admission::Granted
        } else {
            Admission::Wait(Duration::from_millis(wait_ms))
        })
    }

    /// Waits (sleeping, holding no connection to the model) until the window has room, the
    /// `deadline` passes, or `cancel` turns true. Returns the slot, and how long it waited when
    /// it had to.
    pub async fn acquire(
        &self,
        model: &str,
        tokens: u64,
        deadline: Instant,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<(Reservation, Option<Duration>), RateLimitError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let reservation = Reservation {
            model: model.to_owned(),
            id,
            tokens,
        };
        if self.limits(model).unlimited() {
            return Ok((reservation, None));
        }
        let started = Instant::now();
        let mut waited = false;
        loop {
            let wait = match self.try_acquire(model, tokens, &reservation.id).await? {
                Admission::Granted => {
                    return Ok((reservation, waited.then(|| started.elapsed())));
                }
                Admission::Wait(wait) => wait,
            };
            waited = true;
            // A little jitter so waiters of several workers do not all retry in the same ms.
            let nap = wait.min(MAX_NAP) + Duration::from_millis(rand::rng().random_range(0..=20));
            let wake = Instant::now() + nap;
            if wake > deadline {
                return Err(RateLimitError::DeadlinePassed);
            }
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                Ok(_) = cancel.wait_for(|stopping| *stopping) => return Err(RateLimitError::Cancelled),
            }
        }
    }

    /// Corrects the reservation to the tokens really used, giving back (or taking) the
    /// difference. Best effort: the reservation expires with the window anyway.
    pub async fn settle(&self, reservation: &Reservation, used_tokens: u64) {
        if self.limits(&reservation.model).tokens == 0 || used_tokens == reservation.tokens {
            return;
        }
        let [_, token_log, token_sum] = self.keys(&reservation.model);
        let mut conn = self.conn.clone();
        let settled: Result<i64, _> = SETTLE
            .key(token_log)
            .key(token_sum)
            .arg(&reservation.id)
            .arg(reservation.tokens)
            .arg(used_tokens)
            .invoke_async(&mut conn)
            .await;
        if let Err(err) = settled {
            tracing::warn!(error = %err, "could not settle a rate-limit reservation");
        }
    }
}
