//! Per-user daily token budgets, held in Redis so every API instance and worker shares them:
//! the API reserves an estimate before the message is queued, the worker settles it to the
//! real usage once the reply is saved (or releases it when the message fails). Each user-day
//! has two counters: the total that counts against the budget (used and reserved), and the
//! part of it still reserved; both change together in one script.
use std::sync::LazyLock;

use chrono::{DateTime, NaiveDate, Utc};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::keys::Namespace;

/// What a queued message holds of its user's budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The Redis key of the user's day.
    pub key: String,
    /// Tokens reserved for this message.
    pub tokens: i64,
    /// The UTC day of `key`, stored with the message so the reservation can be found again
    /// from the message alone (`Reservation::of_message`). Absent in jobs queued before it
    /// existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<NaiveDate>,
}

impl Reservation {
    /// The reservation a message recorded (`budget_day`, `budget_tokens`), if it holds one.
    pub fn of_message(
        ns: &Namespace,
        user_id: i64,
        day: Option<NaiveDate>,
        tokens: Option<i32>,
    ) -> Option<Reservation> {
        let (day, tokens) = (day?, tokens?);
        Some(Reservation {
            key: day_key(ns, user_id, day),
            tokens: i64::from(tokens),
            day: Some(day),
        })
    }

    /// The reservation as a message records it (`budget_day`, `budget_tokens`); `None` for one
    /// of a job queued before reservations had a day.
    pub fn stored(&self) -> Option<(NaiveDate, i32)> {
        Some((self.day?, i32::try_from(self.tokens).unwrap_or(i32::MAX)))
    }
}

/// The key beside a user's day (`Namespace::budget`, the day's total: used and reserved
/// together) that holds the part of it still reserved by sends waiting for their reply, so
/// that the two can be told apart (`GET /api/ai/quota/`). Derived from the total's key, so a
/// reservation (which records that key) finds it, and both share any hash tag of the namespace.
fn reserved_key(total_key: &str) -> String {
    format!("{total_key}:reserved")
}

/// The UTC day of `now`, as budget keys spell it.
fn day_of(now: DateTime<Utc>) -> NaiveDate {
    now.date_naive()
}

fn day_key(ns: &Namespace, user_id: i64, day: NaiveDate) -> String {
    ns.budget(user_id, &day.format("%Y-%m-%d").to_string())
}

/// Reserves ARGV[1] tokens if the day's total (KEYS[1]) stays within ARGV[2], counting them in
/// the total and in the reserved part (KEYS[2]); both live two days. Returns whether it did,
/// and the total after.
static RESERVE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local total = tonumber(redis.call('get', KEYS[1]) or '0')
if total + tonumber(ARGV[1]) > tonumber(ARGV[2]) then
  return {0, total}
end
total = redis.call('incrby', KEYS[1], ARGV[1])
redis.call('incrby', KEYS[2], ARGV[1])
redis.call('expire', KEYS[1], 172800)
redis.call('expire', KEYS[2], 172800)
return {1, total}
"#,
    )
});

/// Replaces a reservation of ARGV[1] tokens by ARGV[2] really used: the total (KEYS[1]) moves
/// by the difference, the reserved part (KEYS[2]) gives the reservation up. A day whose total
/// is gone is left alone when it is past (expired: nothing would hold the use against a budget
/// any more) or when the settle would take tokens off it (lost with Redis: the total would go
/// below 0); a use beyond the reservation on today's missing total (ARGV[3] = 1) starts it, as
/// a re-drive's reservation of 0 does on a day its user has sent nothing. The reserved part
/// never goes below 0: a reservation made before it was counted (by an older version) has
/// nothing there to give up.
static SETTLE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local reserved = tonumber(ARGV[1])
local delta = tonumber(ARGV[2]) - reserved
if delta ~= 0 then
  if redis.call('exists', KEYS[1]) == 1 then
    redis.call('incrby', KEYS[1], delta)
  elseif delta > 0 and ARGV[3] == '1' then
    redis.call('set', KEYS[1], delta, 'EX', 172800)
  end
end
local held = tonumber(redis.call('get', KEYS[2]) or '0')
local give = math.min(held, reserved)
if give > 0 then
  redis.call('decrby', KEYS[2], give)
end
return 1
"#,
    )
});

/// What an attempt to reserve found: the reservation, when the budget could take it, and the
/// day's total (used and reserved) after the attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub reservation: Option<Reservation>,
    pub total: i64,
}

