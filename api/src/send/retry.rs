//! Queueing one of a user's messages again: a retry of one that got no reply (`failed`, or
//! `cancelled` by a stop), or a regeneration of one (`versions`). The same message goes back
//! to `queued` and is answered as a send would be; it counts toward the send rate limit and
//! reserves budget like a send.
//!
//! Concurrent requeues of one message change it once (the statement only takes a message that
//! has ended), and only that one pushes a job, after its change is committed, under the next
//! key of the message's chain of jobs (`JobQueue::next_job_key`, as the sweeper follows it), so
//! the sweeper and a staff re-drive see it. When a job of the message is still alive (a message
//! cancelled before any worker took its job), that job answers it and nothing is pushed; if
//! that job was in fact ending, the next sweep finds the message without a live job and pushes
//! one. The message's dead job, if any, leaves the staff's list.
use aichat_shared::budget::Reservation;
use aichat_shared::db;
use aichat_shared::db::stops::{Requeue, Requeued};
use aichat_shared::domain::{AiMessage, MessageStatus};
use aichat_shared::events::{ChatEvent, EventMessage, encode_events, publish_event};
use aichat_shared::jobs::{CompletionJob, NextJob};

use crate::access::own_user_message;
use crate::error::{ApiError, ApiResult};
use crate::send::budget;
use crate::send::limits::{self, LimitsLeft, Sender};
use crate::send::versions::announce_path;
use crate::state::AppState;

/// Queues `message_id` again (see the module); the message as it is now (`queued`), and what
/// is left of the sender's limits.
pub async fn retry(
    state: &AppState,
    sender: Sender,
    message_id: i64,
    request_id: Option<String>,
) -> ApiResult<(AiMessage, LimitsLeft)> {
    let current = own_user_message(state, sender.user_id, message_id).await?;
    if !matches!(
        current.status,
        MessageStatus::Failed | MessageStatus::Cancelled
    ) {
        return Err(not_retriable(current.status));
    }
    requeue_message(state, &current, sender, request_id, Requeue::Retry).await
}

/// Queues `current` again for `purpose` (admitted by the rate limit and the budget), then
/// announces it; the message as it is now (`queued`), and what is left of the limits.
pub(crate) async fn requeue_message(
    state: &AppState,
    current: &AiMessage,
    sender: Sender,
    request_id: Option<String>,
    purpose: Requeue,
) -> ApiResult<(AiMessage, LimitsLeft)> {
    let user_id = sender.user_id;
    let limits::Admitted { reservation, left } = limits::admit(state, sender).await?;
    let result = requeue(
        state,
        current,
        user_id,
        request_id,
        reservation.as_ref(),
        purpose,
    )
    .await;
    if let (Err(_), Some(reservation)) = (&result, &reservation) {
        budget::release(state, reservation).await;
    }
    Ok((result?, left))
}

/// Where a requeued message's job went: pushed (its `user_message` event published in the
/// push's own script run, before a worker could take the job and answer), or nowhere, a job
/// of the message being alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Chained {
    /// Pushed, after this job of the message's chain, if any.
    Pushed {
        follows: Option<String>,
    },
    Alive,
}

/// Publishes `user_message` for a message queued (again) outside the send batch and the
/// pushes that carry it.
pub(crate) async fn announce(state: &AppState, message: &AiMessage) {
    let event = ChatEvent::UserMessage {
        message: EventMessage::user(message),
    };
    let mut redis = state.redis.clone();
    if let Err(err) = publish_event(&mut redis, &state.ns, message.ai_chat, &event).await {
        tracing::warn!(error = %err, "could not publish user_message");
    }
}

fn not_retriable(status: MessageStatus) -> ApiError {
    match status {
        MessageStatus::Answered => ApiError::Conflict("This message has been answered"),
        _ => ApiError::Conflict("This message is still waiting for its reply"),
    }
}

/// Back to `queued`, committed, then its job pushed: a worker that takes the job finds the
/// message waiting. If the push fails, the message goes back to what it was (`previous`).
async fn requeue(
    state: &AppState,
    previous: &AiMessage,
    user_id: i64,
    request_id: Option<String>,
    reservation: Option<&Reservation>,
    purpose: Requeue,
) -> ApiResult<AiMessage> {
    let message_id = previous.id;
    let budget = reservation.and_then(Reservation::stored);
    let Some((requeued, activated)) = db::retry::on_conflict("retry", || {
        store_requeue(state, previous, user_id, budget, purpose)
    })
    .await?
    else {
        // Retried (or changed) by someone else since it was read.
        let now = db::ai_messages::get_user_message(&state.db, message_id, user_id).await?;
        return Err(now.map_or(ApiError::NotFound, |m| not_retriable(m.status)));
    };
    if activated {
        // Its branch was made the active path.
        announce_path(state, previous.ai_chat, message_id).await;
    }
    // An answered message's jobs are done with it, and so are a failed one's: the job that
    // failed it is only finishing (its acknowledgement may come after the `error` event that
    // prompted this retry). A cancelled one's job may still be waiting to run it.
    let after_answer = matches!(
        previous.status,
        MessageStatus::Answered | MessageStatus::Failed
    );
    let pushed = push(
        state,
        user_id,
        &requeued,
        request_id,
        reservation,
        after_answer,
    )
    .await;
    let chained = match pushed {
        Ok(chained) => chained,
        Err(err) => {
            let restored = db::stops::unrequeue(
                &state.db,
                message_id,
                previous.status,
                previous.error.as_deref(),
            )
            .await;
            if let Err(restore) = restored {
                // Left `queued`: the sweeper pushes its job.
                tracing::warn!(error = %restore, "could not undo a retry whose job was not queued");
            }
            return Err(err);
        }
    };
    if let Chained::Pushed {
        follows: Some(task),
    } = &chained
    {
        // The message is queued: a dead job left in the staff's list is only clutter there (a
        // re-drive of it answers 409).
        if let Err(err) = remove_if_dead(state, task).await {
            tracing::warn!(error = %err, task, "could not remove the retried message's dead job");
        }
    }
    Ok(requeued.message)
}

