//! What a client may send over the socket: `{"type": "message", "content", ...}` is sent as
//! REST's `send_message` would (the same rules, [`SendMessage`]); `{"type": "stop",
//! "message_id": N}`, `{"type": "regenerate", "message_id": N}` and `{"type": "edit",
//! "message_id": N, "content": "..."}` do what REST's `stop`, `regenerate` and `edit` do (their
//! outcome comes as the chat's events); any other type (`typing` included) is ignored. A
//! frame's problem comes back as the text of an `error` event.
use serde::Deserialize;

use aichat_shared::domain::User;

use crate::access::own_user_message;
use crate::auth::live_session;
use crate::error::ApiError;
use crate::json_body::{self, BodyError};
use crate::send::stop::Recorded;
use crate::send::{self, SendFields, SendMessage, Sender, submit_message};
use crate::state::AppState;

/// Who a socket's frames come from: its user, and its session's token hash.
pub(super) struct SocketUser {
    pub(super) user: User,
    pub(super) token_hash: Vec<u8>,
}

impl SocketUser {
    /// The sender of a frame that queues a message, with the daily token budget as it is now:
    /// the session is read again (from this instance's cache, which a budget change empties on
    /// every instance), so a budget staff set while the socket was open holds from its next
    /// send.
    async fn sender(&self, state: &AppState) -> Result<Sender, ApiError> {
        let session = live_session(state, &self.token_hash)
            .await?
            .ok_or(ApiError::Unauthenticated)?;
        Ok(Sender {
            user_id: self.user.id,
            daily_token_budget: session.daily_token_budget,
        })
    }
}

#[derive(Debug, Deserialize)]
struct ClientFrame {
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Any JSON value: a frame of another type may carry anything here, and a `message` whose
    /// content is not a string is told it is empty.
    content: Option<serde_json::Value>,
    include_related_chat_context: Option<bool>,
    context_message_limit: Option<i64>,
    /// For `stop`, `regenerate` and `edit`: any JSON value, told when it is not a message id.
    message_id: Option<serde_json::Value>,
}

impl ClientFrame {
    fn content(&self) -> Option<&str> {
        self.content.as_ref().and_then(serde_json::Value::as_str)
    }

    fn fields(&self) -> SendFields<'_> {
        SendFields {
            content: self.content(),
            include_related_chat_context: self.include_related_chat_context,
            context_message_limit: self.context_message_limit,
        }
    }

    /// An edit's fields: its `content` only, as REST's edit takes them (the new version keeps
    /// its turn's context settings).
    fn edit_fields(&self) -> SendFields<'_> {
        SendFields {
            content: self.content(),
            include_related_chat_context: None,
            context_message_limit: None,
        }
    }
}

/// Handles one client frame; returns the error to send back, if any.
pub(super) async fn handle_frame(
    state: &AppState,
    socket_user: &SocketUser,
    ai_chat_id: i64,
    text: &str,
) -> Option<String> {
    let user = &socket_user.user;
    let frame = match json_body::parse_object::<ClientFrame>(text.as_bytes()) {
        Ok(frame) => frame,
        Err(BodyError::Syntax(_)) => return Some("Invalid JSON".into()),
        Err(err) => return Some(err.message()),
    };
    match frame.kind.as_deref() {
        Some("message") => {}
        Some("stop") => return stop(state, user, frame.message_id.as_ref()).await,
        Some(kind @ ("regenerate" | "edit")) => {
            return new_version(state, socket_user, kind, &frame).await;
        }
        _ => return None,
    }
    let send = match SendMessage::parse(frame.fields(), state.settings.max_content_chars) {
        Ok(send) => send,
        Err(refused) => return Some(refused.socket_message()),
    };
    // `submit_message` checks ownership in its insert: a chat deleted since the upgrade is 404.
    let request_id = Some(format!("ws-{}", uuid::Uuid::new_v4().simple()));
    let sender = match socket_user.sender(state).await {
        Ok(sender) => sender,
        Err(err) => return Some(socket_error(err, "WebSocket message failed")),
    };
    match submit_message(state, sender, ai_chat_id, send, request_id).await {
        Ok(_) => None, // the `user_message` event comes back through the fan-out
        Err(err) => Some(socket_error(err, "WebSocket message failed")),
    }
}

/// A `stop` frame: the message of any of the user's chats (as REST's route takes it), its
/// outcome published to that chat. Only a refusal is answered here.
async fn stop(
    state: &AppState,
    user: &User,
    message_id: Option<&serde_json::Value>,
) -> Option<String> {
    let Some(message_id) = message_id.and_then(serde_json::Value::as_i64) else {
        return Some("message_id: must be the id of a message".into());
    };
    let recorded = send::stop::record(state, user.id, message_id, |_| async { Ok(()) }).await;
    let refused = match recorded {
        Ok(Recorded::Ended) => send::stop::outcome(state, user.id, message_id).await.err(),
        Ok(Recorded::Cancelled(_) | Recorded::Requested) => None,
        Err(err) => Some(err),
    };
    refused.map(|err| socket_error(err, "WebSocket stop failed"))
}

/// A `regenerate` or `edit` frame: the message of any of the user's chats, as REST's routes
/// take it; the new message's events come through the fan-out. Only a refusal is answered.
async fn new_version(
    state: &AppState,
    socket_user: &SocketUser,
    kind: &str,
    frame: &ClientFrame,
) -> Option<String> {
    let user = &socket_user.user;
    let Some(message_id) = frame
        .message_id
        .as_ref()
        .and_then(serde_json::Value::as_i64)
    else {
        return Some("message_id: must be the id of a message".into());
    };
    let request_id = Some(format!("ws-{}", uuid::Uuid::new_v4().simple()));
    let sender = match socket_user.sender(state).await {
        Ok(sender) => sender,
        Err(err) => return Some(socket_error(err, "WebSocket regenerate or edit failed")),
    };
    let result = if kind == "edit" {
        let content =
            match SendMessage::parse(frame.edit_fields(), state.settings.max_content_chars) {
                Ok(send) => send.content,
                Err(refused) => return Some(refused.socket_message()),
            };
        match own_user_message(state, user.id, message_id).await {
            Ok(question) => {
                send::versions::edit(state, sender, &question, content, request_id).await
            }
            Err(err) => Err(err),
        }
    } else {
        match send::versions::question_of(state, user.id, message_id).await {
            Ok(question) => send::versions::regenerate(state, sender, &question, request_id).await,
            Err(err) => Err(err),
        }
    };
    result
        .err()
        .map(|err| socket_error(err, "WebSocket regenerate or edit failed"))
}

/// The text of an `error` event for `err`: its own words, or no detail for an internal error
/// (logged with `what`).
fn socket_error(err: ApiError, what: &'static str) -> String {
    match err {
        ApiError::Internal(err) => {
            tracing::error!(error = ?err, "{what}");
            "Internal server error".into()
        }
        err => err.to_string(),
    }
}
