//! The API's one error type and the one place it becomes an HTTP response.
use std::collections::BTreeMap;

use axum::Json;
use axum::http::StatusCode;
use axum::http::header::RETRY_AFTER;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::send::limits::LimitsLeft;

/// Validation problems by field, as `{"field": ["problem", ...]}`.
#[derive(Debug, Default, Clone)]
pub struct FieldErrors(BTreeMap<String, Vec<String>>);

impl FieldErrors {
    pub fn add(&mut self, field: &str, problem: impl Into<String>) {
        self.0
            .entry(field.to_owned())
            .or_default()
            .push(problem.into());
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `field` has a problem.
    pub fn has(&self, field: &str) -> bool {
        self.0.contains_key(field)
    }

    /// `Ok(())` when nothing was added, else the 400 error.
    pub fn check(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self))
        }
    }

    pub fn single(field: &str, problem: impl Into<String>) -> ApiError {
        let mut errors = FieldErrors::default();
        errors.add(field, problem);
        ApiError::Validation(errors)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Authentication required")]
    Unauthenticated,
    #[error("Invalid credentials")]
    InvalidCredentials,
    #[error("Staff only")]
    Forbidden,
    #[error("Cross-site request refused")]
    CrossSite,
    #[error("Not found.")]
    NotFound,
    #[error("{0}")]
    NotFoundBecause(&'static str),
    /// A path written without its trailing slash (GET and HEAD are redirected instead).
    #[error("Not found. Every path of this API ends with a slash: {0}")]
    MissingTrailingSlash(String),
    #[error("Method not allowed.")]
    MethodNotAllowed,
    #[error("validation failed")]
    Validation(FieldErrors),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unavailable(&'static str),
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    Conflict(&'static str),
    /// Well-formed, but at odds with what the request repeats (an `Idempotency-Key` reused
    /// with another body).
    #[error("{0}")]
    Unprocessable(&'static str),
    /// Past the send rate; `left` becomes the response's limit headers (`send::limits`).
    #[error("Too many messages, please slow down")]
    TooManyRequests {
        retry_after_secs: u64,
        left: LimitsLeft,
    },
    #[error("Too many attempts, please try again later")]
    TooManyAttempts { retry_after_secs: u64 },
    /// `MAX_SOCKETS_PER_USER` reached on this instance.
    #[error("Too many open WebSockets, close one first")]
    TooManySockets,
    /// `MAX_STREAMS_PER_USER` reached on this instance.
    #[error("Too many open reply streams, close one first")]
    TooManyStreams,
    /// Past the user's daily token budget; `left` as for `TooManyRequests`.
    #[error("Daily token budget exceeded; it resets at midnight UTC")]
    BudgetExceeded {
        retry_after_secs: u64,
        left: LimitsLeft,
    },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated | ApiError::InvalidCredentials => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden | ApiError::CrossSite => StatusCode::FORBIDDEN,
            ApiError::NotFound
            | ApiError::NotFoundBecause(_)
            | ApiError::MissingTrailingSlash(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Validation(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. }
            | ApiError::TooManyAttempts { .. }
            | ApiError::BudgetExceeded { .. }
            | ApiError::TooManySockets
            | ApiError::TooManyStreams => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// When a client told 503 may try again: long enough for a pool or a queue to drain, short
/// enough that nobody waits for nothing.
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 1;

/// When a client with every socket taken may try again: a socket it lost closes within a ping
/// interval or two.
pub const SOCKET_RETRY_AFTER_SECS: u64 = 5;

/// What a client is told when what its request refers to was deleted while it ran.
pub const REFERENCE_GONE: &str = "Something this request refers to was deleted meanwhile";

/// What a client is told when PostgreSQL or Redis cannot be reached.
pub const SERVICE_UNAVAILABLE: &str = "Service temporarily unavailable, please retry shortly";

impl From<aichat_shared::Error> for ApiError {
    fn from(err: aichat_shared::Error) -> Self {
        if err.is_unavailable() {
            tracing::warn!(error = %err, "backing service unavailable");
            ApiError::Unavailable(SERVICE_UNAVAILABLE)
        } else if err.is_conflict() {
            // Load, not a fault of the request: retried where it can be (`db::retry`), and
            // otherwise the client's to try again.
            tracing::warn!(error = %err, "statement aborted by a conflict");
            ApiError::Unavailable(SERVICE_UNAVAILABLE)
        } else if err.is_reference_gone() {
            // A race with a deletion, not a fault of the server: the checks before the write
            // found the row, and another request deleted it before the write.
            tracing::info!(error = %err, "a write referred to a row deleted meanwhile");
            ApiError::Conflict(REFERENCE_GONE)
        } else {
            ApiError::Internal(err.into())
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        aichat_shared::Error::from(err).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = match &self {
            ApiError::TooManyRequests {
                retry_after_secs, ..
            }
            | ApiError::TooManyAttempts { retry_after_secs }
            | ApiError::BudgetExceeded {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            ApiError::Unavailable(_) => Some(UNAVAILABLE_RETRY_AFTER_SECS),
            ApiError::TooManySockets | ApiError::TooManyStreams => Some(SOCKET_RETRY_AFTER_SECS),
            _ => None,
        };
        let left = match &self {
            ApiError::TooManyRequests { left, .. } | ApiError::BudgetExceeded { left, .. } => {
                Some(*left)
            }
            _ => None,
        };
        let body = match self {
            ApiError::Validation(errors) => json!(errors.0),
            ApiError::Internal(err) => {
                // Details go to the log, never to the client.
                tracing::error!(error = ?err, "request failed");
                json!({"error": "Internal server error"})
            }
            ApiError::TooManyRequests {
                retry_after_secs, ..
            } => {
                json!({"error": self_text(retry_after_secs)})
            }
            other => json!({"error": other.to_string()}),
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            response.headers_mut().insert(RETRY_AFTER, secs.into());
        }
        if let Some(left) = left {
            left.write(response.headers_mut());
        }
        response
    }
}

fn self_text(retry_after_secs: u64) -> String {
    format!("Too many messages, please slow down (retry in {retry_after_secs} s)")
}

pub type ApiResult<T> = Result<T, ApiError>;
