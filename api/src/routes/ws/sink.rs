//! Writing to the client: every write has a time limit, so a client that stops reading is
//! dropped instead of holding its task (and its queue) for ever.
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::SinkExt;
use tokio::time::timeout;

/// The socket's writing half; only the send loop holds it.
pub(super) type Sink = futures::stream::SplitSink<WebSocket, Message>;

/// False when the client did not take the text within `limit`, or is gone.
pub(super) async fn send_text(sink: &mut Sink, text: String, limit: Duration) -> bool {
    send_message(sink, Message::Text(Utf8Bytes::from(text)), limit).await
}

/// False when the client did not take the message within `limit`, or is gone.
pub(super) async fn send_message(sink: &mut Sink, message: Message, limit: Duration) -> bool {
    matches!(timeout(limit, sink.send(message)).await, Ok(Ok(())))
}

/// Sends a close frame, waiting at most a second: the socket ends either way.
pub(super) async fn close(sink: &mut Sink, code: u16, reason: &'static str) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }));
    let _ = timeout(Duration::from_secs(1), sink.send(frame)).await;
}
