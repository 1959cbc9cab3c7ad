//! The OpenAPI document's error bodies (the shapes `crate::error` writes) and the responses
//! that the middleware can give any operation, added to every operation in one place.
use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{KnownFormat, SchemaFormat, Type};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, ObjectBuilder, RefOr, ResponseBuilder};

/// Every error but a validation failure.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"error": "Not found."}))]
pub struct ErrorBody {
    /// What went wrong, in words fit for the user.
    pub error: String,
}

/// A validation failure: each field that was refused, with its problems.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"username": ["This field is required."]}))]
pub struct FieldErrorsBody(pub BTreeMap<String, Vec<String>>);

/// A 400: field errors when the request parsed but a value was refused, `{"error": ...}` when
/// it did not parse (malformed JSON or query, a body that is not an object, a bad header).
// `ErrorBody` first, for clients that try the alternatives in order; a field-errors map never
// has an `error` key holding a string, so no body matches both.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[expect(
    dead_code,
    reason = "a shape for the document: `crate::error` writes the bodies"
)]
pub enum BadRequestBody {
    Error(ErrorBody),
    Fields(FieldErrorsBody),
}

/// The 400 of a paged list (`PageQuery::read`, `extract::ApiQuery`).
pub const BAD_PAGE: &str = "A cursor below 0, the cursor of the other direction or a limit outside 1–1000 \
    (field errors); or a query that does not parse";

/// `Retry-After`, in seconds: carried by every 429 and by every 503 `crate::error` answers.
pub const RETRY_AFTER: &str = "Retry-After";

/// Adds to every operation the answers that come from the middleware rather than its handler
/// (an operation that documents a status itself keeps its own), and `Retry-After` to every 429
/// and 503:
/// - 503 on every route: the connection cap (`serve::full`), `REQUEST_TIMEOUT_SECS`
///   (`serve::request_timeout`), or PostgreSQL or Redis unreachable;
/// - 403 and 413 on every unsafe method: `origin_guard` refuses a cross-site request the cookie
///   authenticates, and `serve::request_timeout` reads every such body up to `MAX_BODY_BYTES`;
/// - 415 on every operation with a JSON body (`extract::ApiJson`);
/// - 401 on every operation that does not waive the document's security (`security(())`).
pub struct MiddlewareResponses;

impl utoipa::Modify for MiddlewareResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let safe = [
                &mut item.get,
                &mut item.head,
                &mut item.options,
                &mut item.trace,
            ];
            let unsafe_ = [
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for operation in safe.into_iter().flatten() {
                add_common(operation, false);
            }
            for operation in unsafe_.into_iter().flatten() {
                add_common(operation, true);
            }
        }
    }
}

fn add_common(operation: &mut Operation, unsafe_method: bool) {
    let needs_auth = operation.security.is_none();
    let json_body = operation.request_body.is_some();
    let responses = &mut operation.responses.responses;
    let mut add = |status: &str, description: &str| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| error_response(description).into());
    };
    add(
        "503",
        "Busy or a backing service unreachable: retry after `Retry-After` seconds",
    );
    if needs_auth {
        add("401", "Authentication required");
    }
    if unsafe_method {
        add(
            "403",
            "Cross-site request refused: the cookie authenticated it and its `Origin` is not allowed",
        );
        add("413", "Request body is too large (`MAX_BODY_BYTES`)");
    }
    if json_body {
        add("415", "Content-Type must be application/json");
    }
    for (status, response) in responses.iter_mut() {
        if let ("429" | "503", RefOr::T(response)) = (status.as_str(), response) {
            response
                .headers
                .entry(RETRY_AFTER.to_owned())
                .or_insert_with(retry_after);
        }
    }
}

/// The operations that queue a message, counted against the send rate and the daily token
/// budget (`send::limits`).
const QUEUEING: &[&str] = &[
    "send_message",
    "retry_message",
    "regenerate_message",
    "edit_message",
];

/// The headers of what is left of the user's limits, each absent where there is no limit.
const LIMIT_HEADERS: &[(&str, &str)] = &[
    (
        "RateLimit-Limit",
        "Messages the user may send per minute (`SEND_RATE_PER_MINUTE`)",
    ),
    (
        "RateLimit-Remaining",
        "Messages left in the send rate's current window",
    ),
    (
        "RateLimit-Reset",
        "Seconds until the send rate's current window ends",
    ),
    (
        "X-Budget-Remaining",
        "Tokens left of the user's daily budget today (after this message's reservation)",
    ),
];

/// Adds the limit headers to the answers of the operations that queue a message: the 200 and
/// 202 of an accepted message, and the 429 of a refused one.
pub struct LimitHeaders;

impl utoipa::Modify for LimitHeaders {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let Some(operation) = item.post.as_mut() else {
                continue;
            };
            let queueing = operation
                .operation_id
                .as_deref()
                .is_some_and(|id| QUEUEING.contains(&id));
            if !queueing {
                continue;
            }
            for (status, response) in operation.responses.responses.iter_mut() {
                if let ("200" | "202" | "429", RefOr::T(response)) = (status.as_str(), response) {
                    for (name, description) in LIMIT_HEADERS {
                        response
                            .headers
                            .entry((*name).to_owned())
                            .or_insert_with(|| count_header(description));
                    }
                }
            }
        }
    }
}

/// A header holding a count (0 or more).
fn count_header(description: &str) -> RefOr<utoipa::openapi::Header> {
    let count = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(0));
    HeaderBuilder::new()
        .schema(Some(count))
        .description(Some(description))
        .build()
        .into()
}

fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "ErrorBody",
                ))))
                .build(),
        )
        .build()
}

fn retry_after() -> RefOr<utoipa::openapi::Header> {
    let seconds = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(0));
    HeaderBuilder::new()
        .schema(Some(seconds))
        .description(Some("Seconds to wait before trying again"))
        .build()
        .into()
}
