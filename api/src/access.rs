//! Who may reach what: an AI chat is its owner's alone, a user-to-user chat its participants'.
//! Anyone else's is not found (404) rather than forbidden, so that an id says nothing about
//! whether it exists.
use aichat_shared::db;
use aichat_shared::domain::{AiChat, AiMessage, Role};

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The 404 of every route of an AI chat: someone else's is not found either.
pub const NOT_OWNED: &str = "No such AI chat of the user's";

/// The 404 of every route of a user-to-user chat.
pub const NOT_A_PARTICIPANT: &str = "No such chat, or the user does not take part in it";

/// Not found unless `user_id` owns AI chat `id` (no chat fields are loaded).
pub async fn ensure_owner(state: &AppState, id: i64, user_id: i64) -> ApiResult<()> {
    if db::ai_chats::is_owner(&state.db, id, user_id).await? {
        Ok(())
    } else {
        Err(ApiError::NotFound)
    }
}

/// The AI chat `id` if `user_id` owns it; anyone else's is not found.
pub async fn owned_chat(state: &AppState, id: i64, user_id: i64) -> ApiResult<AiChat> {
    db::ai_chats::get_ai_chat(&state.db, id, user_id)
        .await?
        .ok_or(ApiError::NotFound)
}

/// `err`, unless `user_id` does not own AI chat `ai_chat_id`: then 404, as when ownership was
/// checked before anything else. Only refusals pay for this query; a send that goes through
/// is checked by its insert.
pub async fn not_found_first(
    state: &AppState,
    ai_chat_id: i64,
    user_id: i64,
    err: ApiError,
) -> ApiError {
    if matches!(err, ApiError::NotFound) {
        return err;
    }
    match ensure_owner(state, ai_chat_id, user_id).await {
        Ok(()) => err,
        Err(not_owner) => not_owner,
    }
}

/// The user message `id` if it is in one of `user_id`'s AI chats; someone else's, an assistant
/// message or none is not found. What the routes of one message a user sent take (stop,
/// retry, stream).
pub async fn own_user_message(state: &AppState, user_id: i64, id: i64) -> ApiResult<AiMessage> {
    db::ai_messages::get_user_message(&state.db, id, user_id)
        .await?
        .filter(|m| m.role == Role::User)
        .ok_or(ApiError::NotFound)
}

/// Not found unless `user_id` takes part in user-to-user chat `chat_id`.
pub async fn ensure_participant(state: &AppState, chat_id: i64, user_id: i64) -> ApiResult<()> {
    if db::chats::is_participant(&state.db, chat_id, user_id).await? {
        Ok(())
    } else {
        Err(ApiError::NotFound)
    }
}
