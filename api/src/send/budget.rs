//! The daily token budget of a send: the one staff set for the user, else
//! `DAILY_TOKEN_BUDGET`. A send reserves the most its reply can cost before it is stored; the
//! worker settles the reservation to what the reply used.
use aichat_shared::budget::{self, Reservation};
use chrono::Utc;

use crate::error::ApiResult;
use crate::send::limits::Sender;
use crate::state::AppState;

/// What the budget said to a send.
#[derive(Debug)]
pub enum Reserve {
    /// The user has no daily limit: nothing reserved.
    Unlimited,
    /// Reserved; `remaining` tokens are left today after it.
    Admitted {
        reservation: Reservation,
        remaining: i64,
    },
    /// The reservation does not fit: `remaining` tokens are left today, and the day ends in
    /// `retry_after_secs`.
    Refused {
        remaining: i64,
        retry_after_secs: u64,
    },
}

/// Reserves the most the message can cost under the user's daily limit, if they have one: the
/// worker never sends more than `CONTEXT_TOKEN_BUDGET` of prompt and asks for at most
/// `MAX_COMPLETION_TOKENS`, so no reply overruns what its send reserved. A limit of 0 refuses
/// every send.
pub async fn reserve(state: &AppState, sender: Sender) -> ApiResult<Reserve> {
    let Some(limit) = sender.daily_limit(state) else {
        return Ok(Reserve::Unlimited);
    };
    let estimate = state.settings.openai.most_tokens_per_send(&state.models);
    let mut redis = state.redis.clone();
    let now = Utc::now();
    let attempt =
        budget::reserve(&mut redis, &state.ns, sender.user_id, estimate, limit, now).await?;
    let remaining = (limit - attempt.total).max(0);
    Ok(match attempt.reservation {
        Some(reservation) => Reserve::Admitted {
            reservation,
            remaining,
        },
        None => Reserve::Refused {
            remaining,
            retry_after_secs: budget::seconds_until_reset(now),
        },
    })
}

/// The tokens the user has left today; `None` without a limit, or when Redis cannot say (the
/// caller only reports it).
pub async fn remaining(state: &AppState, sender: Sender) -> Option<i64> {
    let limit = sender.daily_limit(state)?;
    let mut redis = state.redis.clone();
    match budget::day_use(&mut redis, &state.ns, &[sender.user_id], Utc::now()).await {
        Ok(days) => days.first().and_then(|day| day.remaining(Some(limit))),
        Err(err) => {
            tracing::warn!(error = %err, "could not read the token budget");
            None
        }
    }
}

/// Gives back the whole reservation of a send that was not stored: no job will settle it.
pub async fn release(state: &AppState, reservation: &Reservation) {
    let mut redis = state.redis.clone();
    if let Err(err) = budget::settle(&mut redis, reservation, 0).await {
        tracing::warn!(error = %err, "could not release a budget reservation");
    }
}
