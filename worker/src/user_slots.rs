//! Fair queuing between users: at most `WORKER_PER_USER_CONCURRENCY` jobs of one user run at
//! once across every worker, so a user who queued hundreds of messages holds a few workers, not
//! all of them, and other users' jobs are not held behind that backlog.
//!
//! A job of a user at the cap waits in its worker without holding one of the worker's
//! `WORKER_CONCURRENCY` model slots (the worker takes up to `WORKER_WAITING_JOBS` more jobs than
//! it runs, for this). The user's turns are shared in Redis, in two sorted sets under
//! `Namespace::user_slots`:
//! - `:running`: the message ids of the user's running jobs, scored by when their lease ends.
//!   A running job renews its lease; a job whose worker died stops renewing, and its turn is
//!   free once the lease ends (`WORKER_USER_SLOT_LEASE_SECS`);
//! - `:waiting`: the message ids of the jobs waiting for a turn, scored by id, so turns go in
//!   the order the messages were sent (a chat's messages run in order). A waiting job keeps a
//!   short-lived sign of life (`:alive:{id}`); one whose worker died is passed over.
use std::sync::LazyLock;
use std::time::Duration;

use rand::Rng;
use redis::Script;
use redis::aio::ConnectionManager;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use aichat_shared::keys::Namespace;

/// Takes a turn for message `ARGV[1]` if one is free and no live job of the user sent before it
/// waits. KEYS: 1 running, 2 waiting. ARGV: 1 message id, 2 the cap, 3 lease ms, 4 how long a
/// waiting job's sign of life lasts (ms), 5 the prefix of the signs of life, 6 how long the two
/// sets outlive their last use (ms, [`UserSlots::keep`]).
/// Returns `{1, 0}` when the turn is taken (or renewed), else `{0, jobs waiting ahead}`.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
local cap = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local alive = ARGV[5]
local keep = tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], me) then
  redis.call('ZADD', KEYS[1], now + lease, me)
  redis.call('PEXPIRE', KEYS[1], keep)
  return {1, 0}
end
redis.call('SET', alive .. me, 1, 'PX', ARGV[4])
redis.call('ZADD', KEYS[2], 'NX', me, me)
redis.call('PEXPIRE', KEYS[2], keep)
local free = cap - redis.call('ZCARD', KEYS[1])
local ahead = 0
local gone = {}
local offset = 0
while ahead < free do
  local batch = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. me, 'LIMIT', offset, 100)
  if #batch == 0 then break end
  for _, id in ipairs(batch) do
    if redis.call('EXISTS', alive .. id) == 1 then
      ahead = ahead + 1
    else
      table.insert(gone, id)
    end
  end
  offset = offset + #batch
end
for _, id in ipairs(gone) do
  redis.call('ZREM', KEYS[2], id)
end
if ahead < free then
  redis.call('ZREM', KEYS[2], me)
  redis.call('DEL', alive .. me)
  redis.call('ZADD', KEYS[1], now + lease, me)
  redis.call('PEXPIRE', KEYS[1], keep)
  return {1, 0}
end
return {0, redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. me)}
"#,
    )
});

/// Extends a running job's lease, and the running set's life with it: a job that holds its
/// turn longer than the set's expiry must not see the set (every turn in it) vanish. KEYS: 1
/// running. ARGV: 1 message id, 2 lease ms, 3 keep ms.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local changed = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return changed
"#,
    )
});

/// How long a waiting job's sign of life lasts: several of its longest naps.
const ALIVE_FOR: Duration = Duration::from_secs(5);
/// Longest nap between two looks at the user's turns.
const MAX_NAP: Duration = Duration::from_secs(1);
/// A nap per turn ahead, so jobs far back in line look less often.
const NAP_PER_TURN_AHEAD: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("the worker is shutting down")]
    ShuttingDown,
    #[error("the user's turns are unavailable: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The per-user cap of this worker (`WORKER_PER_USER_CONCURRENCY`; 0: none).
#[derive(Clone)]
pub struct UserSlots {
    redis: ConnectionManager,
    ns: Namespace,
    cap: u32,
    lease: Duration,
}

