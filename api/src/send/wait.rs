//! `send_message?wait=`: hold a REST request until its reply is saved, woken by the same
//! fan-out the WebSockets use (no database polling loop).
use std::time::Duration;

use tokio::time::{Instant, timeout_at};

use aichat_shared::db;
use aichat_shared::domain::{AiMessage, MessageStatus};
use aichat_shared::events::ChatEvent;

use crate::error::{ApiError, ApiResult, FieldErrors};
use crate::fanout::Subscription;
use crate::state::AppState;

/// Subscribes to the chat's events for a request that waits on them, before it reads or
/// changes what it waits for; `refusal` is the 503's text when pub/sub is unreachable.
pub async fn subscribe(
    state: &AppState,
    ai_chat_id: i64,
    refusal: &'static str,
) -> ApiResult<Subscription> {
    state.hub.subscribe(ai_chat_id).await.map_err(|err| {
        tracing::warn!(error = %err, "pub/sub subscribe failed");
        ApiError::Unavailable(refusal)
    })
}

/// How a waited-for message ended.
pub enum Outcome {
    Answered(AiMessage),
    Failed(String),
    /// Stopped before the model answered: no reply will come.
    Cancelled,
    /// Not done within the wait.
    Pending,
}

/// `?wait=true` → the longest wait; `false`/`0` → none; `N` → N seconds (at most the longest).
pub fn parse_wait(raw: Option<&str>, max_secs: u64) -> ApiResult<Option<Duration>> {
    let Some(raw) = raw else { return Ok(None) };
    let secs = match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "" => max_secs,
        "false" | "0" | "no" => 0,
        n => match n.parse::<u64>() {
            Ok(n) if n <= max_secs => n,
            _ => {
                return Err(FieldErrors::single(
                    "wait",
                    format!("Must be true, false or a number of seconds from 0 to {max_secs}."),
                ));
            }
        },
    };
    Ok((secs > 0).then(|| Duration::from_secs(secs)))
}

/// Waits for the reply to `message_id` (a stopped one included), or its failure or
/// cancellation, on `events`, for at most `limit`.
pub async fn wait_for_reply(
    state: &AppState,
    events: &mut Subscription,
    message_id: i64,
    limit: Duration,
) -> ApiResult<Outcome> {
    let deadline = Instant::now() + limit;
    loop {
        match timeout_at(deadline, events.recv()).await {
            Ok(Ok(text)) => match serde_json::from_str::<ChatEvent>(&text) {
                Ok(ChatEvent::AssistantMessage { message })
                    if message.reply_to == Some(message_id) =>
                {
                    return stored_outcome(state, message_id).await;
                }
                Ok(ChatEvent::Error {
                    message,
                    message_id: Some(id),
                }) if id == message_id => {
                    return Ok(Outcome::Failed(message));
                }
                Ok(ChatEvent::MessageCancelled { message_id: id }) if id == message_id => {
                    return Ok(Outcome::Cancelled);
                }
                // Gone with its chat: the database says so (404).
                Ok(ChatEvent::ChatDeleted { .. }) => {
                    return stored_outcome(state, message_id).await;
                }
                _ => {}
            },
            // Fell behind, the channel closed, or time is up: the database has the final word.
            Ok(Err(_)) | Err(_) => return stored_outcome(state, message_id).await,
        }
    }
}

async fn stored_outcome(state: &AppState, message_id: i64) -> ApiResult<Outcome> {
    if let Some(reply) = db::ai_messages::find_reply(&state.db, message_id).await? {
        return Ok(Outcome::Answered(reply));
    }
    match db::ai_messages::find_message(&state.db, message_id).await? {
        Some(m) if m.status == MessageStatus::Failed => {
            Ok(Outcome::Failed(m.error.unwrap_or_default()))
        }
        Some(m) if m.status == MessageStatus::Cancelled => Ok(Outcome::Cancelled),
        Some(_) => Ok(Outcome::Pending),
        None => Err(ApiError::NotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_wait;
    use std::time::Duration;

    #[test]
    fn wait_takes_true_false_or_seconds_up_to_the_maximum() {
        assert_eq!(parse_wait(None, 60).ok(), Some(None));
        assert_eq!(
            parse_wait(Some("true"), 60).ok(),
            Some(Some(Duration::from_secs(60)))
        );
        assert_eq!(parse_wait(Some("false"), 60).ok(), Some(None));
        assert_eq!(parse_wait(Some("0"), 60).ok(), Some(None));
        assert_eq!(
            parse_wait(Some("1"), 60).ok(),
            Some(Some(Duration::from_secs(1)))
        );
        assert_eq!(
            parse_wait(Some("60"), 60).ok(),
            Some(Some(Duration::from_secs(60)))
        );
        assert!(parse_wait(Some("61"), 60).is_err());
        assert!(parse_wait(Some("-1"), 60).is_err());
        assert!(parse_wait(Some("soon"), 60).is_err());
    }
}
