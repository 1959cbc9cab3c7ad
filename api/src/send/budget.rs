//! The daily token budget of a send (`DAILY_TOKEN_BUDGET`): a send reserves the most its reply
//! can cost before it is stored; the worker settles the reservation to what the reply used.
use aichat_shared::budget::{self, Reservation};
use chrono::Utc;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Reserves the most the message can cost under the user's daily budget, if there is one: the
/// worker never sends more than `CONTEXT_TOKEN_BUDGET` of prompt and asks for at most
/// `MAX_COMPLETION_TOKENS`, so no reply overruns what its send reserved. 429 when it does not
/// fit.
pub async fn reserve(state: &AppState, user_id: i64) -> ApiResult<Option<Reservation>> {
    let settings = &state.settings;
    if settings.daily_token_budget <= 0 {
        return Ok(None);
    }
    let estimate = settings.openai.most_tokens_per_send(&state.models);
    let mut redis = state.redis.clone();
    let now = Utc::now();
    match budget::reserve(
        &mut redis,
        &state.ns,
        user_id,
        estimate,
        settings.daily_token_budget,
        now,
    )
    .await?
    {
        Some(reservation) => Ok(Some(reservation)),
        None => Err(ApiError::BudgetExceeded {
            retry_after_secs: budget::seconds_until_reset(now),
        }),
    }
}

/// Gives back the whole reservation of a send that was not stored: no job will settle it.
pub async fn release(state: &AppState, reservation: &Reservation) {
    let mut redis = state.redis.clone();
    if let Err(err) = budget::settle(&mut redis, reservation, 0).await {
        tracing::warn!(error = %err, "could not release a budget reservation");
    }
}