/// The requeue's statement, and whether it made the message's branch the active path. A
/// regeneration of a question off the active path first makes its branch the active one, in
/// the same transaction, so the new reply is shown when it comes. Whether it is off the path
/// is read under the chat's lock, which every branch change takes: a change committed after
/// the request read the question (an edit of an earlier turn in another tab) is seen.
async fn store_requeue(
    state: &AppState,
    message: &AiMessage,
    user_id: i64,
    budget: Option<(chrono::NaiveDate, i32)>,
    purpose: Requeue,
) -> aichat_shared::error::Result<Option<(Requeued, bool)>> {
    if purpose == Requeue::Retry {
        let requeued = db::stops::requeue(&state.db, message.id, user_id, budget, purpose).await?;
        return Ok(requeued.map(|requeued| (requeued, false)));
    }
    let mut tx = state.db.begin().await?;
    if !db::versions::lock_owned_chat(&mut tx, message.ai_chat, user_id).await? {
        return Ok(None);
    }
    let Some(active) = db::versions::is_active(&mut tx, message.id).await? else {
        return Ok(None);
    };
    if !active {
        db::versions::activate(&mut tx, message.ai_chat, message.id).await?;
    }
    let requeued = db::stops::requeue(&mut *tx, message.id, user_id, budget, purpose).await?;
    if requeued.is_some() {
        tx.commit().await?;
    }
    Ok(requeued.map(|requeued| (requeued, !active)))
}

/// Pushes the requeued message's job under the next key of its chain, with its `user_message`
/// event, unless a job of it is still alive (it was cancelled before a worker took its job:
/// that job answers it, and the event is published on its own). A regeneration of an answered
/// message, or a retry of a failed one (`after_answer`), pushes past a job still alive: that
/// one ended it and is only finishing. When the push fails nothing is announced.
pub(crate) async fn push(
    state: &AppState,
    user_id: i64,
    requeued: &Requeued,
    request_id: Option<String>,
    reservation: Option<&Reservation>,
    after_answer: bool,
) -> ApiResult<Chained> {
    let message = &requeued.message;
    let job = CompletionJob {
        budget: reservation.cloned(),
        ..CompletionJob::new(message.id, message.ai_chat, requeued.options, request_id)
            .for_user(user_id)
    };
    let event = ChatEvent::UserMessage {
        message: EventMessage::user(message),
    };
    // Our own types: one that cannot be encoded is a bug to log; the job is pushed anyway,
    // and announced after it.
    let encoded = encode_events(&state.ns, &[(message.ai_chat, event)]);
    if let Err(err) = &encoded {
        tracing::error!(error = %err, "could not encode a user_message event");
    }
    let events = encoded.as_deref().unwrap_or_default();
    let chained = push_on_chain(state, &job, after_answer, events).await?;
    if events.is_empty() || chained == Chained::Alive {
        // No push carried the event.
        announce(state, message).await;
    }
    Ok(chained)
}

/// Pushes `job` where its message's chain of jobs ends (past jobs still alive when
/// `after_answer`), publishing `then_publish` in the push's script run, unless a job of the
/// message is alive (nothing is pushed or published); 503 when the chain is too long to follow.
pub(crate) async fn push_on_chain(
    state: &AppState,
    job: &CompletionJob,
    after_answer: bool,
    then_publish: &[(String, String)],
) -> ApiResult<Chained> {
    let end = if after_answer {
        state
            .queue
            .next_job_key_after_answer(job.message_id)
            .await?
    } else {
        state.queue.next_job_key(job.message_id).await?
    };
    match &end {
        NextJob::Alive => Ok(Chained::Alive),
        NextJob::Push { .. } => {
            state.queue.enqueue_next(job, &end, then_publish).await?;
            Ok(Chained::Pushed {
                follows: end.last_job().map(str::to_owned),
            })
        }
        NextJob::GaveUp => Err(ApiError::Unavailable(
            "This message cannot be queued again right now; please try later",
        )),
    }
}

async fn remove_if_dead(state: &AppState, task: &str) -> aichat_shared::error::Result<()> {
    if state.queue.dead_job(task).await?.is_some() {
        state.queue.remove_dead_job(task).await?;
    }
    Ok(())
}
