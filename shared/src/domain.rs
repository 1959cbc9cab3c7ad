//! Domain types: what the database returns and the API serialises, field names as in the contract.
use std::collections::BTreeMap;

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

/// Who wrote a message of an AI chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    System,
}

/// Where a message of an AI chat stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    /// A user message waiting for its reply.
    Queued,
    /// A user message a worker has taken: the model is being asked (or the worker waits for
    /// the shared rate limit). Clients that do not know it treat it like `queued`.
    Answering,
    /// A user message that has its reply (a stopped one included).
    Answered,
    /// A user message the model could not answer; `error` says why.
    Failed,
    /// A user message its user stopped before the model was asked: it gets no reply.
    Cancelled,
    /// Every assistant message.
    Complete,
}

/// A stored name that is none of an enum's.
#[derive(Debug, thiserror::Error)]
#[error("unknown {kind} {name:?}")]
pub struct UnknownName {
    kind: &'static str,
    name: String,
}

/// An enum stored in a `text` column and sent as a JSON string under the same lowercase names
/// (the contract's), compared with those names, and read back from them.
macro_rules! text_enum {
    ($ty:ident, $kind:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = UnknownName;

            fn from_str(name: &str) -> Result<Self, UnknownName> {
                match name {
                    $($name => Ok($ty::$variant),)+
                    other => Err(UnknownName {
                        kind: $kind,
                        name: other.to_owned(),
                    }),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, name: &&str) -> bool {
                self.as_str() == *name
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $ty {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $ty {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::postgres::PgHasArrayType>::array_compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $ty {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let name = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(name.parse()?)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }
    };
}

text_enum!(Role, "role", { User => "user", Assistant => "assistant", System => "system" });
text_enum!(MessageStatus, "status", {
    Queued => "queued",
    Answering => "answering",
    Answered => "answered",
    Failed => "failed",
    Cancelled => "cancelled",
    Complete => "complete",
});

/// A message of an AI chat.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct AiMessage {
    pub id: i64,
    pub ai_chat: i64,
    pub role: Role,
    pub content: String,
    pub timestamp: DateTime<Utc>,
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub total_tokens: Option<i32>,
    /// `queued`, `answering`, `answered`, `failed` or `cancelled` for user messages;
    /// `complete` for assistant messages.
    pub status: MessageStatus,
    /// Why a user message failed; null otherwise.
    pub error: Option<String>,
    pub model: Option<String>,
    /// For an assistant message: the user message it answers.
    pub reply_to: Option<i64>,
    /// An assistant message its user stopped while it streamed: `content` is the text
    /// generated until then. Always false on user messages.
    pub stopped: bool,
    /// The message this one follows: for a user message, the question of the turn before
    /// (null for the first); for an assistant message, the question it answers.
    pub parent_id: Option<i64>,
    /// 1, 2, … among its siblings (the messages with the same `parent_id` and role): an edit
    /// adds a user message, a regeneration a reply.
    pub version: i32,
    /// On the path the user sees (and the model is sent).
    pub active: bool,
    /// What an assistant message cost, as an exact decimal string in `currency` (e.g.
    /// `"0.00045"`), from the prices of the model that answered. Null on user messages, and
    /// on replies of a model without prices or saved before costs were recorded.
    #[schema(example = "0.00045")]
    pub cost: Option<String>,
    /// The currency of `cost` (e.g. `"USD"`); null exactly when `cost` is.
    #[schema(example = "USD")]
    pub currency: Option<String>,
}

/// What a user message asks of the completion job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextOptions {
    pub include_related_chat_context: bool,
    pub context_message_limit: i32,
}

/// Money spent, per currency: each currency (e.g. `USD`) to the exact decimal sum of the costs
/// in it, as a string without trailing zeros (e.g. `{"USD": "0.00075"}`; `"0.00045"` and
/// `"0.00035"` make `"0.0008"`). Summed by PostgreSQL's `numeric`, never by floats, so the
/// parts of a total add up to it to the last digit. Replies without a cost (unpriced models)
/// add nothing: empty when none was priced.
pub type Costs = BTreeMap<String, String>;

/// Token totals over a set of assistant messages.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct TokenTotals {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// Assistant messages counted.
    pub message_count: i64,
    /// What those messages cost, per currency (currency → exact decimal string); `{}` when
    /// none of them was priced.
    #[schema(example = json!({"USD": "0.00075"}))]
    pub cost: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelUsage {
    pub model: String,
    #[serde(flatten)]
    pub totals: TokenTotals,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DailyUsage {
    /// UTC day, `YYYY-MM-DD`.
    pub day: NaiveDate,
    #[serde(flatten)]
    pub totals: TokenTotals,
}

/// `GET /api/ai/usage/`: one user's token use.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub total: TokenTotals,
    pub by_model: Vec<ModelUsage>,
    pub by_day: Vec<DailyUsage>,
}
