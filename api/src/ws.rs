//! The WebSocket endpoint `/ws/ai-chat/{id}/`: authenticated before the upgrade, then a
//! send task (events, pings, close) and a receive task (client messages) joined by `select!`.
use std::collections::HashSet;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Extension, FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tracing::Instrument;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use aichat_shared::db;
use aichat_shared::domain::{AiMessage, ContextOptions, User, role};
use aichat_shared::events::{ChatEvent, EventMessage};

use crate::auth::{bearer_token, cookie_token, hash_token, live_session};
use crate::dispatch::submit_message;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery, RequestId};
use crate::fanout::{Event, Lagged, Subscription};
use crate::json_body::{self, BodyError};
use crate::revocation::{Revocation, SESSION_ENDED};
use crate::routes::ai_chats::{NOT_OWNED, ensure_owner};
use crate::routes::schemas::ErrorBody;
use crate::serve::ConnectionSlot;
use crate::state::AppState;
use crate::validate;

/// Stored messages a socket's catch-up sends at most; past it the socket says so
/// (`catch_up_truncated`) and the client reads the rest over REST.
const CATCH_UP_LIMIT: i64 = 500;

/// Close code for a client too slow to keep up ("try again later").
const SLOW_CONSUMER: u16 = 1013;

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
        // tungstenite's 128 KiB default read buffer is zero-filled on every read: at 10k idle
        // sockets it cost 152 KiB each and a third of the API's CPU in memset (BENCHMARKS.md).
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
                session(
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

/// The session a socket was opened with: the socket ends with it.
struct Credential {
    user_id: i64,
    token_hash: Vec<u8>,
    expires_at: chrono::DateTime<chrono::Utc>,
    revocations: tokio::sync::broadcast::Receiver<Revocation>,
}

impl Credential {
    /// When the session expires, as a timer deadline.
    fn deadline(&self) -> Instant {
        let left = (self.expires_at - chrono::Utc::now())
            .to_std()
            .unwrap_or_default();
        // Sessions last days; a far-off expiry is as good as a year from now.
        Instant::now() + left.min(Duration::from_secs(365 * 24 * 3600))
    }

    /// Resolves when the session ends (its expiry, or its revocation on any instance), with
    /// the close reason. Cancel-safe: a revocation not yet received stays queued.
    async fn ended(&mut self, state: &AppState) -> &'static str {
        use tokio::sync::broadcast::error::RecvError;
        let expiry = tokio::time::sleep_until(self.deadline());
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                () = &mut expiry => return "session expired",
                revoked = self.revocations.recv() => match revoked {
                    Ok(revocation) if revocation.ends(self.user_id, &self.token_hash) => {
                        return "session ended";
                    }
                    Ok(_) => {}
                    // Revocations were missed: the database says whether this was one, and
                    // one that cannot be asked ends the socket (the client reconnects and is
                    // let in again only if its session is live).
                    Err(RecvError::Lagged(_)) => {
                        match db::sessions::find_live_session(&state.db, &self.token_hash).await {
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => return "session ended",
                        }
                    }
                    // The hub outlives every socket; should it not, only the expiry is left.
                    Err(RecvError::Closed) => {
                        expiry.as_mut().await;
                        return "session expired";
                    }
                },
            }
        }
    }
}

/// How a catch-up ended.
enum CatchUp {
    Sent,
    /// The client is gone (a send failed or timed out).
    Gone,
    /// The stored messages could not be read.
    Unavailable,
}

