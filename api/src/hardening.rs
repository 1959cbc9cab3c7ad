//! Response and request hygiene that applies to every route: what `/api/` answers may not be
//! sniffed or cached, what the API documentation pages may load, and which request ids from a
//! client are kept.
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, X_CONTENT_TYPE_OPTIONS};
use axum::middleware::Next;
use axum::response::Response;

/// `X-Content-Type-Options: nosniff` and `Cache-Control: no-store` on every `/api/` answer:
/// they carry a user's own data, which no shared cache should keep and no browser should read
/// as anything but JSON.
///
/// The documentation pages (Swagger UI under `/api/docs/`, ReDoc under `/api/redoc/`) also get
/// a Content-Security-Policy: everything they run comes from this binary, so nothing may be
/// loaded from elsewhere. Both libraries set inline styles and ReDoc starts a worker from a
/// `blob:`; neither needs inline scripts.
pub async fn api_headers(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let api = path.starts_with("/api/");
    let docs = path.starts_with("/api/docs") || path.starts_with("/api/redoc");
    let mut response = next.run(req).await;
    if api {
        let headers = response.headers_mut();
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if docs {
            headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(DOCS_CSP));
        }
    }
    response
}

const DOCS_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; \
    form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Longest request id kept from a client.
const MAX_REQUEST_ID: usize = 64;

/// Drops a client's `X-Request-Id` unless it is at most 64 characters of `[A-Za-z0-9._-]`, so
/// that the id set in its place (a UUID) is what reaches logs, jobs and the answer: a client
/// cannot write arbitrary text into them.
pub async fn sanitize_request_id(mut req: Request, next: Next) -> Response {
    let acceptable = req.headers().get("x-request-id").is_none_or(|value| {
        let bytes = value.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    });
    if !acceptable {
        req.headers_mut().remove("x-request-id");
    }
    next.run(req).await
}
