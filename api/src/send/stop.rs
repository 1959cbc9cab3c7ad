//! Stopping a message a user sent (REST `POST /api/ai/messages/{id}/stop/`, WebSocket `stop`
//! frame), from any API instance:
//! - still `queued` (no worker has taken it): it becomes `cancelled` here, its budget
//!   reservation is given back and the chat gets `message_cancelled`; its job ends without
//!   asking the model when a worker takes it;
//! - `answering`: the request is recorded on the message and published to every worker
//!   (`events::publish_stop_request`); the one running it drops the model's stream and saves
//!   the text so far as a `stopped` reply (or cancels it, if the model was not streaming yet).
//!
//! A stop is idempotent: a repeated one answers what the first one left (the stopped reply,
//! or the cancelled message); one that comes after the reply was saved whole is a conflict.
use std::time::Duration;

use serde::Serialize;
use tokio::time::{Instant, timeout_at};
use utoipa::ToSchema;

use aichat_shared::budget::Reservation;
use aichat_shared::db;
use aichat_shared::domain::{AiMessage, MessageStatus};
use aichat_shared::events::{ChatEvent, publish_event, publish_stop_request};

use crate::access::own_user_message;
use crate::error::{ApiError, ApiResult};
use crate::fanout::Subscription;
use crate::run_to_end::run_to_end;
use crate::send::rate;
use crate::state::AppState;

/// A stopped message and its reply.
#[derive(Debug, Serialize, ToSchema)]
pub struct StopResponse {
    /// The user message: `cancelled`, `answered` (its reply was stopped) or, when the worker
    /// has not finished stopping it yet, `answering`.
    pub message: AiMessage,
    /// The reply saved at the stop (`stopped: true`), or null when there is none (cancelled
    /// before the model answered, or not saved yet).
    pub reply: Option<AiMessage>,
}

/// Where a stop request left the message.
pub enum Recorded {
    /// It was `queued`: now `cancelled`, and said so. (Boxed: a message is large beside the
    /// other outcomes, which carry nothing.)
    Cancelled(Box<AiMessage>),
    /// It is `answering`: its worker has been asked to stop it.
    Requested,
    /// It no longer waits (answered, failed, cancelled): nothing changed.
    Ended,
}

/// Records a stop of `message_id` and acts on it (see the module). `before_signal` runs before
/// the workers are told, with the chat id: REST subscribes to the chat's events there, so the
/// stopped reply cannot slip past it. Counts toward the send rate limit.
pub async fn record<F, Fut>(
    state: &AppState,
    user_id: i64,
    message_id: i64,
    before_signal: F,
) -> ApiResult<Recorded>
where
    F: FnOnce(i64) -> Fut,
    Fut: Future<Output = ApiResult<()>>,
{
    let message = own_user_message(state, user_id, message_id).await?;
    rate::admit(state, user_id).await?;
    let Some(stopping) = db::retry::on_conflict("stop", || {
        db::stops::request_stop(&state.db, message_id, user_id)
    })
    .await?
    else {
        return Ok(Recorded::Ended);
    };
    let mut redis = state.redis.clone();
    if stopping.message.status == MessageStatus::Cancelled {
        let reservation = Reservation::of_message(
            &state.ns,
            user_id,
            stopping.budget_day,
            stopping.budget_tokens,
        );
        let (state, ai_chat_id) = (state.clone(), message.ai_chat);
        // To its end even when the request is dropped now: the cancellation is committed, and
        // its reservation is given back and its event published whatever the client does.
        run_to_end(async move {
            if let Some(reservation) = reservation {
                crate::send::budget::release(&state, &reservation).await;
            }
            let event = ChatEvent::MessageCancelled { message_id };
            // The message is cancelled whatever happens to the event; clients see its status
            // on their next read.
            if let Err(err) = publish_event(&mut redis, &state.ns, ai_chat_id, &event).await {
                tracing::warn!(error = %err, "could not publish message_cancelled");
            }
            Ok(())
        })
        .await?;
        return Ok(Recorded::Cancelled(Box::new(stopping.message)));
    }
    before_signal(message.ai_chat).await?;
    // Recorded in the database first: a worker that misses this finds it there.
    if let Err(err) = publish_stop_request(&mut redis, &state.ns, message_id).await {
        // Recorded all the same: the worker running it checks within seconds
        // (`worker/src/subscription.rs`).
        tracing::warn!(error = %err, "could not publish a stop request");
    }
    Ok(Recorded::Requested)
}

/// Waits on `events` until the worker has ended `message_id` (its reply saved, or it was
/// cancelled or failed), for at most `limit`.
pub async fn wait_for_end(events: &mut Subscription, message_id: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while let Ok(Ok(text)) = timeout_at(deadline, events.recv()).await {
        let ended = serde_json::from_str::<ChatEvent>(&text).is_ok_and(|e| e.ends(message_id));
        if ended {
            return;
        }
    }
}

/// What a stop request answers once the message is where the stop left it: 200 with the
/// cancelled message, or with the stopped reply; 202 while its worker has not finished
/// stopping it; 409 when it was answered whole or failed before the stop.
pub async fn outcome(
    state: &AppState,
    user_id: i64,
    message_id: i64,
) -> ApiResult<(bool, StopResponse)> {
    let message = own_user_message(state, user_id, message_id).await?;
    match message.status {
        MessageStatus::Cancelled => Ok((
            true,
            StopResponse {
                message,
                reply: None,
            },
        )),
        MessageStatus::Answered => {
            let reply = db::ai_messages::find_reply(&state.db, message_id).await?;
            match reply {
                Some(reply) if reply.stopped => Ok((
                    true,
                    StopResponse {
                        message,
                        reply: Some(reply),
                    },
                )),
                _ => Err(ApiError::Conflict(
                    "This message was answered before it could be stopped",
                )),
            }
        }
        MessageStatus::Failed => Err(ApiError::Conflict(
            "This message failed before it could be stopped; retry it instead",
        )),
        MessageStatus::Queued | MessageStatus::Answering | MessageStatus::Complete => Ok((
            false,
            StopResponse {
                message,
                reply: None,
            },
        )),
    }
}
