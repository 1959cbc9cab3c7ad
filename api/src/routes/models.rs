//! The models AI chats may use: the registry (`MODELS_FILE`, or `OPENAI_MODEL` and
//! `ALLOWED_MODELS`), without where they are served or with which key.
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use aichat_shared::models::Model;

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
    /// The same as `id`.
    pub name: String,
    /// Used by AI chats that name no model.
    pub default: bool,
    /// Tokens of prompt and reply together the model accepts; `null` when not configured.
    pub context_window: Option<u64>,
    /// Most tokens of one reply.
    pub max_completion_tokens: u32,
    /// Price per million prompt tokens, an exact decimal in `currency`; `null`: not priced.
    #[schema(example = "0.15")]
    pub input_price: Option<String>,
    /// Price per million completion tokens; `null`: not priced.
    #[schema(example = "0.60")]
    pub output_price: Option<String>,
    /// ISO 4217 code of the prices; `null` when not priced.
    #[schema(example = "USD")]
    pub currency: Option<String>,
}

impl ModelInfo {
    fn new(model: &Model, default: bool) -> Self {
        let pricing = model.pricing.as_ref();
        ModelInfo {
            id: model.name.clone(),
            name: model.name.clone(),
            default,
            context_window: model.context_window,
            max_completion_tokens: model.max_completion_tokens,
            input_price: pricing.map(|p| p.input.to_string()),
            output_price: pricing.map(|p| p.output.to_string()),
            currency: pricing.map(|p| p.currency.clone()),
        }
    }
}

/// The models an AI chat may name, in the registry's order.
#[utoipa::path(get, path = "/api/ai/models/", tag = "ai",
    responses((status = 200, description = "The registry's models", body = Vec<ModelInfo>)))]
#[tracing::instrument(skip_all)]
async fn list_models(
    State(state): State<AppState>,
    _auth: AuthUser,
) -> ApiResult<Json<Vec<ModelInfo>>> {
    let default = &state.models.default_model().name;
    Ok(Json(
        state
            .models
            .models()
            .iter()
            .map(|model| ModelInfo::new(model, &model.name == default))
            .collect(),
    ))
}