/// A user's turn, held while the job runs: its lease is renewed until it is dropped, then
/// given back.
pub struct Turn {
    slots: UserSlots,
    user_id: i64,
    message_id: i64,
    renewal: JoinHandle<()>,
}

impl UserSlots {
    pub fn new(redis: ConnectionManager, ns: Namespace, cap: u32, lease: Duration) -> Self {
        UserSlots {
            redis,
            ns,
            cap,
            lease,
        }
    }

    fn keys(&self, user_id: i64) -> (String, String, String) {
        let base = self.ns.user_slots(user_id);
        (
            format!("{base}:running"),
            format!("{base}:waiting"),
            format!("{base}:alive:"),
        )
    }

    fn millis(duration: Duration) -> u64 {
        u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
    }

    /// How long the user's sets outlive their last use (ms): twice the longer of a lease and a
    /// sign of life, so every member's score ends before its set does. Each renewal and each
    /// look of a waiting job (at least every [`MAX_NAP`]) extends it.
    fn keep(&self) -> u64 {
        Self::millis(self.lease.max(ALIVE_FOR)).saturating_mul(2)
    }

    /// Waits for a turn of `user_id` for `message_id`; `None` when there is no cap.
    pub async fn take(
        &self,
        user_id: i64,
        message_id: i64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<Turn>, WaitError> {
        if self.cap == 0 {
            return Ok(None);
        }
        let (running, waiting, alive) = self.keys(user_id);
        let mut waited = false;
        loop {
            if *shutdown.borrow() {
                return Err(WaitError::ShuttingDown);
            }
            let (taken, ahead): (i64, u64) = TAKE
                .key(&running)
                .key(&waiting)
                .arg(message_id)
                .arg(self.cap)
                .arg(Self::millis(self.lease))
                .arg(Self::millis(ALIVE_FOR))
                .arg(&alive)
                .arg(self.keep())
                .invoke_async(&mut self.redis.clone())
                .await?;
            if taken == 1 {
                if waited {
                    tracing::debug!(user_id, "the user's turn came");
                }
                return Ok(Some(self.turn(user_id, message_id)));
            }
            if !waited {
                crate::metrics::user_turn_waited();
                waited = true;
            }
            let turns_ahead = u32::try_from(ahead / u64::from(self.cap)).unwrap_or(u32::MAX);
            let nap = NAP_PER_TURN_AHEAD
                .saturating_mul(turns_ahead.saturating_add(1))
                .min(MAX_NAP)
                + Duration::from_millis(rand::rng().random_range(0..=20));
            tokio::select! {
                () = tokio::time::sleep(nap) => {}
                Ok(_) = shutdown.wait_for(|stopping| *stopping) => {
                    return Err(WaitError::ShuttingDown);
                }
            }
        }
    }

    fn turn(&self, user_id: i64, message_id: i64) -> Turn {
        let slots = self.clone();
        let (running, _, _) = self.keys(user_id);
        let lease = self.lease;
        let keep = self.keep();
        let renewal = tokio::spawn(async move {
            let mut redis = slots.redis.clone();
            loop {
                tokio::time::sleep(lease / 3).await;
                let renewed: Result<i64, _> = RENEW
                    .key(&running)
                    .arg(message_id)
                    .arg(Self::millis(lease))
                    .arg(keep)
                    .invoke_async(&mut redis)
                    .await;
                if let Err(err) = renewed {
                    tracing::warn!(error = %err, "could not renew the user's turn");
                }
            }
        });
        Turn {
            slots: self.clone(),
            user_id,
            message_id,
            renewal,
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.renewal.abort();
        let (running, _, _) = self.slots.keys(self.user_id);
        let mut redis = self.slots.redis.clone();
        let message_id = self.message_id;
        // Given back at once; if Redis refuses, the lease ends by itself.
        tokio::spawn(async move {
            let released: Result<i64, _> = redis::cmd("ZREM")
                .arg(&running)
                .arg(message_id)
                .query_async(&mut redis)
                .await;
            if let Err(err) = released {
                tracing::warn!(error = %err, "could not give back the user's turn");
            }
        });
    }
}
