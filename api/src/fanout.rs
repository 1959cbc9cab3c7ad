//! Fan-out of chat events: one Redis pub/sub connection per process, subscribed to a chat's
//! channel while at least one local socket (or waiting request) wants it; events go to every
//! local subscriber through its own bounded queue. The same connection carries revoked
//! sessions (`revocation.rs`) to every socket of the process.
//!
//! A queue is an `mpsc` channel, not one `broadcast` channel per chat: `broadcast` allocates
//! all of its slots up front (256 × 64 bytes = 16 KiB per chat), while an `mpsc` queue grows
//! in blocks of 32 as events wait in it. AI chats are private, so most chats have one socket,
//! whose idle memory a per-chat ring would dominate.
use axum::extract::ws::Utf8Bytes;
use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{broadcast, mpsc};

use aichat_shared::keys::Namespace;
use aichat_shared::lock::lock;
use aichat_shared::redis_conn::{self, value_text};

use crate::revocation::{self, Revocation};

/// Runs for each revocation before the sockets hear of it (the session cache forgets it, so
/// that a socket authenticated after the revocation cannot be let in from the cache).
pub type RevocationHook = Box<dyn Fn(&Revocation) + Send + Sync>;

/// One event as published: the WebSocket JSON text. `Utf8Bytes` is what a WebSocket text frame
/// holds, so every socket of the chat sends the same buffer (a reference count, no copy).
pub type Event = Utf8Bytes;

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Topic {
    /// The queues of the local subscribers that keep up, by subscription id.
    queues: Vec<(u64, mpsc::Sender<Event>)>,
    /// Live subscriptions, including any cut off for falling behind.
    refs: usize,
    subscribed: bool,
}

/// Why a subscription yields no more events: it fell a full queue behind and was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged;

struct Inner {
    conn: ConnectionManager,
    ns: Namespace,
    topics: Mutex<HashMap<i64, Topic>>,
    /// Serialises SUBSCRIBE/UNSUBSCRIBE so a quick leave-and-rejoin cannot end unsubscribed.
    ops: tokio::sync::Mutex<()>,
    capacity: usize,
    next_id: AtomicU64,
    revocations: broadcast::Sender<Revocation>,
    on_revocation: RevocationHook,
}

impl Inner {
    fn topics(&self) -> MutexGuard<'_, HashMap<i64, Topic>> {
        lock(&self.topics)
    }
}

impl Hub {
    /// Connects the pub/sub connection and starts the task that routes its messages.
    /// `capacity` bounds each subscriber's queue: one that falls further behind is cut off.
    pub async fn connect(
        url: &str,
        ns: Namespace,
        capacity: usize,
        on_revocation: RevocationHook,
    ) -> redis::RedisResult<Hub> {
        let (mut conn, push_rx) = redis_conn::connect_pubsub(url).await?;
        conn.subscribe(ns.revocations()).await?;
        let (revocations, _) = broadcast::channel(revocation::CHANNEL_CAPACITY);
        let inner = Arc::new(Inner {
            conn,
            ns,
            topics: Mutex::new(HashMap::new()),
            ops: tokio::sync::Mutex::new(()),
            capacity: capacity.max(1),
            next_id: AtomicU64::new(0),
            revocations,
            on_revocation,
        });
        tokio::spawn(route_pushes(Arc::downgrade(&inner), push_rx));
        Ok(Hub { inner })
    }

    /// Starts receiving the chat's events. Once this returns, every event published afterwards
    /// reaches the subscription.
    pub async fn subscribe(&self, ai_chat_id: i64) -> redis::RedisResult<Subscription> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.inner.capacity);
        {
            let mut topics = self.inner.topics();
            let topic = topics.entry(ai_chat_id).or_insert_with(|| Topic {
                queues: Vec::new(),
                refs: 0,
                subscribed: false,
            });
            topic.refs += 1;
            topic.queues.push((id, tx));
        }
        // From here on, dropping the subscription releases the reference.
        let subscription = Subscription {
            ai_chat_id,
            id,
            rx,
            hub: self.clone(),
        };
        let _ops = self.inner.ops.lock().await;
        let needed = self
            .inner
            .topics()
            .get(&ai_chat_id)
            .is_some_and(|t| !t.subscribed);
        if needed {
            let mut conn = self.inner.conn.clone();
            conn.subscribe(self.inner.ns.chat_channel(ai_chat_id))
                .await?;
            if let Some(topic) = self.inner.topics().get_mut(&ai_chat_id) {
                topic.subscribed = true;
            }
        }
        Ok(subscription)
    }

    /// Revocations arriving from now on (`revocation.rs`).
    pub fn revocations(&self) -> broadcast::Receiver<Revocation> {
        self.inner.revocations.subscribe()
    }

    /// How many chats this process is subscribed to (for metrics and tests).
    pub fn subscribed_chats(&self) -> usize {
        self.inner
            .topics()
            .values()
            .filter(|t| t.subscribed)
            .count()
    }

    fn release(&self, ai_chat_id: i64, id: u64) {
        let last = {
            let mut topics = self.inner.topics();
            match topics.get_mut(&ai_chat_id) {
                Some(topic) => {
                    topic.queues.retain(|(queue, _)| *queue != id);
                    topic.refs = topic.refs.saturating_sub(1);
                    topic.refs == 0
                }
                None => false,
            }
        };
        if !last {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let _ops = inner.ops.lock().await;
            let unsubscribe = {
                let mut topics = inner.topics();
                match topics.get(&ai_chat_id) {
                    Some(topic) if topic.refs == 0 => {
                        topics.remove(&ai_chat_id).is_some_and(|t| t.subscribed)
                    }
                    _ => false,
                }
            };
            if unsubscribe {
                let mut conn = inner.conn.clone();
                if let Err(err) = conn.unsubscribe(inner.ns.chat_channel(ai_chat_id)).await {
                    tracing::warn!(error = %err, ai_chat_id, "unsubscribe failed");
                }
            }
        });
    }
}

