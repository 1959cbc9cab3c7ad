//! Catch-up: a socket opened with `after_id` first gets the chat's stored messages after it, as
//! the events they produced (a failed message followed by its `error`, a cancelled one by
//! `message_cancelled`), then each reply in progress as `assistant_partial`; the live events of
//! those messages are then not sent again, nor the deltas the partials hold (by `seq`). The
//! filtering covers the seam only: a message's event is held back once, and a question's end
//! (its reply, `error` or `message_cancelled`) ends the filtering of its events and deltas, so
//! a later regeneration or retry of it reaches the socket whole.
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;

use aichat_shared::db;
use aichat_shared::db::ai_messages::Branches;
use aichat_shared::domain::{AiMessage, MessageStatus, Role};
use aichat_shared::events::{ChatEvent, EventMessage};
use aichat_shared::partial;

use super::sink::{Sink, send_text};
use crate::state::AppState;

/// Stored messages a socket's catch-up sends at most; past it the socket says so
/// (`catch_up_truncated`) and the client reads the rest over REST.
const CATCH_UP_LIMIT: i64 = 500;
/// Stored messages a catch-up reads at a time: what it holds while a slow client takes them
/// (up to 32,000 characters each).
const CATCH_UP_PAGE: i64 = 50;

/// How a catch-up ended.
pub(super) enum CatchUp {
    Sent,
    /// The client is gone (a send failed or timed out).
    Gone,
    /// The stored messages could not be read.
    Unavailable,
}

/// Replies in progress a catch-up reports at most.
const PARTIALS_LIMIT: i64 = 100;

/// What a catch-up sent: the stored messages, and the replies in progress up to which delta.
#[derive(Default)]
pub(super) struct CaughtUp {
    messages: HashSet<i64>,
    partials: HashMap<i64, u64>,
}

impl CaughtUp {
    /// Whether a live event repeats what the catch-up already sent: a stored message (its
    /// event is held back once: the same event again is new), or a delta a partial holds. A
    /// live `assistant_partial` (the reply started over) goes through and ends the filtering
    /// of that reply's deltas: what follows it is numbered from 1. A question's reply, `error`
    /// or `message_cancelled` ends the filtering of the question: what follows is a new run.
    pub(super) fn repeats(&mut self, event: &str) -> bool {
        if self.messages.is_empty() && self.partials.is_empty() {
            return false;
        }
        let Ok(ids) = serde_json::from_str::<EventIds>(event) else {
            return false;
        };
        if let Some(message) = ids.message {
            if let Some(question) = message.reply_to {
                self.ended(question);
            }
            return message.id.is_some_and(|id| self.messages.remove(&id));
        }
        match (ids.kind.as_deref(), ids.message_id, ids.seq) {
            (Some("assistant_delta"), Some(id), Some(seq)) => {
                self.partials.get(&id).is_some_and(|&sent| seq <= sent)
            }
            (Some("assistant_partial"), Some(id), _) => {
                self.partials.remove(&id);
                false
            }
            (Some("error" | "message_cancelled"), Some(id), _) => {
                self.ended(id);
                false
            }
            _ => false,
        }
    }

    /// The run of `question` the catch-up saw is over: nothing of it is filtered any more.
    fn ended(&mut self, question: i64) {
        self.messages.remove(&question);
        self.partials.remove(&question);
    }
}

#[derive(Deserialize)]
struct EventIds {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<MessageIds>,
    message_id: Option<i64>,
    seq: Option<u64>,
}

