//! `GET /api/ai/messages/{id}/stream/`: one reply as Server-Sent Events, for clients without
//! WebSockets. Each event's data is the JSON of the WebSocket event of the same name: first
//! what the reply is now (`assistant_partial`, or after `Last-Event-ID: k` the deltas after
//! `k`), then live deltas (`id:` their `seq`), then how it ended (`assistant_message`, `error`
//! or `message_cancelled`); then the stream ends. A message already ended streams only that.
//! Any API instance serves it: the text so far is read from Redis (`aichat_shared::partial`)
//! after subscribing to the chat's events, so nothing falls between the two.
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};
use utoipa_axum::{router::OpenApiRouter, routes};

use aichat_shared::db;
use aichat_shared::domain::{AiMessage, MessageStatus};
use aichat_shared::events::{ChatEvent, EventMessage};
use aichat_shared::partial;

use crate::access::own_user_message;
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::error::ApiResult;
use crate::extract::ApiPath;
use crate::fanout::Subscription;
use crate::routes::schemas::ErrorBody;
use crate::send::wait;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream_message))
}

/// Events buffered for a client that reads slowly; past it the stream waits for the client.
const BUFFER: usize = 64;

/// One Server-Sent Event of a reply stream, as a client's parser reads it (the document's
/// shape of each event of the `text/event-stream` body).
#[derive(utoipa::ToSchema)]
#[expect(
    dead_code,
    reason = "a shape for the document: the stream is written by axum's `Event`"
)]
pub struct ReplyStreamEvent {
    /// The JSON of the WebSocket event of the same name (`assistant_partial`,
    /// `assistant_delta`, `assistant_message`, `error`, `message_cancelled` or `chat_deleted`).
    data: String,
    /// The SSE event name: always the default, `message`.
    event: Option<String>,
    /// The `seq` of the delta (or partial) the event carries; absent on the others.
    id: Option<String>,
    retry: Option<u64>,
}

/// Stream the reply to one of the user's messages (`{id}`: the user message) as Server-Sent
/// Events, until it ends (at most `STREAM_MAX_SECS`; reconnect with `Last-Event-ID`).
#[utoipa::path(get, path = "/api/ai/messages/{id}/stream/", tag = "ai",
    params(("id" = i64, Path),
        ("Last-Event-ID" = Option<String>, Header, description = "The `seq` of the last delta received: the stream resumes after it")),
    responses(
        (status = 200, description = "`text/event-stream`: `assistant_partial` (or, after `Last-Event-ID`, \
            the missed `assistant_delta`s), live `assistant_delta`s with `id: <seq>`, then `assistant_message`, \
            `error` or `message_cancelled` (`chat_deleted` when the chat was deleted meanwhile); each event's data is the WebSocket event's JSON",
            content_type = "text/event-stream", body = ReplyStreamEvent),
        (status = 404, description = "No such user message of the user's", body = ErrorBody),
        (status = 429, description = "`MAX_STREAMS_PER_USER` streams of the user open on this instance", body = ErrorBody),
        (status = 503, description = "Redis unreachable: events cannot be followed", body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(message_id = id))]
