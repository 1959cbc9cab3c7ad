//! Streaming the reply to the chat as `assistant_delta` events, coalescing the model's tiny
//! chunks (at most one event per `DELTA_FLUSH_MS`, sooner once `DELTA_FLUSH_CHARS` pile up),
//! each kept with the reply in progress (`aichat_shared::partial`).
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use tokio::time::Instant;

use aichat_shared::keys::Namespace;
use aichat_shared::partial;

/// Gathers chunks until they are worth an event.
#[derive(Debug)]
pub struct Coalescer {
    pending: String,
    pending_chars: usize,
    max_chars: usize,
}

impl Coalescer {
    pub fn new(max_chars: usize) -> Self {
        Coalescer {
            pending: String::new(),
            pending_chars: 0,
            max_chars: max_chars.max(1),
        }
    }

    /// Adds a chunk; returns the text to send now when enough has piled up.
    pub fn push(&mut self, chunk: &str) -> Option<String> {
        self.pending.push_str(chunk);
        self.pending_chars += chunk.chars().count();
        (self.pending_chars >= self.max_chars).then(|| self.take())
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Everything gathered so far.
    pub fn take(&mut self) -> String {
        self.pending_chars = 0;
        std::mem::take(&mut self.pending)
    }
}

/// What the model call hands the delta publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// The reply starts over: the call is retried after part of it may have streamed.
    Restart,
}

/// Where one reply's deltas go.
pub struct DeltaTarget {
    pub redis: ConnectionManager,
    pub ns: Namespace,
    pub ai_chat_id: i64,
    /// The user message being answered.
    pub message_id: i64,
    pub flush_every: Duration,
    pub flush_chars: usize,
}

impl DeltaTarget {
    /// Empties the reply in progress and tells its followers (`partial::restart`).
    async fn restart(&mut self) {
        let restarted =
            partial::restart(&mut self.redis, &self.ns, self.ai_chat_id, self.message_id).await;
        if let Err(err) = restarted {
            tracing::warn!(error = %err, "could not start the reply in progress over");
        }
    }

    async fn publish(&mut self, delta: String) {
        if delta.is_empty() {
            return;
        }
        // Kept with the reply in progress and published as one, numbered (`partial.rs`).
        // Deltas are a preview; the saved reply is what counts, so a lost one is only logged.
        let pushed = partial::push_delta(
            &mut self.redis,
            &self.ns,
            self.ai_chat_id,
            self.message_id,
            &delta,
        )
        .await;
        if let Err(err) = pushed {
            tracing::warn!(error = %err, "could not publish assistant_delta");
        }
    }
}

/// Publishes what arrives on `chunks` until the sender is dropped, then flushes the rest, so
/// every delta is out before the caller publishes the final `assistant_message`. A restart
/// drops what was gathered and, if anything was published, starts the reply in progress over.
pub async fn publish_deltas(mut chunks: mpsc::UnboundedReceiver<Piece>, mut target: DeltaTarget) {
    let mut coalescer = Coalescer::new(target.flush_chars);
    let mut flush_at: Option<Instant> = None;
    let mut published = false;
    loop {
        tokio::select! {
            chunk = chunks.recv() => match chunk {
                Some(Piece::Text(chunk)) => {
                    if coalescer.is_empty() {
                        flush_at = Some(Instant::now() + target.flush_every);
                    }
                    if let Some(ready) = coalescer.push(&chunk) {
                        flush_at = None;
                        published = true;
                        target.publish(ready).await;
                    }
                }
                Some(Piece::Restart) => {
                    coalescer.take();
                    flush_at = None;
                    if std::mem::take(&mut published) {
                        target.restart().await;
                    }
                }
                None => break,
            },
            () = sleep_until_some(flush_at) => {
                flush_at = None;
                published = true;
                target.publish(coalescer.take()).await;
            }
        }
    }
    target.publish(coalescer.take()).await;
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::Coalescer;

    #[test]
    fn chunks_wait_until_enough_characters() {
        let mut c = Coalescer::new(5);
        assert_eq!(c.push("ab"), None);
        assert_eq!(c.push("cd"), None);
        assert_eq!(c.push("éf").as_deref(), Some("abcdéf"));
        assert!(c.is_empty());
        assert_eq!(c.push("x"), None);
        assert_eq!(c.take(), "x");
        assert_eq!(c.take(), "");
    }
}
