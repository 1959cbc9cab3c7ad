//! Owns the OpenAI wire format: parsing chat requests and building completion, chunk and error bodies.
//!
//! Shapes follow what async-openai 0.43 deserializes (`CreateChatCompletionResponse`,
//! `CreateChatCompletionStreamResponse`, `WrappedError`), which is the compatibility target.

use axum::{
    Json,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use crate::tokens::{Usage, content_text};

/// A parsed `POST /v1/chat/completions` body; unknown fields are kept in `params`.
#[derive(Debug, Clone)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub messages: Vec<Value>,
    pub stream: bool,
    pub include_usage: bool,
    pub api_key: Option<String>,
    pub params: Map<String, Value>,
}

impl ChatRequest {
    pub fn parse(body: &[u8], headers: &HeaderMap) -> Result<Self, String> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
        let Value::Object(mut params) = value else {
            return Err("request body must be a JSON object".to_owned());
        };
        let model = match params.remove("model") {
            Some(Value::String(model)) => model,
            _ => return Err("you must provide a model parameter (a string)".to_owned()),
        };
        let messages = match params.remove("messages") {
            Some(Value::Array(messages)) if messages.iter().all(Value::is_object) => messages,
            _ => return Err("'messages' must be an array of message objects".to_owned()),
        };
        let stream = params
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let include_usage = params
            .get("stream_options")
            .and_then(|opts| opts.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let api_key = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).to_owned());
        Ok(Self {
            model,
            messages,
            stream,
            include_usage,
            api_key,
            params,
        })
    }

    /// Text of every message, in order, as counted for `prompt_tokens`.
    pub fn contents(&self) -> Vec<String> {
        self.messages
            .iter()
            .map(|m| content_text(m.get("content")))
            .collect()
    }

    pub fn last_user_content(&self) -> Option<String> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .map(|m| content_text(m.get("content")))
    }
}

/// Identity shared by every body of one completion.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Completion {
    pub fn body(&self, reply: &str, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": reply, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage,
        })
    }

    /// One SSE frame; `usage` is `None` to omit the field (no `include_usage`),
    /// `Some(None)` for the explicit `null` OpenAI sends on non-final chunks.
    fn frame(&self, choices: Value, usage: Option<Option<Usage>>) -> String {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if let (Some(usage), Some(obj)) = (usage, chunk.as_object_mut()) {
            obj.insert("usage".to_owned(), json!(usage));
        }
        format!("data: {chunk}\n\n")
    }

    /// Every frame of a streamed answer except `[DONE]`: role, one per word chunk, finish, usage.
    pub fn stream_frames(&self, word_chunks: &[&str], usage: Usage, include_usage: bool) -> Frames {
        let null_usage = include_usage.then_some(None);
        let delta = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
        let role = self.frame(
            delta(json!({"role": "assistant", "content": ""}), Value::Null),
            null_usage,
        );
        let words = word_chunks
            .iter()
            .map(|word| self.frame(delta(json!({"content": word}), Value::Null), null_usage))
            .collect();
        let finish = self.frame(delta(json!({}), json!("stop")), null_usage);
        let usage = include_usage.then(|| self.frame(json!([]), Some(Some(usage))));
        Frames {
            role,
            words,
            finish,
            usage,
        }
    }
}

pub(crate) struct Frames {
    pub role: String,
    pub words: Vec<String>,
    pub finish: String,
    pub usage: Option<String>,
}

pub(crate) const DONE_FRAME: &str = "data: [DONE]\n\n";

/// An OpenAI error response: `{"error": {"message", "type", "param", "code"}}`.
pub(crate) fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: Option<&str>,
) -> Response {
    let body = json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    });
    (status, Json(body)).into_response()
}

pub(crate) fn invalid_request(message: &str) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        None,
    )
}

pub(crate) fn rate_limited(retry_after: &str) -> Response {
    let mut response = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "Rate limit reached for requests (injected by aichat-fake-llm).",
        "requests",
        Some("rate_limit_exceeded"),
    );
    if !retry_after.is_empty() {
        match HeaderValue::from_str(retry_after) {
            Ok(value) => {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            Err(_) => tracing::warn!(retry_after, "unusable Retry-After value, header omitted"),
        }
    }
    response
}

pub(crate) fn insufficient_quota() -> Response {
    // async-openai recognises the permanent quota error by `type`, real OpenAI sets both.
    error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "You exceeded your current quota (injected by aichat-fake-llm).",
        "insufficient_quota",
        Some("insufficient_quota"),
    )
}

pub(crate) fn server_error() -> Response {
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "The server had an error while processing your request (injected by aichat-fake-llm).",
        "server_error",
        None,
    )
}
