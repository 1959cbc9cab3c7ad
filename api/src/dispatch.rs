//! Taking in a user message: store it, queue its completion job, announce it. Shared by REST
//! `send_message` and the WebSocket.
use aichat_shared::budget::{self, Reservation};
use aichat_shared::db;
use aichat_shared::domain::{AiMessage, ContextOptions};
use aichat_shared::events::{ChatEvent, EventMessage, publish_event};
use aichat_shared::jobs::{CompletionJob, message_job_key};
use chrono::Utc;

use crate::error::{ApiError, ApiResult};
use crate::send_rate;
use crate::state::AppState;

/// Stores `content` as a queued user message of `ai_chat_id` and queues its completion job.
///
/// The message is committed before the push, so a worker can never take a job whose message
/// is not visible yet. If Redis refuses the push, the message is removed again and the caller
/// gets 503: no message is left waiting for a reply that nothing will produce. (A message whose
/// push succeeded but whose `dispatched_at` could not be recorded keeps waiting on its job,
/// which the idempotency key stops from being queued twice.)
#[tracing::instrument(skip(state, content))]
pub async fn submit_message(
    state: &AppState,
    user_id: i64,
    ai_chat_id: i64,
    content: &str,
    options: ContextOptions,
    request_id: Option<String>,
) -> ApiResult<AiMessage> {
    send_rate::admit(state, user_id).await?;
    let reservation = reserve_budget(state, user_id, ai_chat_id, content).await?;
    let result = store_and_queue(
        state,
        ai_chat_id,
        content,
        options,
        request_id,
        reservation.clone(),
    )
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

/// Reserves an estimate of the message's tokens under the user's daily budget, if there is one.
async fn reserve_budget(
    state: &AppState,
    user_id: i64,
    ai_chat_id: i64,
    content: &str,
) -> ApiResult<Option<Reservation>> {
    let settings = &state.settings;
    if settings.daily_token_budget <= 0 {
        return Ok(None);
    }
    let chat = db::ai_chats::get_ai_chat(&state.db, ai_chat_id, user_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    // About four characters a token; every message adds a few tokens of framing.
    let history = db::ai_messages::history_chars(&state.db, chat.id).await?;
    let chars = history + (chat.system_prompt.chars().count() + content.chars().count()) as i64;
    let prompt = (chars / 4 + 8 + 4 * chat.message_count).min(settings.budget_prompt_cap_tokens);
    let estimate = prompt + settings.budget_completion_tokens;
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

async fn store_and_queue(
    state: &AppState,
    ai_chat_id: i64,
    content: &str,
    options: ContextOptions,
    request_id: Option<String>,
    reservation: Option<Reservation>,
) -> ApiResult<AiMessage> {
    let mut tx = state.db.begin().await?;
    let message =
        db::ai_messages::insert_user_message(&mut *tx, ai_chat_id, content, options).await?;
    db::ai_chats::touch_ai_chat(&mut *tx, ai_chat_id).await?;
    tx.commit().await?;

    let job = CompletionJob {
        budget: reservation,
        ..CompletionJob::new(message.id, ai_chat_id, options, request_id)
    };
    if let Err(err) = state
        .queue
        .enqueue_completion(&job, &message_job_key(message.id))
        .await
    {
        tracing::error!(error = %err, message_id = message.id, "could not queue the completion job");
        if let Err(cleanup) =
            db::ai_messages::delete_undispatched_message(&state.db, message.id).await
        {
            tracing::error!(error = %cleanup, message_id = message.id, "could not remove the unqueued message");
        }
        return Err(ApiError::Unavailable(
            "The message queue is unavailable, so the message was not accepted; please retry shortly",
        ));
    }
    if let Err(err) = db::ai_messages::mark_dispatched(&state.db, message.id).await {
        tracing::warn!(error = %err, message_id = message.id, "could not record dispatch");
    }

    let event = ChatEvent::UserMessage {
        message: EventMessage::user(&message),
    };
    let mut redis = state.redis.clone();
    if let Err(err) = publish_event(&mut redis, &state.ns, ai_chat_id, &event).await {
        tracing::warn!(error = %err, message_id = message.id, "could not publish user_message");
    }
    Ok(message)
}
