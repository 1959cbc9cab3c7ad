//! Catch-up: a socket opened with `after_id` first gets the chat's stored messages after it, as
//! the events they produced; the live events of those messages are then not sent again.
use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

use aichat_shared::db;
use aichat_shared::domain::{AiMessage, Role};
use aichat_shared::events::{ChatEvent, EventMessage};

use super::sink::{Sink, send_text};
use crate::state::AppState;

/// Stored messages a socket's catch-up sends at most; past it the socket says so
/// (`catch_up_truncated`) and the client reads the rest over REST.
const CATCH_UP_LIMIT: i64 = 500;

/// How a catch-up ended.
pub(super) enum CatchUp {
    Sent,
    /// The client is gone (a send failed or timed out).
    Gone,
    /// The stored messages could not be read.
    Unavailable,
}

/// The ids of the messages a catch-up sent.
#[derive(Default)]
pub(super) struct CaughtUp(HashSet<i64>);

impl CaughtUp {
    /// Whether a live event repeats a message the catch-up already sent.
    pub(super) fn repeats(&self, event: &str) -> bool {
        if self.0.is_empty() {
            return false;
        }
        serde_json::from_str::<EventIds>(event)
            .ok()
            .and_then(|e| e.message)
            .and_then(|m| m.get("id").and_then(|id| id.as_i64()))
            .is_some_and(|id| self.0.contains(&id))
    }
}

#[derive(Deserialize)]
struct EventIds {
    message: Option<serde_json::Value>,
}

/// Sends the stored messages after `after_id` (at most [`CATCH_UP_LIMIT`], then
/// `catch_up_truncated` when there are more), noting their ids in `caught_up`.
pub(super) async fn catch_up(
    state: &AppState,
    ai_chat_id: i64,
    after_id: i64,
    sink: &mut Sink,
    caught_up: &mut CaughtUp,
) -> CatchUp {
    let send_timeout = Duration::from_secs(state.settings.ws_send_timeout_secs);
    let limit = Some(CATCH_UP_LIMIT + 1);
    let mut messages =
        match db::ai_messages::list_chat_messages(&state.db, ai_chat_id, Some(after_id), limit)
            .await
        {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(error = %err, "catch-up query failed");
                return CatchUp::Unavailable;
            }
        };
    let truncated = messages.len() > CATCH_UP_LIMIT as usize;
    messages.truncate(CATCH_UP_LIMIT as usize);
    for message in &messages {
        caught_up.0.insert(message.id);
        if !send_text(sink, stored_event(message), send_timeout).await {
            return CatchUp::Gone;
        }
    }
    if let Some(last) = messages.last().filter(|_| truncated) {
        let event = ChatEvent::CatchUpTruncated {
            next_after_id: last.id,
        };
        let text = serde_json::to_string(&event).unwrap_or_default();
        if !send_text(sink, text, send_timeout).await {
            return CatchUp::Gone;
        }
    }
    CatchUp::Sent
}

/// The event a stored message would have produced.
fn stored_event(message: &AiMessage) -> String {
    let event = if message.role == Role::Assistant {
        ChatEvent::AssistantMessage {
            message: EventMessage::assistant(message),
        }
    } else {
        ChatEvent::UserMessage {
            message: EventMessage::user(message),
        }
    };
    serde_json::to_string(&event).unwrap_or_default()
}
