//! Events of one AI chat, published on its Redis channel and sent as-is to WebSocket clients.
use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::{AiMessage, Role};
use crate::error::Result;
use crate::keys::Namespace;

/// What an assistant message used: its tokens and what they cost (`AiMessage`'s fields of the
/// same names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenUsage {
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub total_tokens: Option<i32>,
    /// The reply's cost, an exact decimal string in `currency`; null when its model has no
    /// prices. (`default`: an event of a worker older than costs reads as unpriced.)
    #[serde(default)]
    #[schema(example = "0.00045")]
    pub cost: Option<String>,
    /// The currency of `cost` (e.g. `"USD"`); null exactly when `cost` is.
    #[serde(default)]
    #[schema(example = "USD")]
    pub currency: Option<String>,
}

/// A message as WebSocket events carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventMessage {
    pub id: i64,
    pub role: Role,
    pub content: String,
    pub timestamp: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TokenUsage>,
    /// For an assistant message: the user message it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<i64>,
    /// For an assistant message: whether its user stopped it while it streamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<bool>,
    /// The message this one follows (`AiMessage::parent_id`): absent on a chat's first message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<i64>,
    /// 1, 2, … among its siblings (`AiMessage::version`): a regenerated reply or an edited
    /// question is above 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i32>,
}

impl EventMessage {
    pub fn user(message: &AiMessage) -> Self {
        EventMessage {
            id: message.id,
            role: message.role,
            content: message.content.clone(),
            timestamp: message.timestamp,
            usage: None,
            reply_to: None,
            stopped: None,
            parent_id: message.parent_id,
            version: Some(message.version),
        }
    }

    pub fn assistant(message: &AiMessage) -> Self {
        EventMessage {
            usage: Some(TokenUsage {
                prompt_tokens: message.prompt_tokens,
                completion_tokens: message.completion_tokens,
                total_tokens: message.total_tokens,
                cost: message.cost.clone(),
                currency: message.currency.clone(),
            }),
            reply_to: message.reply_to,
            stopped: Some(message.stopped),
            ..EventMessage::user(message)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatEvent {
    UserMessage {
        message: EventMessage,
    },
    AssistantDelta {
        /// The user message being answered.
        message_id: i64,
        delta: String,
        /// 1, 2, 3 … per reply: the deltas up to it are the reply's text so far
        /// (`partial.rs`). Published by `partial::push_delta`, which numbers it.
        #[serde(default)]
        seq: u64,
    },
    /// A reply in progress as it stands: what a socket opened with `?after_id=` (or a stream of
    /// `/api/ai/messages/{id}/stream/`) gets first; only deltas numbered above `seq` follow.
    AssistantPartial {
        /// The user message being answered.
        message_id: i64,
        /// Its deltas up to `seq`, concatenated.
        content: String,
        seq: u64,
    },
    AssistantMessage {
        message: EventMessage,
    },
    Error {
        message: String,
        /// The user message that failed, when the error is about one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<i64>,
    },
    /// The user message was stopped before the model was asked: it is `cancelled` and gets
    /// no reply. (A message stopped while its reply streamed gets an `assistant_message` with
    /// `stopped: true` instead.)
    MessageCancelled {
        message_id: i64,
    },
    /// The catch-up of a socket opened with `?after_id=` stopped at its limit: the stored
    /// messages after `next_after_id` are to be read over REST
    /// (`GET /api/ai/chats/{id}/messages/?after_id=`). Live events follow as usual.
    CatchUpTruncated {
        next_after_id: i64,
    },
    /// The chat's active path is now the branch through `message_id` (a branch switch, or a
    /// regeneration of a question off the path): read the chat's messages again.
    ActivePathChanged {
        message_id: i64,
    },
    /// The chat was deleted, with its messages: its sockets close after this event, and its
    /// replies' streams end.
    ChatDeleted {
        ai_chat_id: i64,
    },
}

/// How a [`ChatEvent::ChatDeleted`] event's JSON begins (its tag comes first): what a socket
/// looks for in the events it forwards, without parsing each one.
const CHAT_DELETED_PREFIX: &str = r#"{"type":"chat_deleted""#;

impl ChatEvent {
    /// Whether `text`, an event as published, is a [`ChatEvent::ChatDeleted`].
    pub fn is_chat_deleted(text: &str) -> bool {
        text.starts_with(CHAT_DELETED_PREFIX)
    }

    /// Whether this event ends user message `message_id`: its reply (a stopped one
    /// included), its failure, or its cancellation.
    pub fn ends(&self, message_id: i64) -> bool {
        match self {
            ChatEvent::AssistantMessage { message } => message.reply_to == Some(message_id),
            ChatEvent::Error {
                message_id: Some(id),
                ..
            }
            | ChatEvent::MessageCancelled { message_id: id } => *id == message_id,
            _ => false,
        }
    }
}

/// Each `(ai_chat_id, event)` as it is published: its chat's channel and the event's JSON, in
/// order (for a publish made with other writes, as `JobQueue::enqueue_completions` makes it).
pub fn encode_events(ns: &Namespace, events: &[(i64, ChatEvent)]) -> Result<Vec<(String, String)>> {
    events
        .iter()
        .map(|(ai_chat_id, event)| {
            Ok((ns.chat_channel(*ai_chat_id), serde_json::to_string(event)?))
        })
        .collect()
}

/// Publishes `event` on the chat's channel; returns how many subscribers got it.
pub async fn publish_event(
    conn: &mut ConnectionManager,
    ns: &Namespace,
    ai_chat_id: i64,
    event: &ChatEvent,
) -> Result<usize> {
    let payload = serde_json::to_string(event)?;
    let receivers: usize = conn.publish(ns.chat_channel(ai_chat_id), payload).await?;
    Ok(receivers)
}

/// Publishes a stop request for the user message `message_id` to every worker process, after
/// it was recorded in the database (`db::stops::request_stop`); the worker answering it stops.
pub async fn publish_stop_request(
    conn: &mut ConnectionManager,
    ns: &Namespace,
    message_id: i64,
) -> Result<()> {
    let _receivers: usize = conn.publish(ns.stop_requests(), message_id).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ChatEvent;

    #[test]
    fn a_chat_deleted_event_is_told_by_its_beginning_and_no_other_is() {
        let deleted =
            serde_json::to_string(&ChatEvent::ChatDeleted { ai_chat_id: 7 }).expect("serialized");
        assert!(ChatEvent::is_chat_deleted(&deleted), "{deleted}");
        let other = serde_json::to_string(&ChatEvent::MessageCancelled { message_id: 7 })
            .expect("serialized");
        assert!(!ChatEvent::is_chat_deleted(&other), "{other}");
    }
}
