//! A user's retry of their own message that got no reply (`failed`, or `cancelled` by a stop):
//! the same message goes back to `queued` and is answered as a send would be. It counts
//! toward the send rate limit and reserves budget like a send.
//!
//! Concurrent retries of one message change it once (the statement only takes a `failed` or
//! `cancelled` message), and only that one pushes a job, under the next key of the message's
//! chain of jobs (`JobQueue::next_job_key`, as the sweeper follows it), so the sweeper and a
//! staff re-drive see it. When a job of the message is still alive (a message cancelled
//! before any worker took its job), that job answers it and nothing is pushed. The message's
//! dead job, if any, leaves the staff's list.
use aichat_shared::budget::Reservation;
use aichat_shared::db;
use aichat_shared::domain::{AiMessage, MessageStatus};
use aichat_shared::events::{ChatEvent, EventMessage, publish_event};
use aichat_shared::jobs::{CompletionJob, NextJob};

use crate::access::own_user_message;
use crate::error::{ApiError, ApiResult};
use crate::send::{budget, rate};
use crate::state::AppState;

/// Queues `message_id` again (see the module); the message as it is now (`queued`).
pub async fn retry(
    state: &AppState,
    user_id: i64,
    message_id: i64,
    request_id: Option<String>,
) -> ApiResult<AiMessage> {
    let current = own_user_message(state, user_id, message_id).await?;
    if !matches!(
        current.status,
        MessageStatus::Failed | MessageStatus::Cancelled
    ) {
        return Err(not_retriable(current.status));
    }
    rate::admit(state, user_id).await?;
    let reservation = budget::reserve(state, user_id).await?;
    let result = requeue(state, user_id, message_id, request_id, reservation.as_ref()).await;
    if let (Err(_), Some(reservation)) = (&result, &reservation) {
        budget::release(state, reservation).await;
    }
    let message = result?;
    let event = ChatEvent::UserMessage {
        message: EventMessage::user(&message),
    };
    let mut redis = state.redis.clone();
    if let Err(err) = publish_event(&mut redis, &state.ns, message.ai_chat, &event).await {
        tracing::warn!(error = %err, "could not publish user_message");
    }
    Ok(message)
}

fn not_retriable(status: MessageStatus) -> ApiError {
    match status {
        MessageStatus::Answered => ApiError::Conflict("This message has been answered"),
        _ => ApiError::Conflict("This message is still waiting for its reply"),
    }
}

/// Back to `queued` and its job pushed, in one transaction that spans the push: the message is
/// queued again only if its job is.
async fn requeue(
    state: &AppState,
    user_id: i64,
    message_id: i64,
    request_id: Option<String>,
    reservation: Option<&Reservation>,
) -> ApiResult<AiMessage> {
    let budget = reservation.and_then(|r| Some((r.day?, r.stored_tokens())));
    let mut tx = state.db.begin().await?;
    let Some(requeued) = db::stops::requeue(&mut *tx, message_id, user_id, budget).await? else {
        // Retried (or changed) by someone else since it was read.
        let now = db::ai_messages::get_user_message(&state.db, message_id, user_id).await?;
        return Err(now.map_or(ApiError::NotFound, |m| not_retriable(m.status)));
    };
    let last = match state.queue.next_job_key(message_id).await? {
        NextJob::Alive => None,
        NextJob::Push { key, last } => {
            let job = CompletionJob {
                budget: reservation.cloned(),
                ..CompletionJob::new(
                    message_id,
                    requeued.message.ai_chat,
                    requeued.options,
                    request_id,
                )
            };
            state.queue.enqueue_completion(&job, &key).await?;
            last
        }
        NextJob::GaveUp => {
            return Err(ApiError::Unavailable(
                "This message cannot be queued again right now; please try later",
            ));
        }
    };
    tx.commit().await?;
    if let Some(task) = last {
        // The message is queued: a dead job left in the staff's list is only clutter there (a
        // re-drive of it answers 409).
        if let Err(err) = remove_if_dead(state, &task).await {
            tracing::warn!(error = %err, task, "could not remove the retried message's dead job");
        }
    }
    Ok(requeued.message)
}

async fn remove_if_dead(state: &AppState, task: &str) -> aichat_shared::error::Result<()> {
    if state.queue.dead_job(task).await?.is_some() {
        state.queue.remove_dead_job(task).await?;
    }
    Ok(())
}
