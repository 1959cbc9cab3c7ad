//! The WebSocket endpoint `/ws/ai-chat/{id}/`. Everything that can refuse a socket is checked
//! before the upgrade (session, ownership, `after_id`, the user's socket count, the
//! subscription); then [`socket`] runs it: a send task (catch-up, events, pings, close) and a
//! receive task ([`frames`], the client's messages) joined by `select!`.
mod catch_up;
mod credential;
mod frames;
mod sink;
mod socket;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Extension, FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::Response;
use serde::Deserialize;
use tracing::Instrument;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::access::{NOT_OWNED, ensure_owner};
use crate::auth::{bearer_token, cookie_token, hash_token, live_session};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery, RequestId};
use crate::routes::schemas::ErrorBody;
use crate::serve::ConnectionSlot;
use crate::state::AppState;

use credential::Credential;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(upgrade))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct WsQuery {
    /// The session token, for clients that cannot set headers or cookies.
    token: Option<String>,
    /// Send the stored messages after this id first, then live events.
    #[param(minimum = 0)]
    after_id: Option<i64>,
}

/// The request's session tokens: the `Authorization` header's and the cookie's.
struct WsToken {
    bearer: Option<String>,
    cookie: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for WsToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(WsToken {
            bearer: bearer_token(&parts.headers),
            cookie: cookie_token(&parts.headers),
        })
    }
}

/// The chat's live events over a WebSocket (see the README's "Real time"): `user_message`,
/// `assistant_delta`, `assistant_message` and `error` events; client frames
/// `{"type": "message", "content", ...}`.
#[utoipa::path(get, path = "/ws/ai-chat/{id}/", tag = "ai", params(("id" = i64, Path), WsQuery),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade request, `after_id` below 0, or a query that does not parse", body = ErrorBody),
        (status = 403, description = "Cross-site request refused: the cookie authenticated the upgrade and its `Origin` is not allowed", body = ErrorBody),
        (status = 404, description = NOT_OWNED, body = ErrorBody),
        (status = 429, description = "`MAX_SOCKETS_PER_USER` sockets already open on this instance", body = ErrorBody),
        (status = 503, description = "Real-time events unavailable, or a backing service unreachable", body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(ai_chat_id = id))]
async fn upgrade(
    State(state): State<AppState>,
    WsToken { bearer, cookie }: WsToken,
    RequestId(request_id): RequestId,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(query): ApiQuery<WsQuery>,
    slot: Option<Extension<ConnectionSlot>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    // A credential the client named wins over the cookie its browser attaches anyway (the
    // cross-site check in `origin_guard` relies on this order).
    let token = bearer
        .or(query.token)
        .or(cookie)
        .ok_or(ApiError::Unauthenticated)?;
    // Listening before the session is read: a revocation published from here on reaches this
    // socket, and one published earlier has already emptied the session cache.
    let revocations = state.hub.revocations();
    let token_hash = hash_token(&token);
    let live = live_session(&state, &token_hash)
        .await?
        .ok_or(ApiError::Unauthenticated)?;
    let user = live.user;
    let credential = Credential {
        user_id: user.id,
        token_hash,
        expires_at: live.expires_at,
        revocations,
    };
    ensure_owner(&state, id, user.id).await?;
    if query.after_id.is_some_and(|a| a < 0) {
        return Err(ApiError::BadRequest(
            "after_id must be a non-negative integer".into(),
        ));
    }
    let ws = ws.map_err(|_| ApiError::BadRequest("Expected a WebSocket upgrade request".into()))?;
    let Some(user_socket) = state
        .sockets
        .reserve_for_user(user.id, state.settings.max_sockets_per_user)
    else {
        crate::metrics::socket_refused();
        return Err(ApiError::TooManySockets);
    };
    // The socket keeps its connection's place under MAX_CONNECTIONS until it closes.
    let held = (user_socket, slot);
    // Subscribe before the upgrade: nothing published from here on is missed.
    let subscription = state.hub.subscribe(id).await.map_err(|err| {
        tracing::warn!(error = %err, "pub/sub subscribe failed");
        ApiError::Unavailable("Real-time events are unavailable, please retry shortly")
    })?;
    let settings = &state.settings;
    Ok(ws
        // Reads of 1 KiB: tungstenite zero-fills its read buffer on every read and keeps it for
        // the socket's life, so its 128 KiB default would cost every idle socket that much
        // memory and every read that much memset. Client frames are small; a larger one (up to
        // WS_MAX_MESSAGE_BYTES) takes several reads.
        .read_buffer_size(1024)
        .max_message_size(settings.ws_max_message_bytes)
        .max_frame_size(settings.ws_max_message_bytes)
        .on_upgrade(move |socket| {
            let span = tracing::info_span!(
                "websocket",
                ai_chat_id = id,
                request_id = request_id.as_deref().unwrap_or("-")
            );
            async move {
                let _held = held;
                socket::session(
                    state,
                    user,
                    credential,
                    id,
                    subscription,
                    query.after_id,
                    socket,
                )
                .await
            }
            .instrument(span)
        }))
}
