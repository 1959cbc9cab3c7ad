//! What every handler can reach.
use std::sync::Arc;
use std::time::Duration;

use aichat_shared::jobs::JobQueue;
use aichat_shared::keys::Namespace;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::fanout::Hub;
use crate::hashing::Hashing;
use crate::send_batch::SendBatcher;
use crate::session_cache::SessionCache;
use crate::settings::Settings;

#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub queue: JobQueue,
    /// Stores and queues sends in batches (`send_batch`).
    pub sends: SendBatcher,
    pub hub: Hub,
    pub ns: Namespace,
    pub settings: Arc<Settings>,
    /// Becomes `true` when the server starts shutting down: sockets close with 1001.
    pub shutdown: watch::Receiver<bool>,
    pub sockets: SocketTracker,
    pub sessions: Arc<SessionCache>,
    /// The bounded pool every password hash and check goes through.
    pub hashing: Hashing,
}

/// Counts open WebSockets, so shutdown can wait for their close frames to go out.
#[derive(Clone)]
pub struct SocketTracker {
    open: Arc<watch::Sender<usize>>,
}

impl Default for SocketTracker {
    fn default() -> Self {
        SocketTracker {
            open: Arc::new(watch::channel(0).0),
        }
    }
}

impl SocketTracker {
    /// Marks a socket open until the guard is dropped.
    pub fn track(&self) -> SocketGuard {
        self.open.send_modify(|n| *n += 1);
        SocketGuard {
            open: self.open.clone(),
        }
    }

    pub fn open(&self) -> usize {
        *self.open.borrow()
    }

    /// Waits until every socket has closed, or `limit` passes.
    pub async fn wait_closed(&self, limit: Duration) {
        self.wait_for_at_most(0, limit).await;
    }

    /// Waits until at most `n` sockets are open; false if `limit` passed first.
    pub async fn wait_for_at_most(&self, n: usize, limit: Duration) -> bool {
        let mut rx = self.open.subscribe();
        matches!(
            tokio::time::timeout(limit, rx.wait_for(|open| *open <= n)).await,
            Ok(Ok(_))
        )
    }
}

pub struct SocketGuard {
    open: Arc<watch::Sender<usize>>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}