/// Reserves an estimate of `tokens` of `user_id`'s `budget` for today (UTC), atomically: of
/// any number of concurrent attempts, only as many as fit are admitted.
pub async fn reserve(
    conn: &mut ConnectionManager,
    ns: &Namespace,
    user_id: i64,
    tokens: i64,
    budget: i64,
    now: DateTime<Utc>,
) -> Result<Attempt> {
    let day = day_of(now);
    let key = day_key(ns, user_id, day);
    let (admitted, total): (i64, i64) = RESERVE
        .key(&key)
        .key(reserved_key(&key))
        .arg(tokens)
        .arg(budget)
        .invoke_async(conn)
        .await?;
    Ok(Attempt {
        reservation: (admitted == 1).then_some(Reservation {
            key,
            tokens,
            day: Some(day),
        }),
        total,
    })
}

/// Replaces a reservation by what was really used (0 to release it).
pub async fn settle(
    conn: &mut ConnectionManager,
    reservation: &Reservation,
    used: i64,
) -> Result<()> {
    let today = reservation.day == Some(day_of(Utc::now()));
    SETTLE
        .key(&reservation.key)
        .key(reserved_key(&reservation.key))
        .arg(reservation.tokens)
        .arg(used)
        .arg(if today { "1" } else { "0" })
        .invoke_async::<i64>(conn)
        .await?;
    Ok(())
}

/// One user's tokens of one UTC day: `total` is what counts against the budget, of which
/// `reserved` is held by sends still waiting for their reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DayUse {
    pub total: i64,
    pub reserved: i64,
}

impl DayUse {
    /// Tokens replies really used (settled).
    pub fn used(&self) -> i64 {
        (self.total - self.reserved).max(0)
    }

    /// What is left under `limit` (`None`: no limit, nothing to count down).
    pub fn remaining(&self, limit: Option<i64>) -> Option<i64> {
        limit.map(|limit| (limit - self.total).max(0))
    }
}

/// Today's (UTC) use of each of `user_ids`, in their order, read in one round trip.
pub async fn day_use(
    conn: &mut ConnectionManager,
    ns: &Namespace,
    user_ids: &[i64],
    now: DateTime<Utc>,
) -> Result<Vec<DayUse>> {
    if user_ids.is_empty() {
        return Ok(Vec::new());
    }
    let day = day_of(now);
    let keys: Vec<String> = user_ids
        .iter()
        .flat_map(|&user_id| {
            let total = day_key(ns, user_id, day);
            let reserved = reserved_key(&total);
            [total, reserved]
        })
        .collect();
    let values: Vec<Option<i64>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
    Ok(values
        .chunks(2)
        .map(|pair| DayUse {
            total: pair.first().copied().flatten().unwrap_or(0),
            reserved: pair.get(1).copied().flatten().unwrap_or(0),
        })
        .collect())
}

/// The daily token limit a user is held to: the one staff set for them (`own`, 0 included:
/// no tokens at all), else the deployment's `default` (`DAILY_TOKEN_BUDGET`, where 0 means no
/// limit). `None`: no limit.
pub fn daily_limit(own: Option<i64>, default: i64) -> Option<i64> {
    match own {
        Some(own) => Some(own.max(0)),
        None => (default > 0).then_some(default),
    }
}

/// The next UTC midnight after `now`, when a new day's budget starts.
pub fn next_reset(now: DateTime<Utc>) -> DateTime<Utc> {
    day_of(now)
        .succ_opt()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .unwrap_or(now + chrono::Duration::days(1))
}

/// Seconds until the next UTC midnight, when a new day's budget starts (at least 1).
pub fn seconds_until_reset(now: DateTime<Utc>) -> u64 {
    u64::try_from((next_reset(now) - now).num_seconds())
        .unwrap_or(0)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_set_by_staff_wins_and_a_default_of_zero_is_no_limit() {
        assert_eq!(daily_limit(None, 0), None);
        assert_eq!(daily_limit(None, 500), Some(500));
        assert_eq!(daily_limit(Some(0), 0), Some(0));
        assert_eq!(daily_limit(Some(0), 500), Some(0));
        assert_eq!(daily_limit(Some(7), 500), Some(7));
    }

    #[test]
    fn the_day_resets_at_the_next_utc_midnight() {
        let now = "2026-12-08T23:59:30Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(next_reset(now).to_rfc3339(), "2026-12-09T00:00:00+00:00");
        assert_eq!(seconds_until_reset(now), 30);
        let midnight = "2026-12-09T00:00:00Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(seconds_until_reset(midnight), 86_400);
    }

    #[test]
    fn used_and_remaining_come_from_the_total_and_the_reserved_part() {
        let day = DayUse {
            total: 120,
            reserved: 17,
        };
        assert_eq!(day.used(), 103);
        assert_eq!(day.remaining(Some(500)), Some(380));
        assert_eq!(day.remaining(Some(100)), Some(0));
        assert_eq!(day.remaining(None), None);
    }
}
