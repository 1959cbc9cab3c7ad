//! Export and import of AI chats: one chat (its active path, or with `?all=true` its whole
//! tree) as a JSON document ([`ChatExport`]) or as Markdown, and a new chat of the caller's made
//! from such a JSON document, with the same messages, tree, versions and statuses.
mod checks;
mod document;
mod markdown;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use aichat_shared::db;
use aichat_shared::db::ai_chats::NewAiChat;
use aichat_shared::db::ai_messages::Branches;
use aichat_shared::domain::AiChat;

use crate::access::{NOT_OWNED, owned_chat};
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, FieldErrors};
use crate::extract::{ApiPath, ApiQuery, has_json_content_type};
use crate::routes::ai_messages::BranchesQuery;
use crate::routes::schemas::{BadRequestBody, ErrorBody};
use crate::state::AppState;

use document::{ChatExport, ExportedChat, ExportedMessage, FORMAT_TAG, FORMAT_VERSION};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(export_ai_chat))
        .routes(routes!(import_ai_chat))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// `json` (the default) or `markdown` (the active path only).
    #[param(example = "markdown")]
    format: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExportFormat {
    Json,
    Markdown,
}

/// Export one of the user's AI chats as a file: JSON (its active path, or with `?all=true`
/// every version of every turn), which `POST /api/ai/chats/import/` reads back, or Markdown
/// (the active path, to read).
#[utoipa::path(get, path = "/api/ai/chats/{id}/export/", tag = "ai",
    params(("id" = i64, Path), ExportQuery, BranchesQuery),
    responses(
        (status = 200, description = "The chat as an attachment (`Content-Disposition: attachment; \
            filename=\"aichat-{id}-{title}.json\"` or `.md`)",
            content((ChatExport = "application/json"), (String = "text/markdown")),
            headers(("Content-Disposition" = String, description = "`attachment; filename=\"...\"`, an ASCII name made of the chat's id and title"))),
        (status = 400, description = "Field errors: `format` neither `json` nor `markdown`, or `all` with \
            `markdown`; or a query that does not parse", body = BadRequestBody),
        (status = 404, description = NOT_OWNED, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(ai_chat_id = id))]
async fn export_ai_chat(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(query): ApiQuery<ExportQuery>,
    ApiQuery(branches): ApiQuery<BranchesQuery>,
) -> ApiResult<Response> {
    let chat = owned_chat(&state, id, auth.user.id).await?;
    let format = match query.format.as_deref() {
        None | Some("json") => ExportFormat::Json,
        Some("markdown") => ExportFormat::Markdown,
        Some(other) => {
            return Err(FieldErrors::single(
                "format",
                format!("Select a valid choice. {other} is not one of json, markdown."),
            ));
        }
    };
    let branches = branches.branches();
    if format == ExportFormat::Markdown && branches == Branches::All {
        return Err(FieldErrors::single(
            "all",
            "The Markdown export holds the active path only; export every branch as JSON.",
        ));
    }
    let messages = db::ai_messages::list_chat_messages(&state.db, id, branches, None, None).await?;
    let exported_at = Utc::now();
    let response = match format {
        ExportFormat::Json => {
            let export = ChatExport {
                format: FORMAT_TAG.to_owned(),
                version: FORMAT_VERSION,
                exported_at: Some(exported_at),
                messages: messages.into_iter().map(ExportedMessage::of).collect(),
                chat: ExportedChat {
                    title: chat.title.clone(),
                    system_prompt: chat.system_prompt.clone(),
                    model: chat.model.clone(),
                    created_at: Some(chat.created_at),
                },
            };
            Json(export).into_response()
        }
        ExportFormat::Markdown => (
            [(CONTENT_TYPE, "text/markdown; charset=utf-8")],
            markdown::markdown(&chat, &messages, exported_at),
        )
            .into_response(),
    };
    attachment(response, &chat, format)
}

/// `response` with `Content-Disposition: attachment`, named after the chat.
fn attachment(mut response: Response, chat: &AiChat, format: ExportFormat) -> ApiResult<Response> {
    let extension = match format {
        ExportFormat::Json => "json",
        ExportFormat::Markdown => "md",
    };
    // ASCII letters and digits of the title, the rest one dash: nothing a header or a file
    // system could misread.
    let mut slug = String::new();
    for c in chat.title.chars() {
        if slug.len() >= 40 {
            break;
        }
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug = slug.trim_end_matches('-');
    let name = if slug.is_empty() {
        format!("aichat-{}.{extension}", chat.id)
    } else {
        format!("aichat-{}-{slug}.{extension}", chat.id)
    };
    let value = HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
        .map_err(|err| ApiError::Internal(err.into()))?;
    response.headers_mut().insert(CONTENT_DISPOSITION, value);
    Ok(response)
}

/// Create an AI chat of the user's from an export (`GET /api/ai/chats/{id}/export/`, JSON):
/// the same messages, roles, order, tree, versions, active path, statuses and token counts,
/// under new ids. Nothing is queued: a message that waited for its reply is stored
/// `cancelled`. The whole document is checked first; a refused one stores nothing.
#[utoipa::path(post, path = "/api/ai/chats/import/", tag = "ai", request_body = ChatExport,
    responses(
        (status = 201, description = "The new AI chat", body = AiChat),
        (status = 400, description = "Field errors: `format`, `version`, `chat.title`, `chat.system_prompt`, \
            `chat.model` (the rules of create), `messages` (more than `IMPORT_MAX_MESSAGES`, or each \
            problem as `messages[i]: ...`), or a field of the wrong JSON type; or a body that is \
            not a JSON object", body = BadRequestBody),
        (status = 413, description = "The body is larger than `IMPORT_MAX_BYTES`", body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn import_ai_chat(
    State(state): State<AppState>,
    auth: AuthUser,
    request: Request,
) -> ApiResult<(StatusCode, Json<AiChat>)> {
    let export = read_import(&state, request).await?;
    let messages = checks::check_import(&export, &state.settings, &state.models)?;
    let user_id = auth.user.id;
    let new = NewAiChat {
        user_id,
        title: &export.chat.title,
        system_prompt: &export.chat.system_prompt,
        related_chat: None,
        model: &export.chat.model,
    };
    // New rows only, of a chat no one else sees before the commit: nothing to conflict with.
    let mut tx = state.db.begin().await?;
    let id = db::ai_chats::insert_ai_chat(&mut *tx, &new).await?;
    db::export::insert_imported_messages(&mut tx, id, &messages).await?;
    tx.commit().await?;
    let chat = db::ai_chats::get_ai_chat(&state.db, id, user_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok((StatusCode::CREATED, Json(chat)))
}

/// The path of an import, whose body has a limit of its own (`IMPORT_MAX_BYTES`).
pub const IMPORT_PATH: &str = "/api/ai/chats/import/";

/// An import's body over `limit` bytes: 413.
pub fn import_too_large(limit: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "Request body is too large: an import is at most {limit} bytes"
    ))
}

/// The body of an import: JSON (415 otherwise) of at most `IMPORT_MAX_BYTES` (413), read
/// here rather than by `ApiJson`, whose limit is `MAX_BODY_BYTES`.
async fn read_import(state: &AppState, request: Request) -> ApiResult<ChatExport> {
    if !has_json_content_type(request.headers()) {
        return Err(ApiError::UnsupportedMediaType(
            "Content-Type must be application/json".into(),
        ));
    }
    let limit = state.settings.import_max_bytes;
    let bytes = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| import_too_large(limit))?;
    Ok(crate::json_body::parse_object(&bytes)?)
}
