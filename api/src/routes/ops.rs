//! Liveness and readiness probes.
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use aichat_shared::db;

use crate::routes::schemas::ErrorBody;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "ops", security(()),
    responses((status = 200, description = "`ok`", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    status: &'static str,
    database: &'static str,
    redis: &'static str,
}

/// A 503 of `/readyz`: the probe's own answer, or `{"error": ...}` when the API was too busy to
/// run it (too many connections, or the probe took longer than the request timeout).
// The second comes from `serve::full` and `serve::request_timeout`.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[expect(
    dead_code,
    reason = "a shape for the document: the bodies are written as they are"
)]
pub enum NotReady {
    Readiness(Readiness),
    Error(ErrorBody),
}

/// PostgreSQL and Redis both answer.
#[utoipa::path(get, path = "/readyz", tag = "ops", security(()),
    responses((status = 200, description = "Both answer", body = Readiness),
        (status = 503, description = "One of them does not (or the API is too busy to ask)", body = NotReady)))]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let database = db::ping(&state.db).await.is_ok();
    let mut conn = state.redis.clone();
    let redis = redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok();
    let word = |ok| if ok { "ok" } else { "unavailable" };
    let ready = database && redis;
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(Readiness {
            status: if ready { "ready" } else { "not ready" },
            database: word(database),
            redis: word(redis),
        }),
    )
}