/// The ids of an event's `message`.
#[derive(Deserialize)]
struct MessageIds {
    id: Option<i64>,
    reply_to: Option<i64>,
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
    // Pages of `CATCH_UP_PAGE` after the last message sent, each read one past what it may
    // send, so that the last one knows whether more follow (`catch_up_truncated`). A message
    // stored while the pages are read is in a later page and held back live like any at the
    // seam; a branch switch meanwhile is announced live (`active_path_changed`).
    let mut last_sent = after_id;
    let mut sent = 0;
    let truncated = loop {
        let want = CATCH_UP_PAGE.min(CATCH_UP_LIMIT - sent);
        let mut page = match db::ai_messages::list_chat_messages(
            &state.db,
            ai_chat_id,
            Branches::Active,
            Some(last_sent),
            Some(want + 1),
        )
        .await
        {
            Ok(page) => page,
            Err(err) => {
                tracing::warn!(error = %err, "catch-up query failed");
                return CatchUp::Unavailable;
            }
        };
        let more = page.len() > want as usize;
        page.truncate(want as usize);
        if !send_stored(&page, sink, caught_up, send_timeout).await {
            return CatchUp::Gone;
        }
        sent += page.len() as i64;
        last_sent = page.last().map_or(last_sent, |m| m.id);
        if !more {
            break false;
        }
        if sent >= CATCH_UP_LIMIT {
            break true;
        }
    };
    let partials = match replies_in_progress(state, ai_chat_id).await {
        Ok(partials) => partials,
        Err(err) => {
            tracing::warn!(error = %err, "catch-up of the replies in progress failed");
            return CatchUp::Unavailable;
        }
    };
    for (message_id, partial) in partials {
        caught_up.partials.insert(message_id, partial.seq);
        let event = ChatEvent::AssistantPartial {
            message_id,
            content: partial.content(),
            seq: partial.seq,
        };
        let text = serde_json::to_string(&event).unwrap_or_default();
        if !send_text(sink, text, send_timeout).await {
            return CatchUp::Gone;
        }
    }
    if truncated {
        let event = ChatEvent::CatchUpTruncated {
            next_after_id: last_sent,
        };
        let text = serde_json::to_string(&event).unwrap_or_default();
        if !send_text(sink, text, send_timeout).await {
            return CatchUp::Gone;
        }
    }
    CatchUp::Sent
}

/// Sends `messages` (stored, of the chat's active path) as the events they produced, noting in
/// `caught_up` those whose live events are to be held back. False when the client is gone.
async fn send_stored(
    messages: &[AiMessage],
    sink: &mut Sink,
    caught_up: &mut CaughtUp,
    send_timeout: Duration,
) -> bool {
    for message in messages {
        // A user message that has ended may be queued again (a retry, a regeneration) and
        // announced with its id again: only replies and questions still waiting, which a send
        // in the few milliseconds between the subscription and this read announces live too,
        // are filtered. (A question sent and ended within that window is seen twice, ending as
        // stored.)
        if message.role == Role::Assistant
            || matches!(
                message.status,
                MessageStatus::Queued | MessageStatus::Answering
            )
        {
            caught_up.messages.insert(message.id);
        }
        for event in stored_events(message) {
            if !send_text(sink, event, send_timeout).await {
                return false;
            }
        }
    }
    true
}

/// The replies in progress in the chat, as they stand: read after the socket subscribed, so
/// the live deltas numbered above each one's `seq` are exactly what it lacks.
async fn replies_in_progress(
    state: &AppState,
    ai_chat_id: i64,
) -> aichat_shared::error::Result<Vec<(i64, partial::Partial)>> {
    let ids = db::ai_messages::answering_in_chat(&state.db, ai_chat_id, PARTIALS_LIMIT).await?;
    let partials = partial::read_many(&mut state.redis.clone(), &state.ns, &ids).await?;
    Ok(ids.into_iter().zip(partials).collect())
}

/// The events a stored message produced: its message event, then for a user message that got
/// no reply, why (`error`, `message_cancelled`).
fn stored_events(message: &AiMessage) -> Vec<String> {
    let mut events = Vec::with_capacity(2);
    if message.role == Role::Assistant {
        events.push(ChatEvent::AssistantMessage {
            message: EventMessage::assistant(message),
        });
    } else {
        events.push(ChatEvent::UserMessage {
            message: EventMessage::user(message),
        });
        match message.status {
            MessageStatus::Failed => events.push(ChatEvent::Error {
                message: message.error.clone().unwrap_or_default(),
                message_id: Some(message.id),
            }),
            MessageStatus::Cancelled => events.push(ChatEvent::MessageCancelled {
                message_id: message.id,
            }),
            _ => {}
        }
    }
    events
        .iter()
        .map(|event| serde_json::to_string(event).unwrap_or_default())
        .collect()
}
