//! AI chats: create, read, change and delete them, and read their related chat.
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use aichat_shared::budget::Reservation;
use aichat_shared::db;
use aichat_shared::db::ai_chats::{AiChatChanges, NewAiChat};
use aichat_shared::db::ai_messages::Branches;
use aichat_shared::domain::{AiChat, AiChatDetail, ContextMessage};
use aichat_shared::events::{self, ChatEvent};
use aichat_shared::models::{MAX_MODEL_NAME_CHARS, Registry};

use crate::access::{NOT_OWNED, owned_chat};
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, FieldErrors};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::paging::{DEFAULT_LIMIT, MAX_LIMIT, Order, Page, PageQuery};
use crate::routes::schemas::{BAD_PAGE, BadRequestBody, ErrorBody};
use crate::state::AppState;
use crate::validate;

const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";
const NOT_A_PARTICIPANT: &str = "You must be a participant in the related chat.";
const MAX_SYSTEM_PROMPT_CHARS: usize = 20_000;

/// A chat's own text fields as a create, an edit or an import (`routes::export`) gives them;
/// `None` for a field not given.
pub struct ChatFields<'a> {
    pub title: Option<&'a str>,
    pub system_prompt: Option<&'a str>,
    pub model: Option<&'a str>,
}

impl ChatFields<'_> {
    /// Adds the problems of the fields given to `errors`, each under `prefix` and its name.
    pub fn check(&self, errors: &mut FieldErrors, prefix: &str, models: &Registry) {
        let name = |field: &str| format!("{prefix}{field}");
        if let Some(title) = self.title {
            validate::optional_text(errors, &name("title"), title, 255);
        }
        if let Some(prompt) = self.system_prompt
            && validate::no_nul(errors, &name("system_prompt"), prompt)
            && prompt.chars().count() > MAX_SYSTEM_PROMPT_CHARS
        {
            errors.add(
                &name("system_prompt"),
                format!("Ensure this field has no more than {MAX_SYSTEM_PROMPT_CHARS} characters."),
            );
        }
        if let Some(model) = self.model
            && validate::optional_text(errors, &name("model"), model, MAX_MODEL_NAME_CHARS)
                .is_some()
        {
            if !model
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._:/-".contains(c))
            {
                errors.add(&name("model"), "Enter a valid model name.");
            } else if !models.is_allowed(model) {
                // Only the operator's models reach the provider (and its bill).
                errors.add(
                    &name("model"),
                    format!("Select a valid choice. {model} is not one of the available models."),
                );
            }
        }
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_ai_chats, create_ai_chat))
        .routes(routes!(
            get_ai_chat,
            patch_ai_chat,
            put_ai_chat,
            delete_ai_chat
        ))
        .routes(routes!(related_chat_context))
}

/// The user's AI chats, most recently updated first (100 a page by default; a full page links
/// to the next, whose `before_id` is the last chat of this one).
#[utoipa::path(get, path = "/api/ai/chats/", tag = "ai", params(PageQuery),
    responses((status = 200, description = "A page of AI chats", body = Vec<AiChat>,
            headers(("Link" = String, description = "When the page is full: `<url>; rel=\"next\"`, the next page"))),
        (status = 400, description = BAD_PAGE, body = BadRequestBody)))]
