//! The models AI chats may use (`ALLOWED_MODELS`).
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::AuthUser;
use crate::error::ApiResult;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_models))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelInfo {
    /// The name an AI chat's `model` takes.
    pub id: String,
    /// Used by AI chats that name no model (`OPENAI_MODEL`).
    pub default: bool,
}

/// The models an AI chat may name, the default first.
#[utoipa::path(get, path = "/api/ai/models/", tag = "ai",
    responses((status = 200, description = "The allowed models", body = Vec<ModelInfo>)))]
#[tracing::instrument(skip_all)]
async fn list_models(
    State(state): State<AppState>,
    _auth: AuthUser,
) -> ApiResult<Json<Vec<ModelInfo>>> {
    let default = &state.settings.openai.openai_model;
    Ok(Json(
        state
            .settings
            .openai
            .allowed_models()
            .into_iter()
            .map(|id| ModelInfo {
                default: &id == default,
                id,
            })
            .collect(),
    ))
}