async fn stream_message(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let user_id = auth.user.id;
    let message = own_user_message(&state, user_id, id).await?;
    // Held by the stream's task: the place is the user's until the stream ends.
    let Some(place) = state
        .sockets
        .reserve_stream_for_user(user_id, state.settings.max_streams_per_user)
    else {
        return Err(ApiError::TooManyStreams);
    };
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    // Subscribed before the message and its text so far are read: what happens after the
    // reads arrives as events.
    let refusal = "Streaming is unavailable right now; please retry";
    let events = wait::subscribe(&state, message.ai_chat, refusal).await?;
    let message = own_user_message(&state, user_id, id).await?;
    let (tx, mut rx) = mpsc::channel(BUFFER);
    let limit = Duration::from_secs(state.settings.stream_max_secs);
    tokio::spawn(async move {
        if let Err(err) = feed(&state, message, events, after, limit, &tx).await {
            tracing::warn!(error = %err, "a reply stream failed");
        }
        drop(place);
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|e| e.map(Ok)));
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The SSE form of a chat event: its JSON as data, and its `seq` as id when it has one.
fn sse_event(event: &ChatEvent, seq: Option<u64>) -> Event {
    let data = serde_json::to_string(event).unwrap_or_default();
    let sse = Event::default().data(data);
    match seq {
        Some(seq) => sse.id(seq.to_string()),
        None => sse,
    }
}

/// How a message that no longer waits ended, as its event; `None` while it waits.
async fn ending(
    state: &AppState,
    message: &AiMessage,
) -> aichat_shared::error::Result<Option<ChatEvent>> {
    Ok(match message.status {
        MessageStatus::Answered => db::ai_messages::find_reply(&state.db, message.id)
            .await?
            .map(|reply| ChatEvent::AssistantMessage {
                message: EventMessage::assistant(&reply),
            }),
        MessageStatus::Failed => Some(ChatEvent::Error {
            message: message.error.clone().unwrap_or_default(),
            message_id: Some(message.id),
        }),
        MessageStatus::Cancelled => Some(ChatEvent::MessageCancelled {
            message_id: message.id,
        }),
        MessageStatus::Queued | MessageStatus::Answering | MessageStatus::Complete => None,
    })
}

/// Writes the stream's events to `tx` until the reply ends, the client leaves, the
/// subscription falls behind (the client resumes with `Last-Event-ID`), or `limit` passes.
async fn feed(
    state: &AppState,
    message: AiMessage,
    mut events: Subscription,
    after: u64,
    limit: Duration,
    tx: &mpsc::Sender<Event>,
) -> aichat_shared::error::Result<()> {
    let id = message.id;
    if let Some(end) = ending(state, &message).await? {
        let _ = tx.send(sse_event(&end, None)).await;
        return Ok(());
    }
    let so_far = partial::read(&mut state.redis.clone(), &state.ns, id, after).await?;
    let mut sent = so_far.seq;
    // From the start, or the reply started over since `after`: the whole text so far.
    if after == 0 || so_far.restarted {
        let event = ChatEvent::AssistantPartial {
            message_id: id,
            content: so_far.content(),
            seq: so_far.seq,
        };
        if tx.send(sse_event(&event, Some(so_far.seq))).await.is_err() {
            return Ok(());
        }
    } else {
        for (seq, delta) in (after + 1..).zip(so_far.deltas) {
            let event = ChatEvent::AssistantDelta {
                message_id: id,
                delta,
                seq,
            };
            if tx.send(sse_event(&event, Some(seq))).await.is_err() {
                return Ok(());
            }
        }
    }
    let deadline = Instant::now() + limit;
    loop {
        // A client that left ends the stream now, not at its next event.
        let text = tokio::select! {
            received = timeout_at(deadline, events.recv()) => match received {
                Ok(Ok(text)) => text,
                _ => return Ok(()),
            },
            () = tx.closed() => return Ok(()),
        };
        let Ok(event) = serde_json::from_str::<ChatEvent>(&text) else {
            continue;
        };
        let (seq, last) = match &event {
            ChatEvent::AssistantDelta {
                message_id, seq, ..
            } if *message_id == id && *seq > sent => (Some(*seq), false),
            // The reply started over: its deltas are numbered from 1 again.
            ChatEvent::AssistantPartial {
                message_id, seq, ..
            } if *message_id == id => {
                sent = *seq;
                (Some(*seq), false)
            }
            ChatEvent::AssistantMessage { message } if message.reply_to == Some(id) => (None, true),
            ChatEvent::Error {
                message_id: Some(failed),
                ..
            } if *failed == id => (None, true),
            ChatEvent::MessageCancelled { message_id } if *message_id == id => (None, true),
            ChatEvent::ChatDeleted { .. } => (None, true),
            _ => continue,
        };
        if tx.send(sse_event(&event, seq)).await.is_err() || last {
            return Ok(());
        }
        if let Some(seq) = seq {
            sent = seq;
        }
    }
}
