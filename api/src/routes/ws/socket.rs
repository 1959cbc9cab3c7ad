//! One socket's life: a send loop, the socket's only writer (catch-up, live events, pings,
//! replies to the client's frames, the close), and a receive loop reading the client's frames,
//! joined by `select!`: the socket ends when either does.
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, close_code};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use aichat_shared::domain::User;
use aichat_shared::events::ChatEvent;

use super::catch_up::{CatchUp, CaughtUp, catch_up};
use super::credential::Credential;
use super::frames::{SocketUser, handle_frame};
use super::sink::{Sink, close, send_message, send_text};
use crate::fanout::{Event, Lagged, Subscription};
use crate::revocation::SESSION_ENDED;
use crate::state::AppState;

/// Close code for a client too slow to keep up ("try again later").
const SLOW_CONSUMER: u16 = 1013;
/// The close code of a socket whose chat was deleted (after its `chat_deleted` event).
pub const CHAT_DELETED: u16 = 4404;

/// Runs an upgraded socket until either loop ends.
pub(super) async fn session(
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
    let socket_user = SocketUser {
        user,
        token_hash: credential.token_hash.clone(),
    };
    let send = send_loop(state.clone(), credential, feed, sink, direct_rx, alive_rx);
    let recv = recv_loop(state, socket_user, ai_chat_id, stream, direct_tx, alive_tx);
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
    let mut caught_up = CaughtUp::default();
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
                // A revocation that never arrived ends the socket here, within a ping.
                if credential.gone(&state).await {
                    close(&mut sink, SESSION_ENDED, "session ended").await;
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
                Ok(text) => match send_events(&mut sink, &mut events, text, &mut caught_up, send_timeout).await {
                    Sent::All => {}
                    Sent::ChatDeleted => {
                        close(&mut sink, CHAT_DELETED, "chat deleted").await;
                        return;
                    }
                    Sent::TooSlow => {
                        close(&mut sink, SLOW_CONSUMER, "too slow to keep up").await;
                        return;
                    }
                },
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
    user: SocketUser,
    ai_chat_id: i64,
    mut stream: futures::stream::SplitStream<WebSocket>,
    direct: mpsc::Sender<Direct>,
    alive: tokio::sync::watch::Sender<Instant>,
) -> RecvEnd {
    let user = Arc::new(user);
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
        let refused = match frame {
            // On a task of its own: a frame's handling (a send, an edit, a stop…) runs to its
            // end when the socket closes meanwhile, so a budget reservation it took is kept
            // with its message or given back, never left. And it is a large future: inline it
            // would size this loop, and so every idle socket's task, for it (BENCHMARKS.md,
            // fan-out memory).
            Message::Text(text) => {
                let (state, user) = (state.clone(), Arc::clone(&user));
                let handled =
                    tokio::spawn(
                        async move { handle_frame(&state, &user, ai_chat_id, &text).await },
                    );
                handled.await.unwrap_or_else(|err| {
                    tracing::error!(error = %err, "a WebSocket frame's task failed");
                    Some("Internal server error".into())
                })
            }
            Message::Binary(_) => Some(BINARY_FRAME.to_owned()),
            Message::Close(_) => return RecvEnd::Gone,
            Message::Ping(_) | Message::Pong(_) => None,
        };
        if let Some(error) = refused {
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

/// The `error` event's text for a binary frame: frames are JSON objects, sent as text.
const BINARY_FRAME: &str = "Invalid data: expected a JSON object in a text frame";

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

/// Most events written before one flush: under load a socket's queued events go out in one
/// write instead of one system call each.
const BATCH: usize = 64;

/// What [`send_events`] got written.
enum Sent {
    /// Every event: the socket goes on.
    All,
    /// The events up to the chat's `chat_deleted`: the socket closes.
    ChatDeleted,
    /// The client did not take the frames within the limit, or its queue overflowed
    /// meanwhile: the socket closes as too slow.
    TooSlow,
}

/// Writes `first` and the events already queued behind it (up to `BATCH`, and none after a
/// `chat_deleted`), then flushes once; events the catch-up already sent are skipped.
async fn send_events(
    sink: &mut Sink,
    events: &mut Subscription,
    first: Event,
    caught_up: &mut CaughtUp,
    limit: Duration,
) -> Sent {
    let write = async {
        let mut text = first;
        let mut sent = Sent::All;
        let mut written = 0;
        loop {
            let deleted = ChatEvent::is_chat_deleted(&text);
            if !caught_up.repeats(&text) {
                sink.feed(Message::Text(text)).await?;
            }
            if deleted {
                sent = Sent::ChatDeleted;
                break;
            }
            written += 1;
            if written > BATCH {
                break;
            }
            match events.try_recv() {
                Ok(Some(queued)) => text = queued,
                Ok(None) => break,
                Err(Lagged) => {
                    sent = Sent::TooSlow;
                    break;
                }
            }
        }
        sink.flush().await?;
        Ok::<Sent, axum::Error>(sent)
    };
    match timeout(limit, write).await {
        Ok(Ok(Sent::TooSlow)) => {
            tracing::info!("closing a WebSocket that fell behind");
            Sent::TooSlow
        }
        Ok(Ok(sent)) => sent,
        Ok(Err(_)) | Err(_) => Sent::TooSlow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of six arguments returns.
    fn future_size<A, B, C, D, E, G, F: Future>(_: impl Fn(A, B, C, D, E, G) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open socket's task holds a receive loop for the socket's life, and idle sockets
    /// are most of a fan-out's memory: the loop must not be sized for the frames it handles
    /// (a boxed future each, while it runs). Inline, a frame's handling made the loop 17 KiB
    /// and an idle socket's task 39 KiB (a release build).
    #[test]
    fn an_idle_sockets_receive_loop_is_not_sized_for_its_frames() {
        let size = future_size(recv_loop);
        assert!(size <= 2048, "the receive loop's future is {size} bytes");
    }
}
