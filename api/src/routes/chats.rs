//! User-to-user chats: the conversations AI chats can draw context from.
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use aichat_shared::db;
use aichat_shared::domain::{Chat, ChatMessage};

use crate::access::{NOT_A_PARTICIPANT, ensure_participant};
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, FieldErrors};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::paging::{DEFAULT_LIMIT, MAX_LIMIT, Order, Page, PageQuery};
use crate::routes::schemas::{BAD_PAGE, BadRequestBody, ErrorBody};
use crate::state::AppState;
use crate::validate;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_chats, create_chat))
        .routes(routes!(get_chat, delete_chat))
        .routes(routes!(send_chat_message))
        .routes(routes!(list_chat_messages))
}

/// The chats the user takes part in, newest first (100 a page by default; a full page links
/// to the next).
#[utoipa::path(get, path = "/api/chats/", tag = "chats", params(PageQuery),
    responses((status = 200, description = "A page of chats", body = Vec<Chat>,
            headers(("Link" = String, description = "When the page is full: `<url>; rel=\"next\"`, the next page"))),
        (status = 400, description = BAD_PAGE, body = BadRequestBody)))]
#[tracing::instrument(skip_all)]
async fn list_chats(
    State(state): State<AppState>,
    auth: AuthUser,
    uri: Uri,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> ApiResult<Page<Chat>> {
    let (before_id, limit) = page.read(Order::NewestFirst, DEFAULT_LIMIT)?;
    let mut conn = state.db.acquire().await?;
    let chats = db::chats::list_chats(&mut conn, auth.user.id, before_id, limit).await?;
    Ok(Page::new(chats, limit, &uri, Order::NewestFirst, |c| c.id))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateChatRequest {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    participant_ids: Option<Vec<i64>>,
    #[serde(default)]
    participant_usernames: Option<Vec<String>>,
}

/// Create a chat; the creator always takes part. Unknown usernames are skipped; unknown ids are 400.
#[utoipa::path(post, path = "/api/chats/", tag = "chats", request_body = CreateChatRequest,
    responses((status = 201, description = "The new chat", body = Chat),
        (status = 400, description = "Field errors; or a body that is not a JSON object", body = BadRequestBody)))]
#[tracing::instrument(skip_all)]
async fn create_chat(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiJson(body): ApiJson<CreateChatRequest>,
) -> ApiResult<(StatusCode, Json<Chat>)> {
    let mut errors = FieldErrors::default();
    let name = validate::required_text(&mut errors, "name", body.name.as_deref(), 255);
    let mut ids = body.participant_ids.unwrap_or_default();
    // As stored and looked up at registration and login: a spelling that logs bob in names him.
    let usernames: Vec<String> = body
        .participant_usernames
        .unwrap_or_default()
        .iter()
        .map(|username| validate::normalize_username(username))
        .collect();
    let max = usize::try_from(state.settings.max_chat_participants).unwrap_or(usize::MAX);
    let too_many = format!("At most {max} participants, the creator included.");
    if ids.len() > max || usernames.len() > max {
        errors.add("participant_ids", too_many.clone());
    }
    for username in &usernames {
        if !validate::no_nul(&mut errors, "participant_usernames", username) {
            break;
        }
    }
    if errors.is_empty() && !ids.is_empty() {
        for id in db::users::unknown_user_ids(&state.db, &ids).await? {
            errors.add(
                "participant_ids",
                format!("Invalid pk \"{id}\" - object does not exist."),
            );
        }
    }
    errors.check()?;
    let name = name.ok_or(ApiError::BadRequest("name is required".into()))?;
    if !usernames.is_empty() {
        ids.extend(db::users::ids_by_usernames(&state.db, &usernames).await?);
    }
    ids.push(auth.user.id);
    ids.sort_unstable();
    ids.dedup();
    if ids.len() > max {
        return Err(FieldErrors::single("participant_ids", too_many));
    }

    let mut tx = state.db.begin().await?;
    let chat = db::chats::insert_chat(&mut tx, name, &ids).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(chat)))
}

/// One chat the user takes part in.
#[utoipa::path(get, path = "/api/chats/{id}/", tag = "chats", params(("id" = i64, Path)),
    responses((status = 200, description = "The chat", body = Chat),
        (status = 404, description = NOT_A_PARTICIPANT, body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn get_chat(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<Chat>> {
    let mut conn = state.db.acquire().await?;
    let chat = db::chats::get_chat(&mut conn, id, auth.user.id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(chat))
}

/// Delete a chat; AI chats that referenced it keep living with `related_chat: null`.
#[utoipa::path(delete, path = "/api/chats/{id}/", tag = "chats", params(("id" = i64, Path)),
    responses((status = 204, description = "Deleted"),
        (status = 404, description = NOT_A_PARTICIPANT, body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn delete_chat(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    if db::chats::delete_chat(&state.db, id, auth.user.id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound)
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessageRequest {
    #[serde(default)]
    content: Option<String>,
}

/// Post a message to a chat the user takes part in.
#[utoipa::path(post, path = "/api/chats/{id}/send_message/", tag = "chats", params(("id" = i64, Path)),
    request_body = ChatMessageRequest,
    responses((status = 201, description = "The stored message", body = ChatMessage),
        (status = 400, description = "Field errors; or a body that is not a JSON object", body = BadRequestBody),
        (status = 404, description = NOT_A_PARTICIPANT, body = ErrorBody),
        (status = 409, description = crate::error::REFERENCE_GONE, body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn send_chat_message(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<ChatMessageRequest>,
) -> ApiResult<(StatusCode, Json<ChatMessage>)> {
    ensure_participant(&state, id, auth.user.id).await?;
    let mut errors = FieldErrors::default();
    let content = validate::required_text(
        &mut errors,
        "content",
        body.content.as_deref(),
        state.settings.max_content_chars,
    );
    errors.check()?;
    let content = content.ok_or(ApiError::BadRequest("content is required".into()))?;
    let mut conn = state.db.acquire().await?;
    let message = db::chats::insert_chat_message(&mut conn, id, auth.user.id, content)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok((StatusCode::CREATED, Json(message)))
}

/// The messages of a chat, oldest first (1000 a page by default; a full page links to the
/// next).
#[utoipa::path(get, path = "/api/chats/{id}/messages/", tag = "chats", params(("id" = i64, Path), PageQuery),
    responses((status = 200, description = "A page of the chat's messages", body = Vec<ChatMessage>,
            headers(("Link" = String, description = "When the page is full: `<url>; rel=\"next\"`, the next page"))),
        (status = 400, description = BAD_PAGE, body = BadRequestBody),
        (status = 404, description = NOT_A_PARTICIPANT, body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn list_chat_messages(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
    uri: Uri,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> ApiResult<Page<ChatMessage>> {
    let (after_id, limit) = page.read(Order::OldestFirst, MAX_LIMIT)?;
    ensure_participant(&state, id, auth.user.id).await?;
    let messages = db::chats::list_chat_messages(&state.db, id, after_id, limit).await?;
    Ok(Page::new(messages, limit, &uri, Order::OldestFirst, |m| {
        m.id
    }))
}
