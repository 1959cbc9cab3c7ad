//! What a client may send over the socket: `{"type": "message", "content", ...}` is sent as
//! REST's `send_message` would (the same rules, [`SendMessage`]); any other type (`typing`
//! included) is ignored. A frame's problem comes back as the text of an `error` event.
use serde::Deserialize;

use aichat_shared::domain::User;

use crate::error::ApiError;
use crate::json_body::{self, BodyError};
use crate::send::{SendFields, SendMessage, submit_message};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
struct ClientFrame {
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Any JSON value: a frame of another type may carry anything here, and a `message` whose
    /// content is not a string is told it is empty.
    content: Option<serde_json::Value>,
    include_related_chat_context: Option<bool>,
    context_message_limit: Option<i64>,
}

impl ClientFrame {
    fn fields(&self) -> SendFields<'_> {
        SendFields {
            content: self.content.as_ref().and_then(serde_json::Value::as_str),
            include_related_chat_context: self.include_related_chat_context,
            context_message_limit: self.context_message_limit,
        }
    }
}

/// Handles one client frame; returns the error to send back, if any.
pub(super) async fn handle_frame(
    state: &AppState,
    user: &User,
    ai_chat_id: i64,
    text: &str,
) -> Option<String> {
    let frame = match json_body::parse_object::<ClientFrame>(text.as_bytes()) {
        Ok(frame) => frame,
        Err(BodyError::Syntax(_)) => return Some("Invalid JSON".into()),
        Err(err) => return Some(err.message()),
    };
    if frame.kind.as_deref() != Some("message") {
        return None;
    }
    let send = match SendMessage::parse(frame.fields(), state.settings.max_content_chars) {
        Ok(send) => send,
        Err(refused) => return Some(refused.socket_message()),
    };
    // `submit_message` checks ownership in its insert: a chat deleted since the upgrade is 404.
    let request_id = Some(format!("ws-{}", uuid::Uuid::new_v4().simple()));
    match submit_message(state, user.id, ai_chat_id, send, request_id).await {
        Ok(_) => None, // the `user_message` event comes back through the fan-out
        Err(ApiError::Internal(err)) => {
            tracing::error!(error = ?err, "WebSocket message failed");
            Some("Internal server error".into())
        }
        Err(err) => Some(err.to_string()),
    }
}
