//! Cross-site use of the session cookie is refused. A browser attaches the `sessionid` cookie
//! to requests any page makes (`SameSite=Lax` still lets a sibling site's forms and sockets
//! through), so an unsafe request or a WebSocket upgrade that the cookie will authenticate must
//! come from this origin or one the operator allows (`ALLOWED_ORIGINS`). A request that a
//! bearer token (or, on the socket, `?token=`) authenticates carries a credential no other
//! page can make a browser send, and passes as it is.
use axum::extract::{Request, State};
use axum::http::header::{HOST, ORIGIN, UPGRADE};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth;
use crate::error::ApiError;
use crate::settings::normalize_origin;
use crate::state::AppState;

/// Answers 403 before any effect when a cookie-authenticated unsafe request or socket upgrade
/// comes from another site.
pub async fn refuse_cross_site(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let unsafe_method = !matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    let upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if (unsafe_method || upgrade)
        && cookie_is_the_credential(&req, upgrade)
        && from_another_site(req.headers(), &state.settings.allowed_origins)
    {
        return ApiError::CrossSite.into_response();
    }
    next.run(req).await
}

/// Whether the request will be authenticated by the `sessionid` cookie: it carries one, and
/// no credential that is used before it (`Authorization: Bearer`, which `auth::request_token`
/// prefers; on a socket upgrade also `?token=`, which the WebSocket route prefers). Any other
/// `Authorization` header or a `?token=` on another route does not count: the cookie would
/// still be what authenticates.
fn cookie_is_the_credential(req: &Request, upgrade: bool) -> bool {
    let headers = req.headers();
    if auth::bearer_token(headers).is_some() {
        return false;
    }
    let token_in_query = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|pair| pair.starts_with("token=")));
    if upgrade && token_in_query {
        return false;
    }
    auth::cookie_token(headers).is_some()
}

/// `Sec-Fetch-Site: cross-site`, or an `Origin` that is neither the request's own (its host
/// and port are the `Host` it was sent to) nor an allowed one.
fn from_another_site(headers: &HeaderMap, allowed: &[String]) -> bool {
    let fetch_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if fetch_site.eq_ignore_ascii_case("cross-site") {
        return true;
    }
    let Some(origin) = headers.get(ORIGIN) else {
        return false;
    };
    let Ok(origin) = origin.to_str() else {
        return true;
    };
    let origin = normalize_origin(origin);
    if allowed.contains(&origin) {
        return false;
    }
    let own_host = headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    match (origin_host, own_host) {
        (Some(origin_host), Some(own_host)) => origin_host != own_host,
        _ => true,
    }
}
