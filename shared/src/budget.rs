//! Per-user daily token budgets, held in Redis so every API instance and worker shares them:
//! the API reserves an estimate before the message is queued, the worker settles it to the
//! real usage once the reply is saved (or releases it when the message fails).
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
            key: ns.budget(user_id, &day.format("%Y-%m-%d").to_string()),
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

/// Reserves `tokens` if they fit under `budget`; the counter lives two days.
const RESERVE: &str = r#"
local used = tonumber(redis.call('get', KEYS[1]) or '0')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then
  return {0, used}
end
used = redis.call('incrby', KEYS[1], ARGV[1])
redis.call('expire', KEYS[1], 172800)
return {1, used}
"#;

/// Reserves an estimate of `tokens` of `user_id`'s budget for today (UTC); `None` when the
/// budget cannot take it.
pub async fn reserve(
    conn: &mut ConnectionManager,
    ns: &Namespace,
    user_id: i64,
    tokens: i64,
    budget: i64,
    now: DateTime<Utc>,
) -> Result<Option<Reservation>> {
    let day = now.date_naive();
    let key = ns.budget(user_id, &day.format("%Y-%m-%d").to_string());
    let (admitted, _used): (i64, i64) = redis::Script::new(RESERVE)
        .key(&key)
        .arg(tokens)
        .arg(budget)
        .invoke_async(conn)
        .await?;
    Ok((admitted == 1).then_some(Reservation {
        key,
        tokens,
        day: Some(day),
    }))
}

/// Replaces a reservation by what was really used (0 to release it).
pub async fn settle(
    conn: &mut ConnectionManager,
    reservation: &Reservation,
    used: i64,
) -> Result<()> {
    let delta = used - reservation.tokens;
    if delta != 0 {
        redis::cmd("INCRBY")
            .arg(&reservation.key)
            .arg(delta)
            .query_async::<i64>(conn)
            .await?;
    }
    Ok(())
}

/// Seconds until the next UTC midnight, when a new day's budget starts.
pub fn seconds_until_reset(now: DateTime<Utc>) -> u64 {
    let tomorrow = now
        .date_naive()
        .succ_opt()
        .and_then(|d| d.and_hms_opt(0, 0, 0));
    tomorrow
        .map(|t| (t.and_utc() - now).num_seconds().max(1) as u64)
        .unwrap_or(86_400)
}