/// Sends the stored messages after `after_id` (at most [`CATCH_UP_LIMIT`], then
/// `catch_up_truncated` when there are more), noting their ids in `caught_up`.
async fn catch_up(
    state: &AppState,
    ai_chat_id: i64,
    after_id: i64,
    sink: &mut Sink,
    caught_up: &mut HashSet<i64>,
) -> CatchUp {
    let send_timeout = Duration::from_secs(state.settings.ws_send_timeout_secs);
    let limit = Some(CATCH_UP_LIMIT + 1);
    let mut messages =
        match db::ai_messages::list_chat_messages(&state.db, ai_chat_id, Some(after_id), limit)
            .await
        {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(error = %err, "catch-up query failed");
                return CatchUp::Unavailable;
            }
        };
    let truncated = messages.len() > CATCH_UP_LIMIT as usize;
    messages.truncate(CATCH_UP_LIMIT as usize);
    for message in &messages {
        caught_up.insert(message.id);
        if !send_text(sink, stored_event(message), send_timeout).await {
            return CatchUp::Gone;
        }
    }
    if let Some(last) = messages.last().filter(|_| truncated) {
        let event = ChatEvent::CatchUpTruncated {
            next_after_id: last.id,
        };
        let text = serde_json::to_string(&event).unwrap_or_default();
        if !send_text(sink, text, send_timeout).await {
            return CatchUp::Gone;
        }
    }
    CatchUp::Sent
}

async fn session(
    state: AppState,
    user: User,
    credential: Credential,
    ai_chat_id: i64,
    subscription: Subscription,
    after_id: Option<i64>,
    socket: WebSocket,
) {
    let _open = state.sockets.track();
    let (sink, stream) = socket.split();
    // Replies meant for this socket only (errors about its own frames, a close).
    let (direct_tx, direct_rx) = mpsc::channel::<Direct>(32);
    let (alive_tx, alive_rx) = tokio::sync::watch::channel(Instant::now());
    let feed = Feed {
        ai_chat_id,
        events: subscription,
        after_id,
    };
    let send = send_loop(state.clone(), credential, feed, sink, direct_rx, alive_rx);
    let recv = recv_loop(state, user, ai_chat_id, stream, direct_tx, alive_tx);
    tokio::pin!(send);
    tokio::select! {
        _ = &mut send => {},
        ended = recv => {
            if ended == RecvEnd::Closing {
                // The send loop is writing the close frame the receive loop asked for.
                let _ = timeout(Duration::from_secs(2), send).await;
            }
        },
    }
}

/// What the receive loop hands to the send loop, the socket's only writer.
enum Direct {
    Text(String),
    Close(u16, &'static str),
}

#[derive(PartialEq, Eq)]
enum RecvEnd {
    /// The client closed, vanished or the send loop is gone.
    Gone,
    /// A close frame was queued for the send loop.
    Closing,
}

type Sink = futures::stream::SplitSink<WebSocket, Message>;

/// What a socket sends: the chat's stored messages after `after_id`, then its live events.
struct Feed {
    ai_chat_id: i64,
    events: Subscription,
    after_id: Option<i64>,
}

async fn send_loop(
    state: AppState,
    mut credential: Credential,
    feed: Feed,
    mut sink: Sink,
    mut direct: mpsc::Receiver<Direct>,
    alive: tokio::sync::watch::Receiver<Instant>,
) {
    let Feed {
        ai_chat_id,
        mut events,
        after_id,
    } = feed;
    let send_timeout = Duration::from_secs(state.settings.ws_send_timeout_secs);
    let ping_every = Duration::from_secs(state.settings.ws_ping_secs.max(1));
    let mut shutdown = state.shutdown.clone();

    // Catch-up: stored messages after `after_id`; their live events are then skipped by id.
    // The session may end meanwhile (a slow reader takes long): that ends the catch-up too.
    let mut caught_up: HashSet<i64> = HashSet::new();
    if let Some(after_id) = after_id {
        let catch_up = catch_up(&state, ai_chat_id, after_id, &mut sink, &mut caught_up);
        let ended = tokio::select! {
            done = catch_up => match done {
                CatchUp::Sent => None,
                CatchUp::Gone => return,
                CatchUp::Unavailable => Some((close_code::AGAIN, "catch-up unavailable")),
            },
            ended = credential.ended(&state) => Some((SESSION_ENDED, ended)),
        };
        if let Some((code, reason)) = ended {
            close(&mut sink, code, reason).await;
            return;
        }
    }

    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    loop {
        tokio::select! {
            ended = credential.ended(&state) => {
                close(&mut sink, SESSION_ENDED, ended).await;
                return;
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    close(&mut sink, close_code::AWAY, "server shutting down").await;
                    return;
                }
            }
            _ = ping.tick() => {
                if alive.borrow().elapsed() > ping_every * 2 {
                    tracing::info!("dropping a WebSocket that stopped answering pings");
                    return;
                }
                if !send_message(&mut sink, Message::Ping(Default::default()), send_timeout).await {
                    return;
                }
            }
            Some(direct) = direct.recv() => match direct {
                Direct::Text(text) => {
                    if !send_text(&mut sink, text, send_timeout).await {
                        return;
                    }
                }
                Direct::Close(code, reason) => {
                    close(&mut sink, code, reason).await;
                    return;
                }
            },
            event = events.recv() => match event {
                Ok(text) => {
                    if !send_events(&mut sink, &mut events, text, &caught_up, send_timeout).await {
                        close(&mut sink, SLOW_CONSUMER, "too slow to keep up").await;
                        return;
                    }
                }
                Err(Lagged) => {
                    tracing::info!("closing a WebSocket that fell behind");
                    close(&mut sink, SLOW_CONSUMER, "too slow to keep up").await;
                    return;
                }
            },
        }
    }
}

