//! The browser pages: the chat at `/`, the staff page at `/admin/`, and their static files.
//! Everything is compiled into the binary and nothing comes from another host, which the
//! Content-Security-Policy also enforces in the browser.
use axum::Router;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, X_CONTENT_TYPE_OPTIONS};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::AppState;

/// Same-origin only; `connect-src 'self'` covers the page's own `ws://`/`wss://` origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";
const CONTENT_SECURITY_POLICY: HeaderName = HeaderName::from_static("content-security-policy");
const HTML: &str = "text/html; charset=utf-8";
/// Pages are revalidated on every load so a new binary's pages are seen at once; the static
/// files they load may be a few minutes stale.
const PAGE_CACHE: &str = "no-cache";
const STATIC_CACHE: &str = "public, max-age=300";

/// The files under `/static/`: name, content type, body.
const STATIC_FILES: &[(&str, &str, &str)] = &[
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../assets/web/app.css"),
    ),
    (
        "common.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/common.js"),
    ),
    (
        "chat.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/chat.js"),
    ),
    (
        "chat-list.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/chat-list.js"),
    ),
    (
        "chat-options.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/chat-options.js"),
    ),
    (
        "messages.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/messages.js"),
    ),
    (
        "socket.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/socket.js"),
    ),
    (
        "state.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/state.js"),
    ),
    (
        "stop-retry.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/stop-retry.js"),
    ),
    (
        "stream.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/stream.js"),
    ),
    (
        "tree.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/tree.js"),
    ),
    (
        "versions.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/versions.js"),
    ),
    (
        "markdown.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/markdown.js"),
    ),
    (
        "admin.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/web/admin.js"),
    ),
    // Vendored libraries, the published files unchanged (versions and provenance in
    // `api/assets/vendor/README.md`).
    (
        "marked.umd.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/vendor/marked/marked.umd.js"),
    ),
    (
        "purify.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/vendor/dompurify/purify.min.js"),
    ),
];

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(chat_page))
        .route("/admin/", get(admin_page))
        .route("/static/{file}", get(static_file))
}

async fn chat_page() -> Response {
    page(include_str!("../../assets/web/index.html"))
}

async fn admin_page() -> Response {
    page(include_str!("../../assets/web/admin.html"))
}

fn page(html: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, HTML),
            (CACHE_CONTROL, PAGE_CACHE),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (CONTENT_SECURITY_POLICY, CSP),
        ],
        html,
    )
        .into_response()
}

async fn static_file(ApiPath(file): ApiPath<String>) -> Result<Response, ApiError> {
    let (_, content_type, body) = STATIC_FILES
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or(ApiError::NotFound)?;
    Ok((
        [
            (CONTENT_TYPE, *content_type),
            (CACHE_CONTROL, STATIC_CACHE),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        *body,
    )
        .into_response())
}
