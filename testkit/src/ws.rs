//! The WebSocket client of the tests: connect, read the next event or the close, send frames,
//! or collect everything a socket says in the background.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aichat_shared::lock::lock;
use futures::StreamExt;
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::eventually;
use crate::stack::Api;

// ---------------------------------------------------------------------------------------------
// WebSocket client

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn ws_connect(api: &Api, chat: i64, token: &str) -> Ws {
    ws_open(&api.ws_url(&format!("/ws/ai-chat/{chat}/?token={token}"))).await
}

/// What a socket yielded next.
#[derive(Debug)]
pub enum WsNext {
    Event(Value),
    Closed(Option<u16>),
    TimedOut,
}

/// The next text event or close, skipping pings; `TimedOut` after `limit`.
pub async fn ws_next(ws: &mut Ws, limit: Duration) -> WsNext {
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return WsNext::TimedOut,
            Ok(None) | Ok(Some(Err(_))) => return WsNext::Closed(None),
            Ok(Some(Ok(Message::Text(text)))) => {
                return WsNext::Event(serde_json::from_str(&text).unwrap_or(Value::Null));
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return WsNext::Closed(frame.map(|f| u16::from(f.code)));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Reads until an event satisfies `want`; panics on close or after `limit`.
pub async fn ws_until(ws: &mut Ws, limit: Duration, want: impl Fn(&Value) -> bool) -> Value {
    ws_events_until(ws, limit, "an event", want).await.0
}

/// Reads until an event satisfies `want`; returns it with the events before it. Panics with
/// `what` (the event wanted) on a close or after `limit`.
pub async fn ws_events_until(
    ws: &mut Ws,
    limit: Duration,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws_next(ws, left).await {
            WsNext::Event(event) if want(&event) => return (event, before),
            WsNext::Event(event) => before.push(event),
            other => panic!("wanted {what} within {limit:?}, got {other:?} after {before:?}"),
        }
    }
}

/// Reads until the server closes the socket: the events before, and the close code (`None`:
/// closed without a frame). Panics if it is still open after `limit`.
pub async fn ws_events_until_closed(ws: &mut Ws, limit: Duration) -> (Vec<Value>, Option<u16>) {
    let mut events = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws_next(ws, left).await {
            WsNext::Closed(code) => return (events, code),
            WsNext::Event(event) => events.push(event),
            WsNext::TimedOut => panic!("the socket is still open after {limit:?}"),
        }
    }
}

/// The answer to a WebSocket upgrade: its status (101 once upgraded; the socket is then
/// dropped) and headers. Panics on anything but an HTTP answer.
pub async fn ws_upgrade(
    request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
) -> (u16, tokio_tungstenite::tungstenite::http::HeaderMap) {
    use tokio_tungstenite::tungstenite::Error;
    match tokio_tungstenite::connect_async(request).await {
        Ok((_socket, response)) => (response.status().as_u16(), response.headers().clone()),
        Err(Error::Http(response)) => (response.status().as_u16(), response.headers().clone()),
        Err(err) => panic!("websocket upgrade: {err}"),
    }
}

pub async fn ws_send(ws: &mut Ws, value: Value) -> bool {
    use futures::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        value.to_string().into(),
    ))
    .await
    .is_ok()
}

/// A socket read by a task of its own: every event (and the close code, if any) is kept.
pub struct WsCollector {
    seen: Arc<Mutex<Vec<Value>>>,
    closed: Arc<Mutex<Option<Option<u16>>>>,
    task: JoinHandle<()>,
}

impl WsCollector {
    pub fn start(mut ws: Ws) -> WsCollector {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(None));
        let (sink, close) = (seen.clone(), closed.clone());
        let task = tokio::spawn(async move {
            loop {
                match ws_next(&mut ws, Duration::from_secs(3600)).await {
                    WsNext::Event(event) => lock(&sink).push(event),
                    WsNext::Closed(code) => {
                        *lock(&close) = Some(code);
                        return;
                    }
                    WsNext::TimedOut => return,
                }
            }
        });
        WsCollector { seen, closed, task }
    }

    pub fn events(&self) -> Vec<Value> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// `Some(code)` once the server closed the socket (`Some(None)`: no close frame).
    pub fn closed(&self) -> Option<Option<u16>> {
        self.closed.lock().ok().and_then(|c| *c)
    }

    /// Waits until an event satisfies `want`; panics after `limit`.
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        want: impl Fn(&Value) -> bool,
    ) -> Value {
        eventually(limit, what, || {
            let found = self.events().into_iter().find(|e| want(e));
            async move { found }
        })
        .await
    }

    /// Waits until the `assistant_message` answering `id` has arrived; panics after `limit`.
    pub async fn reply_to(&self, id: i64, limit: Duration, what: &str) -> Value {
        self.wait_for(limit, what, |e| {
            e["type"] == "assistant_message" && e["message"]["reply_to"] == id
        })
        .await
    }

    /// `assistant_message` events per answered message id.
    pub fn replies(&self) -> HashMap<i64, u32> {
        let mut replies = HashMap::new();
        for event in self.events() {
            if event["type"] == "assistant_message"
                && let Some(id) = event["message"]["reply_to"].as_i64()
            {
                *replies.entry(id).or_default() += 1;
            }
        }
        replies
    }
}

impl Drop for WsCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens a socket at `url` (bounded: 10 s).
pub async fn ws_open(url: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("websocket connects in time")
    .expect("websocket connects");
    ws
}

/// The next text event, parsed; panics on a close or after `secs` seconds without one.
pub async fn next_event(ws: &mut Ws, secs: u64) -> Value {
    match ws_next(ws, Duration::from_secs(secs)).await {
        WsNext::Event(event) => event,
        other => panic!("wanted an event within {secs} s, got {other:?}"),
    }
}

/// Reads events until one of `kind` arrives; returns it with the events before it.
pub async fn event_of(ws: &mut Ws, kind: &str, secs: u64) -> (Value, Vec<Value>) {
    let what = format!("a {kind} event");
    ws_events_until(ws, Duration::from_secs(secs), &what, |event| {
        event["type"] == kind
    })
    .await
}

/// Reads until the server closes the socket; the close code (`None`: closed without a frame).
/// Panics if it is still open after `secs` seconds.
pub async fn closed_with(ws: &mut Ws, secs: u64) -> Option<u16> {
    ws_events_until_closed(ws, Duration::from_secs(secs))
        .await
        .1
}

/// Sends `value` as a text frame; panics if the socket is gone.
pub async fn send_ws(ws: &mut Ws, value: Value) {
    assert!(ws_send(ws, value).await, "send on a closed socket");
}