#[tracing::instrument(skip_all)]
async fn list_ai_chats(
    State(state): State<AppState>,
    auth: AuthUser,
    uri: Uri,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> ApiResult<Page<AiChat>> {
    let (before_id, limit) = page.read(Order::NewestFirst, DEFAULT_LIMIT)?;
    let chats = db::ai_chats::list_ai_chats(&state.db, auth.user.id, before_id, limit).await?;
    Ok(Page::new(chats, limit, &uri, Order::NewestFirst, |c| c.id))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct AiChatRequest {
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    system_prompt: Option<String>,
    /// A chat the user takes part in; `null` unlinks.
    #[serde(default, deserialize_with = "crate::json_body::explicit")]
    #[schema(value_type = Option<i64>)]
    related_chat: Option<Option<i64>>,
    #[serde(default)]
    model: Option<String>,
}

impl AiChatRequest {
    /// Checks every field that was sent (and `title` when `require_title`).
    async fn validate(&self, state: &AppState, user_id: i64, require_title: bool) -> ApiResult<()> {
        let mut errors = FieldErrors::default();
        if require_title && self.title.is_none() {
            errors.add("title", validate::REQUIRED);
        }
        let fields = ChatFields {
            title: self.title.as_deref(),
            system_prompt: self.system_prompt.as_deref(),
            model: self.model.as_deref(),
        };
        fields.check(&mut errors, "", &state.models);
        if let Some(Some(chat_id)) = self.related_chat
            && !db::chats::is_participant(&state.db, chat_id, user_id).await?
        {
            errors.add("related_chat", NOT_A_PARTICIPANT);
        }
        errors.check()
    }

    fn changes(&self) -> AiChatChanges<'_> {
        AiChatChanges {
            title: self.title.as_deref(),
            system_prompt: self.system_prompt.as_deref(),
            related_chat: self.related_chat,
            model: self.model.as_deref(),
        }
    }
}

/// Create an AI chat.
#[utoipa::path(post, path = "/api/ai/chats/", tag = "ai", request_body = AiChatRequest,
    responses((status = 201, description = "The new AI chat", body = AiChat),
        (status = 400, description = "Field errors; or a body that is not a JSON object", body = BadRequestBody),
        (status = 409, description = crate::error::REFERENCE_GONE, body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn create_ai_chat(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiJson(body): ApiJson<AiChatRequest>,
) -> ApiResult<(StatusCode, Json<AiChat>)> {
    body.validate(&state, auth.user.id, true).await?;
    let new = NewAiChat {
        user_id: auth.user.id,
        title: body.title.as_deref().unwrap_or_default(),
        system_prompt: body
            .system_prompt
            .as_deref()
            .unwrap_or(DEFAULT_SYSTEM_PROMPT),
        related_chat: body.related_chat.flatten(),
        model: body
            .model
            .as_deref()
            .unwrap_or(&state.models.default_model().name),
    };
    let id = db::ai_chats::insert_ai_chat(&state.db, &new).await?;
    let chat = db::ai_chats::get_ai_chat(&state.db, id, auth.user.id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok((StatusCode::CREATED, Json(chat)))
}

/// One AI chat with its messages, oldest first: the first 1000 at most (page the rest with
/// `GET /api/ai/chats/{id}/messages/?after_id=`).
#[utoipa::path(get, path = "/api/ai/chats/{id}/", tag = "ai", params(("id" = i64, Path)),
    responses((status = 200, description = "The AI chat and its first messages", body = AiChatDetail),
        (status = 404, description = NOT_OWNED, body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn get_ai_chat(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<AiChatDetail>> {
    let chat = owned_chat(&state, id, auth.user.id).await?;
    let messages =
        db::ai_messages::list_chat_messages(&state.db, id, Branches::Active, None, Some(MAX_LIMIT))
            .await?;
    Ok(Json(AiChatDetail { chat, messages }))
}

/// Change any of the create fields, with the same validation as create.
#[utoipa::path(patch, path = "/api/ai/chats/{id}/", tag = "ai", params(("id" = i64, Path)),
    request_body = AiChatRequest,
    responses((status = 200, description = "The changed AI chat", body = AiChat),
        (status = 400, description = "Field errors; or a body that is not a JSON object", body = BadRequestBody),
        (status = 404, description = NOT_OWNED, body = ErrorBody),
        (status = 409, description = crate::error::REFERENCE_GONE, body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn patch_ai_chat(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<AiChatRequest>,
) -> ApiResult<Json<AiChat>> {
    update(state, auth, id, body, false).await
}

/// Replace the chat's fields; `title` is required, as on create.
#[utoipa::path(put, path = "/api/ai/chats/{id}/", tag = "ai", params(("id" = i64, Path)),
    request_body = AiChatRequest,
    responses((status = 200, description = "The changed AI chat", body = AiChat),
        (status = 400, description = "Field errors; or a body that is not a JSON object", body = BadRequestBody),
        (status = 404, description = NOT_OWNED, body = ErrorBody),
        (status = 409, description = crate::error::REFERENCE_GONE, body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn put_ai_chat(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<AiChatRequest>,
) -> ApiResult<Json<AiChat>> {
    update(state, auth, id, body, true).await
}

async fn update(
    state: AppState,
    auth: AuthUser,
    id: i64,
    body: AiChatRequest,
    require_title: bool,
) -> ApiResult<Json<AiChat>> {
    owned_chat(&state, id, auth.user.id).await?;
    body.validate(&state, auth.user.id, require_title).await?;
    if !db::ai_chats::update_ai_chat(&state.db, id, auth.user.id, &body.changes()).await? {
        return Err(ApiError::NotFound);
    }
    Ok(Json(owned_chat(&state, id, auth.user.id).await?))
}

/// Delete an AI chat and its messages.
#[utoipa::path(delete, path = "/api/ai/chats/{id}/", tag = "ai", params(("id" = i64, Path)),
    responses((status = 204, description = "Deleted"),
        (status = 404, description = NOT_OWNED, body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn delete_ai_chat(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    let Some(reservations) = db::ai_chats::delete_ai_chat(&state.db, id, auth.user.id).await?
    else {
        return Err(ApiError::NotFound);
    };
    // The deleted questions that still waited held their budget reservations: their jobs find
    // them gone and settle nothing.
    for (day, tokens) in reservations {
        if let Some(reservation) =
            Reservation::of_message(&state.ns, auth.user.id, Some(day), Some(tokens))
        {
            crate::send::budget::release(&state, &reservation).await;
        }
    }
    // Its sockets close and its replies' streams end on this event. Lost (Redis down), they
    // stay open until they end otherwise; every request on them finds the chat gone (404).
    let deleted = ChatEvent::ChatDeleted { ai_chat_id: id };
    if let Err(err) = events::publish_event(&mut state.redis.clone(), &state.ns, id, &deleted).await
    {
        tracing::warn!(error = %err, "could not announce a chat's deletion");
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ContextQuery {
    /// How many of the latest messages, 1–200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    message_limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RelatedChatContext {
    chat_name: String,
    message_count: usize,
    messages: Vec<ContextMessage>,
}

/// The latest messages of the linked user-to-user chat, oldest first.
#[utoipa::path(get, path = "/api/ai/chats/{id}/related_chat_context/", tag = "ai",
    params(("id" = i64, Path), ContextQuery),
    responses((status = 200, description = "The related chat's latest messages", body = RelatedChatContext),
        (status = 400, description = "`message_limit` outside 1–200 (field errors); or a query that does not parse", body = BadRequestBody),
        (status = 404, description = "No such AI chat of the user's, no related chat linked, or the user no longer takes part in it", body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn related_chat_context(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(query): ApiQuery<ContextQuery>,
) -> ApiResult<Json<RelatedChatContext>> {
    let limit = query.message_limit.unwrap_or(50);
    let mut errors = FieldErrors::default();
    validate::in_range(&mut errors, "message_limit", limit, 1, 200);
    errors.check()?;
    let chat = owned_chat(&state, id, auth.user.id).await?;
    let (Some(related), Some(chat_name)) = (chat.related_chat, chat.related_chat_name) else {
        return Err(ApiError::NotFoundBecause(
            "No related chat linked to this AI chat",
        ));
    };
    if !db::chats::is_participant(&state.db, related, auth.user.id).await? {
        return Err(ApiError::NotFoundBecause(
            "You are no longer a participant in the related chat",
        ));
    }
    let messages = db::chats::latest_context_messages(&state.db, related, limit).await?;
    Ok(Json(RelatedChatContext {
        chat_name,
        message_count: messages.len(),
        messages,
    }))
}
