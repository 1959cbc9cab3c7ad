//! The JSON document of an export, which an import reads back.
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use aichat_shared::domain::{AiMessage, MessageStatus, Role};

/// The `format` tag of every export.
pub const FORMAT_TAG: &str = "aichat.chat";
/// The version of [`ChatExport`]'s shape this server writes and reads.
pub const FORMAT_VERSION: i64 = 1;

/// An AI chat as its export writes it and an import reads it. The related chat is not in it:
/// it is other users' conversation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatExport {
    /// Always `"aichat.chat"`.
    #[schema(example = "aichat.chat")]
    pub format: String,
    /// The version of this shape: 1.
    #[schema(example = 1)]
    pub version: i64,
    /// When the export was made; an import ignores it.
    pub exported_at: Option<DateTime<Utc>>,
    pub chat: ExportedChat,
    /// In id order: a message's parent comes before it.
    pub messages: Vec<ExportedMessage>,
}

/// The chat's own fields. An import checks them as a create does.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ExportedChat {
    pub title: String,
    pub system_prompt: String,
    pub model: String,
    /// When the exported chat was created; an import ignores it (the new chat is created now).
    pub created_at: Option<DateTime<Utc>>,
}

/// One message, with its place in the conversation's tree (`parent_id`, `version`, `active`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ExportedMessage {
    /// The message's id in the exported chat; an import gives it a new one.
    pub id: i64,
    /// The `id` of the message this one follows (an earlier one of the document): for a user
    /// message the question before it (null for the first), for a reply its question.
    pub parent_id: Option<i64>,
    /// `user` or `assistant`.
    pub role: Role,
    pub content: String,
    /// Kept by an import; absent: the time of the import.
    pub timestamp: Option<DateTime<Utc>>,
    /// A user message's `answered`, `failed` or `cancelled` (an import stores `queued` and
    /// `answering` as `cancelled`: nothing will answer them); a reply's `complete`.
    pub status: MessageStatus,
    /// 1, 2, … among the messages with the same parent and role (default 1).
    #[serde(default = "first_version")]
    pub version: i32,
    /// On the path the user sees (default true).
    #[serde(default = "on_path")]
    pub active: bool,
    pub model: Option<String>,
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub total_tokens: Option<i32>,
    /// What a reply cost, an exact decimal string in `currency` (e.g. `"0.00045"`); null on
    /// user messages and unpriced replies (absent: null).
    #[serde(default)]
    #[schema(example = "0.00045")]
    pub cost: Option<String>,
    /// The currency of `cost`, a code such as `"USD"`; null exactly when `cost` is.
    #[serde(default)]
    #[schema(example = "USD")]
    pub currency: Option<String>,
    /// A reply its user stopped while it streamed.
    #[serde(default)]
    pub stopped: bool,
    /// Why a user message failed.
    pub error: Option<String>,
}

fn first_version() -> i32 {
    1
}

fn on_path() -> bool {
    true
}

impl ExportedMessage {
    pub fn of(m: AiMessage) -> Self {
        ExportedMessage {
            id: m.id,
            parent_id: m.parent_id,
            role: m.role,
            content: m.content,
            timestamp: Some(m.timestamp),
            status: m.status,
            version: m.version,
            active: m.active,
            model: m.model,
            prompt_tokens: m.prompt_tokens,
            completion_tokens: m.completion_tokens,
            total_tokens: m.total_tokens,
            cost: m.cost,
            currency: m.currency,
            stopped: m.stopped,
            error: m.error,
        }
    }
}
