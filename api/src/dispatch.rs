//! Taking in a user message: store it, queue its completion job, announce it. Shared by REST
//! `send_message` and the WebSocket.
use aichat_shared::db;
use aichat_shared::domain::{AiMessage, ContextOptions};
use aichat_shared::events::{ChatEvent, EventMessage, publish_event};
use aichat_shared::jobs::{CompletionJob, message_job_key};

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
    let mut tx = state.db.begin().await?;
    let message =
        db::ai_messages::insert_user_message(&mut *tx, ai_chat_id, content, options).await?;
    db::ai_chats::touch_ai_chat(&mut *tx, ai_chat_id).await?;
    tx.commit().await?;

    let job = CompletionJob::new(message.id, ai_chat_id, options, request_id);
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