async fn recv_loop(
    state: AppState,
    user: User,
    ai_chat_id: i64,
    mut stream: futures::stream::SplitStream<WebSocket>,
    direct: mpsc::Sender<Direct>,
    alive: tokio::sync::watch::Sender<Instant>,
) -> RecvEnd {
    loop {
        let frame = match stream.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(err)) if is_too_big(&err) => {
                tracing::info!(error = %err, "closing a WebSocket that sent an oversized message");
                let close = Direct::Close(close_code::SIZE, "message too big");
                return match direct.send(close).await {
                    Ok(()) => RecvEnd::Closing,
                    Err(_) => RecvEnd::Gone,
                };
            }
            Some(Err(_)) | None => return RecvEnd::Gone,
        };
        let _ = alive.send(Instant::now());
        let text = match frame {
            Message::Text(text) => text,
            Message::Close(_) => return RecvEnd::Gone,
            _ => continue,
        };
        if let Some(error) = handle_frame(&state, &user, ai_chat_id, &text).await {
            let event = ChatEvent::Error {
                message: error,
                message_id: None,
            };
            let Ok(json) = serde_json::to_string(&event) else {
                continue;
            };
            if direct.send(Direct::Text(json)).await.is_err() {
                return RecvEnd::Gone;
            }
        }
    }
}

/// Whether a read failed because a frame or message was over the configured size.
fn is_too_big(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if let Some(tungstenite::Error::Capacity(_)) = current.downcast_ref::<tungstenite::Error>()
        {
            return true;
        }
        source = current.source();
    }
    false
}

#[derive(Debug, Deserialize)]
struct ClientFrame {
    #[serde(rename = "type")]
    kind: Option<String>,
    content: Option<serde_json::Value>,
    include_related_chat_context: Option<bool>,
    context_message_limit: Option<i64>,
}

