//! Taking in a user message: store it, queue its completion job, announce it. Shared by REST
//! `send_message` and the WebSocket.
use aichat_shared::budget::{self, Reservation};
use aichat_shared::db::ai_messages::NewUserMessage;
use aichat_shared::domain::{AiMessage, ContextOptions};
use chrono::Utc;

use crate::error::{ApiError, ApiResult};
use crate::routes::ai_chats::ensure_owner;
use crate::send_rate;
use crate::state::AppState;

/// Stores `content` as a queued user message of `ai_chat_id` and queues its completion job;
/// 404 unless `user_id` owns the chat (checked by the insert itself, so callers need not).
///
/// The message is committed before the push, so a worker can never take a job whose message
/// is not visible yet. If Redis refuses the push, the message is removed again and the caller
/// gets 503: no message is left waiting for a reply that nothing will produce. Nothing else is
/// written: the sweeper ages a message by its `timestamp`. Sends that arrive together share
/// one statement and one push (`send_batch`).
#[tracing::instrument(skip(state, content))]
pub async fn submit_message(
    state: &AppState,
    user_id: i64,
    ai_chat_id: i64,
    content: &str,
    options: ContextOptions,
    request_id: Option<String>,
) -> ApiResult<AiMessage> {
    if let Err(err) = send_rate::admit(state, user_id).await {
        // Someone else's chat is not found before anything else is said about it.
        return Err(not_found_first(state, ai_chat_id, user_id, err).await);
    }
    let reservation = match reserve_budget(state, user_id).await {
        Ok(reservation) => reservation,
        Err(err) => return Err(not_found_first(state, ai_chat_id, user_id, err).await),
    };
    // Written with whatever other sends are waiting: one statement (ownership check, insert,
    // the chat's `updated_at`) committed before one push of their jobs.
    let message = NewUserMessage {
        ai_chat_id,
        user_id,
        content: content.to_owned(),
        options,
    };
    let result = state
        .sends
        .submit(message, request_id, reservation.clone())
        .await;
    if result.is_err()
        && let Some(reservation) = &reservation
    {
        let mut redis = state.redis.clone();
        if let Err(err) = budget::settle(&mut redis, reservation, 0).await {
            tracing::warn!(error = %err, "could not release a budget reservation");
        }
    }
    result
}

/// Reserves the most the message can cost under the user's daily budget, if there is one: the
/// worker never sends more than `CONTEXT_TOKEN_BUDGET` of prompt and asks for at most
/// `MAX_COMPLETION_TOKENS`, so no reply overruns what its send reserved.
async fn reserve_budget(state: &AppState, user_id: i64) -> ApiResult<Option<Reservation>> {
    let settings = &state.settings;
    if settings.daily_token_budget <= 0 {
        return Ok(None);
    }
    let estimate = settings.openai.most_tokens_per_send();
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

/// `err`, unless `user_id` does not own AI chat `ai_chat_id`: then 404, as when ownership was
/// checked before anything else. Only refusals pay for this query; a send that goes through
/// is checked by its insert.
pub async fn not_found_first(
    state: &AppState,
    ai_chat_id: i64,
    user_id: i64,
    err: ApiError,
) -> ApiError {
    if matches!(err, ApiError::NotFound) {
        return err;
    }
    match ensure_owner(state, ai_chat_id, user_id).await {
        Ok(()) => err,
        Err(not_owner) => not_owner,
    }
}
