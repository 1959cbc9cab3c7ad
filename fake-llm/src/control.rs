//! Owns the out-of-band HTTP endpoints: `/_fake/*` control API, `/healthz` and `/v1/models`.

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{config::Outcome, protocol::invalid_request, state::FakeState};

/// Models advertised by `/v1/models`; the chat endpoint accepts any model name anyway.
const MODELS: [&str; 2] = ["fake-model", "gpt-4o-mini"];

pub(crate) async fn healthz() -> &'static str {
    "ok"
}

pub(crate) async fn models() -> Json<Value> {
    let data: Vec<Value> = MODELS
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "aichat-fake-llm"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub(crate) async fn get_requests(State(state): State<FakeState>) -> Response {
    Json(state.requests()).into_response()
}

pub(crate) async fn delete_requests(State(state): State<FakeState>) -> StatusCode {
    state.clear_requests();
    StatusCode::NO_CONTENT
}

pub(crate) async fn get_config(State(state): State<FakeState>) -> Response {
    Json(state.config()).into_response()
}

pub(crate) async fn put_config(State(state): State<FakeState>, body: Bytes) -> Response {
    let patch = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(patch)) => patch,
        Ok(_) => return invalid_request("config body must be a JSON object"),
        Err(e) => return invalid_request(&format!("invalid JSON body: {e}")),
    };
    match state.patch_config(patch) {
        Ok(config) => Json(config).into_response(),
        Err(message) => invalid_request(&message),
    }
}

pub(crate) async fn get_script(State(state): State<FakeState>) -> Response {
    Json(state.script()).into_response()
}

/// Appends to the script; accepts an array of outcomes or a single outcome object.
pub(crate) async fn post_script(State(state): State<FakeState>, body: Bytes) -> Response {
    let outcomes = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(items)) => serde_json::from_value::<Vec<Outcome>>(Value::Array(items)),
        Ok(single) => serde_json::from_value::<Outcome>(single).map(|o| vec![o]),
        Err(e) => return invalid_request(&format!("invalid JSON body: {e}")),
    };
    match outcomes {
        Ok(outcomes) => {
            state.push_script(outcomes);
            Json(state.script()).into_response()
        }
        Err(e) => invalid_request(&format!("invalid outcome: {e}")),
    }
}

pub(crate) async fn delete_script(State(state): State<FakeState>) -> StatusCode {
    state.clear_script();
    StatusCode::NO_CONTENT
}
