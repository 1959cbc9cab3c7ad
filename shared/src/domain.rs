//! Domain types: what the database returns and the API serialises, field names as in the contract.
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An account, as `/api/me/` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub email: String,
    pub is_staff: bool,
}

/// An account as other users see it in `/api/users/`.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct UserSummary {
    pub id: i64,
    pub username: String,
}

/// The stored credentials of an account, for login only.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserCredentials {
    pub id: i64,
    pub password_hash: String,
}

/// A user-to-user chat. Participants show only `{id, username}`: an account's email and staff
/// flag are its own business (`/api/me/`), not every chat partner's.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Chat {
    pub id: i64,
    pub name: String,
    pub participants: Vec<UserSummary>,
    pub created_at: DateTime<Utc>,
}

/// A message of a user-to-user chat.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatMessage {
    pub id: i64,
    pub chat: i64,
    pub sender: UserSummary,
    pub content: String,
    pub timestamp: DateTime<Utc>,
}

/// One line of a related chat, as context for the model.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct ContextMessage {
    /// The sender's username.
    pub sender: String,
    pub content: String,
    pub timestamp: DateTime<Utc>,
}

/// A conversation between one user and the model.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct AiChat {
    pub id: i64,
    /// The owner's user id.
    pub user: i64,
    pub user_username: String,
    pub related_chat: Option<i64>,
    pub related_chat_name: Option<String>,
    pub title: String,
    pub system_prompt: String,
    pub model: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub message_count: i64,
}

/// One AI chat with its messages, oldest first (`GET /api/ai/chats/{id}/`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AiChatDetail {
    #[serde(flatten)]
    pub chat: AiChat,
    pub messages: Vec<AiMessage>,
}

pub mod role {
    pub const USER: &str = "user";
    pub const ASSISTANT: &str = "assistant";
    pub const SYSTEM: &str = "system";
}

pub mod status {
    /// A user message waiting for its reply.
    pub const QUEUED: &str = "queued";
    /// A user message that has its reply.
    pub const ANSWERED: &str = "answered";
    /// A user message the model could not answer; `error` says why.
    pub const FAILED: &str = "failed";
    /// Every assistant message.
    pub const COMPLETE: &str = "complete";
}

/// A message of an AI chat.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct AiMessage {
    pub id: i64,
    pub ai_chat: i64,
    /// `user`, `assistant` or `system`.
    pub role: String,
    pub content: String,
    pub timestamp: DateTime<Utc>,
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub total_tokens: Option<i32>,
    /// `queued`, `answered` or `failed` for user messages; `complete` for assistant messages.
    pub status: String,
    /// Why a user message failed; null otherwise.
    pub error: Option<String>,
    pub model: Option<String>,
    /// For an assistant message: the user message it answers.
    pub reply_to: Option<i64>,
}

/// What a user message asks of the completion job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextOptions {
    pub include_related_chat_context: bool,
    pub context_message_limit: i32,
}

/// Token totals over a set of assistant messages.
#[derive(Debug, Clone, Default, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct TokenTotals {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// Assistant messages counted.
    pub message_count: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct ModelUsage {
    pub model: String,
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub totals: TokenTotals,
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct DailyUsage {
    /// UTC day, `YYYY-MM-DD`.
    pub day: NaiveDate,
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub totals: TokenTotals,
}

/// `GET /api/ai/usage/`: one user's token use.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub total: TokenTotals,
    pub by_model: Vec<ModelUsage>,
    pub by_day: Vec<DailyUsage>,
}
