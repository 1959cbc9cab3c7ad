//! Versions of a conversation's turns: a regeneration (a new reply to the same question) and
//! an edit (a new version of a question, on a branch of its own), both admitted and queued as
//! a send is (the rate limit, the budget, then the job pushed after the commit); and the
//! switch of the active path to another branch.
use aichat_shared::budget::Reservation;
use aichat_shared::db;
use aichat_shared::db::stops::Requeue;
use aichat_shared::domain::{AiMessage, MessageStatus, Role};
use aichat_shared::events::{ChatEvent, publish_event};

use crate::error::{ApiError, ApiResult};
use crate::send::budget;
use crate::send::limits::{self, LimitsLeft, Sender};
use crate::send::retry::{announce, push, requeue_message};
use crate::state::AppState;

const STILL_WAITING: &str = "This message is still waiting for its reply";

/// The user message `id` names for a regeneration: `id` itself, or the question a reply of
/// `id` answers. Not found unless it is in one of `user_id`'s chats.
pub async fn question_of(state: &AppState, user_id: i64, id: i64) -> ApiResult<AiMessage> {
    let message = db::ai_messages::get_user_message(&state.db, id, user_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let question = match (message.role, message.reply_to) {
        (Role::User, _) => Some(message),
        (Role::Assistant, Some(question)) => {
            db::ai_messages::get_user_message(&state.db, question, user_id).await?
        }
        _ => None,
    };
    question.ok_or(ApiError::NotFound)
}

/// Queues a new reply to `question` (one of the sender's user messages, as [`question_of`]
/// found it): its earlier replies stay, the new one is the next version and becomes the
/// active one when it is saved. The question as it is now (`queued`), and what is left of the
/// sender's limits.
pub async fn regenerate(
    state: &AppState,
    sender: Sender,
    question: &AiMessage,
    request_id: Option<String>,
) -> ApiResult<(AiMessage, LimitsLeft)> {
    if is_waiting(question) {
        return Err(ApiError::Conflict(STILL_WAITING));
    }
    requeue_message(state, question, sender, request_id, Requeue::Regenerate).await
}

/// Publishes `active_path_changed`: the chat's other clients read its messages again.
pub(crate) async fn announce_path(state: &AppState, ai_chat_id: i64, message_id: i64) {
    let event = ChatEvent::ActivePathChanged { message_id };
    let mut redis = state.redis.clone();
    if let Err(err) = publish_event(&mut redis, &state.ns, ai_chat_id, &event).await {
        tracing::warn!(error = %err, "could not publish active_path_changed");
    }
}

/// Stores `content` as a new version of `question` (one of the sender's user messages) and
/// queues it: the new message and, once saved, its reply are the active path; the turns after
/// the old version stay in their branch. The new message (`queued`), and what is left of the
/// sender's limits.
///
/// If its job cannot be pushed the message stays `queued` and the sweeper queues it once the
/// queue is back (an edit is not undone: a client retrying it would make another version).
pub async fn edit(
    state: &AppState,
    sender: Sender,
    question: &AiMessage,
    content: &str,
    request_id: Option<String>,
) -> ApiResult<(AiMessage, LimitsLeft)> {
    if is_waiting(question) {
        return Err(ApiError::Conflict(STILL_WAITING));
    }
    let user_id = sender.user_id;
    let limits::Admitted { reservation, left } = limits::admit(state, sender).await?;
    let stored = match store_edit(state, question, user_id, content, reservation.as_ref()).await {
        Ok(Some(stored)) => stored,
        other => {
            if let Some(reservation) = &reservation {
                budget::release(state, reservation).await;
            }
            return Err(match other {
                Err(err) => err.into(),
                // Deleted (with its chat), or requeued by a concurrent request, since it was
                // read: which one, the message as it is now says.
                Ok(_) => {
                    match db::ai_messages::get_user_message(&state.db, question.id, user_id).await {
                        Ok(Some(_)) => ApiError::Conflict(STILL_WAITING),
                        Ok(None) => ApiError::NotFound,
                        Err(err) => err.into(),
                    }
                }
            });
        }
    };
    // A pushed job's `user_message` is published by `push`; a job not queued is the sweeper's.
    if let Err(err) = push(
        state,
        user_id,
        &stored,
        request_id,
        reservation.as_ref(),
        false,
    )
    .await
    {
        tracing::warn!(error = %err, message_id = stored.message.id,
            "the edited message's job was not queued; the sweeper queues it");
        announce(state, &stored.message).await;
    }
    Ok((stored.message, left))
}

fn is_waiting(message: &AiMessage) -> bool {
    matches!(
        message.status,
        MessageStatus::Queued | MessageStatus::Answering
    )
}

/// The edit's transaction: the chat locked, the new version stored, its branch made active.
async fn store_edit(
    state: &AppState,
    question: &AiMessage,
    user_id: i64,
    content: &str,
    reservation: Option<&Reservation>,
) -> aichat_shared::error::Result<Option<db::stops::Requeued>> {
    let budget = reservation.and_then(Reservation::stored);
    db::retry::on_conflict("edit", || async move {
        let mut tx = state.db.begin().await?;
        if !db::versions::lock_owned_chat(&mut tx, question.ai_chat, user_id).await? {
            return Ok(None);
        }
        let stored =
            db::versions::insert_edit(&mut tx, question.ai_chat, question.id, content, budget)
                .await?;
        let Some(mut stored) = stored else {
            return Ok(None);
        };
        db::versions::activate(&mut tx, question.ai_chat, stored.message.id).await?;
        tx.commit().await?;
        stored.message.active = true;
        Ok(Some(stored))
    })
    .await
}

/// Makes the branch through `message_id` (one of `user_id`'s messages, of either role) the
/// active path of its chat (`db::versions::activate`); the message as it is now.
pub async fn activate(state: &AppState, user_id: i64, message_id: i64) -> ApiResult<AiMessage> {
    let message = db::ai_messages::get_user_message(&state.db, message_id, user_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let ai_chat_id = message.ai_chat;
    let found = db::retry::on_conflict("activate", || async move {
        let mut tx = state.db.begin().await?;
        if !db::versions::lock_owned_chat(&mut tx, ai_chat_id, user_id).await? {
            return Ok(false);
        }
        let found = db::versions::activate(&mut tx, ai_chat_id, message_id).await?;
        tx.commit().await?;
        Ok(found)
    })
    .await?;
    if !found {
        return Err(ApiError::NotFound);
    }
    announce_path(state, ai_chat_id, message_id).await;
    db::ai_messages::get_user_message(&state.db, message_id, user_id)
        .await?
        .ok_or(ApiError::NotFound)
}