/// A local subscriber's view of one chat's events.
pub struct Subscription {
    ai_chat_id: i64,
    id: u64,
    rx: mpsc::Receiver<Event>,
    hub: Hub,
}

impl Subscription {
    /// The next event; `Err(Lagged)` once this subscriber fell a full queue behind (after the
    /// events queued before that).
    pub async fn recv(&mut self) -> Result<Event, Lagged> {
        self.rx.recv().await.ok_or(Lagged)
    }

    /// The next event if one is already queued: `Ok(None)` if none is.
    pub fn try_recv(&mut self) -> Result<Option<Event>, Lagged> {
        match self.rx.try_recv() {
            Ok(event) => Ok(Some(event)),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(Lagged),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.release(self.ai_chat_id, self.id);
    }
}

/// Routes pub/sub messages to the chats' queues; after a disconnect, pings with backoff until
/// the connection manager has reconnected (which re-subscribes every channel).
async fn route_pushes(hub: std::sync::Weak<Inner>, mut pushes: mpsc::UnboundedReceiver<PushInfo>) {
    while let Some(push) = pushes.recv().await {
        let Some(inner) = hub.upgrade() else { return };
        match push.kind {
            PushKind::Message if is_revocation(&inner.ns, &push.data) => {
                if let Some(revocation) = push
                    .data
                    .get(1)
                    .and_then(value_text)
                    .and_then(|payload| revocation::parse(&payload))
                {
                    (inner.on_revocation)(&revocation);
                    // No socket listening is fine.
                    let _ = inner.revocations.send(revocation);
                }
            }
            PushKind::Message => {
                if let Some((chat_id, payload)) = parse_message(&inner.ns, &push.data)
                    && let Some(topic) = inner.topics().get_mut(&chat_id)
                {
                    // A full queue is cut off (its subscriber then sees `Lagged`); a closed one
                    // belongs to a subscription being dropped.
                    topic
                        .queues
                        .retain(|(_, queue)| match queue.try_send(payload.clone()) {
                            Ok(()) => true,
                            Err(TrySendError::Full(_) | TrySendError::Closed(_)) => false,
                        });
                }
            }
            PushKind::Disconnection => {
                tracing::warn!("pub/sub connection to Redis lost; reconnecting");
                let hub = Arc::downgrade(&inner);
                tokio::spawn(redis_conn::reconnect(move || {
                    hub.upgrade().map(|inner| inner.conn.clone())
                }));
            }
            _ => {}
        }
    }
}

fn parse_message(ns: &Namespace, data: &[Value]) -> Option<(i64, Event)> {
    let [channel, payload, ..] = data else {
        return None;
    };
    let channel = value_text(channel)?;
    let prefix = ns.chat_channel(0);
    let prefix = prefix.strip_suffix('0')?;
    let chat_id = channel.strip_prefix(prefix)?.parse().ok()?;
    Some((chat_id, Utf8Bytes::from(value_text(payload)?)))
}

fn is_revocation(ns: &Namespace, data: &[Value]) -> bool {
    data.first()
        .and_then(value_text)
        .is_some_and(|channel| channel == ns.revocations())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_routed_by_the_chat_id_in_the_channel() {
        let ns = Namespace::new("ns");
        let data = [
            Value::BulkString(b"ns:chat:42".to_vec()),
            Value::BulkString(b"{\"type\":\"x\"}".to_vec()),
        ];
        let (id, payload) = parse_message(&ns, &data).unwrap();
        assert_eq!((id, &*payload), (42, "{\"type\":\"x\"}"));
        let other = [
            Value::BulkString(b"other:chat:42".to_vec()),
            Value::BulkString(b"x".to_vec()),
        ];
        assert!(parse_message(&ns, &other).is_none());
    }
}