/// Handles one client frame; returns the error to send back, if any.
async fn handle_frame(
    state: &AppState,
    user: &User,
    ai_chat_id: i64,
    text: &str,
) -> Option<String> {
    let frame = match json_body::parse_object::<ClientFrame>(text.as_bytes()) {
        Ok(frame) => frame,
        Err(BodyError::Syntax(_)) => return Some("Invalid JSON".into()),
        Err(err) => return Some(err.message()),
    };
    if frame.kind.as_deref() != Some("message") {
        return None; // `typing` and unknown types are ignored
    }
    let content = frame
        .content
        .as_ref()
        .and_then(|c| c.as_str())
        .unwrap_or_default();
    if content.trim().is_empty() {
        return Some("Message content cannot be empty".into());
    }
    if content.contains('\0') {
        return Some(validate::NULL_CHARACTER.into());
    }
    if content.chars().count() > state.settings.max_content_chars {
        return Some(format!(
            "Message content is too long (at most {} characters)",
            state.settings.max_content_chars
        ));
    }
    let limit = frame.context_message_limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Some("context_message_limit must be between 1 and 100".into());
    }
    let options = ContextOptions {
        include_related_chat_context: frame.include_related_chat_context.unwrap_or(false),
        context_message_limit: i32::try_from(limit).unwrap_or(20),
    };
    // `submit_message` checks ownership in its insert: a chat deleted since the upgrade is 404.
    let request_id = Some(format!("ws-{}", uuid::Uuid::new_v4().simple()));
    let result = submit_message(state, user.id, ai_chat_id, content, options, request_id).await;
    match result {
        Ok(_) => None, // the `user_message` event comes back through the fan-out
        Err(ApiError::Internal(err)) => {
            tracing::error!(error = ?err, "WebSocket message failed");
            Some("Internal server error".into())
        }
        Err(err) => Some(err.to_string()),
    }
}

/// The event a stored message would have produced.
fn stored_event(message: &AiMessage) -> String {
    let event = if message.role == role::ASSISTANT {
        ChatEvent::AssistantMessage {
            message: EventMessage::assistant(message),
        }
    } else {
        ChatEvent::UserMessage {
            message: EventMessage::user(message),
        }
    };
    serde_json::to_string(&event).unwrap_or_default()
}

#[derive(Deserialize)]
struct EventIds {
    message: Option<serde_json::Value>,
}

/// Whether a live event repeats a message the catch-up already sent.
fn already_sent(text: &str, sent: &HashSet<i64>) -> bool {
    serde_json::from_str::<EventIds>(text)
        .ok()
        .and_then(|e| e.message)
        .and_then(|m| m.get("id").and_then(|id| id.as_i64()))
        .is_some_and(|id| sent.contains(&id))
}

/// Most events written before one flush: under load a socket's queued events go out in one
/// write instead of one system call each.
const BATCH: usize = 64;

/// Writes `first` and the events already queued behind it (up to `BATCH`), then flushes once;
/// events the catch-up already sent are skipped. False when the socket must be closed as too
/// slow: the client did not take the frames within `limit`, or its queue overflowed meanwhile.
async fn send_events(
    sink: &mut Sink,
    events: &mut Subscription,
    first: Event,
    caught_up: &HashSet<i64>,
    limit: Duration,
) -> bool {
    let fresh = |text: &Event| caught_up.is_empty() || !already_sent(text, caught_up);
    let write = async {
        let mut lagged = false;
        if fresh(&first) {
            sink.feed(Message::Text(first)).await?;
        }
        for _ in 0..BATCH {
            match events.try_recv() {
                Ok(Some(text)) if fresh(&text) => sink.feed(Message::Text(text)).await?,
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(Lagged) => {
                    lagged = true;
                    break;
                }
            }
        }
        sink.flush().await?;
        Ok::<bool, axum::Error>(lagged)
    };
    match timeout(limit, write).await {
        Ok(Ok(false)) => true,
        Ok(Ok(true)) => {
            tracing::info!("closing a WebSocket that fell behind");
            false
        }
        Ok(Err(_)) | Err(_) => false,
    }
}

async fn send_text(sink: &mut Sink, text: String, limit: Duration) -> bool {
    send_message(sink, Message::Text(Utf8Bytes::from(text)), limit).await
}

async fn send_message(sink: &mut Sink, message: Message, limit: Duration) -> bool {
    matches!(timeout(limit, sink.send(message)).await, Ok(Ok(())))
}

async fn close(sink: &mut Sink, code: u16, reason: &'static str) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }));
    let _ = timeout(Duration::from_secs(1), sink.send(frame)).await;
}
