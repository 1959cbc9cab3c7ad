//! What every handler can reach.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aichat_shared::jobs::JobQueue;
use aichat_shared::keys::Namespace;
use aichat_shared::lock::lock;
use aichat_shared::models::Registry;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::fanout::Hub;
use crate::hashing::Hashing;
use crate::send::batch::SendBatcher;
use crate::session_cache::SessionCache;
use crate::settings::Settings;

/// What every handler can reach, behind one `Arc`: axum clones the state for every extractor
/// and middleware of every request, and a clone is one count, not a count per pool, channel
/// and cache and a copy of every key name (a profile of the ingest had a fifth of the API's
/// own CPU cloning and dropping the fields one by one).
#[derive(Clone)]
pub struct AppState(Arc<Handles>);

impl AppState {
    pub(crate) fn new(handles: Handles) -> Self {
        AppState(Arc::new(handles))
    }
}

impl std::ops::Deref for AppState {
    type Target = Handles;

    fn deref(&self) -> &Handles {
        &self.0
    }
}

/// The pools, queues, caches and settings of [`AppState`].
pub struct Handles {
    pub db: PgPool,
    pub(crate) redis: ConnectionManager,
    pub queue: JobQueue,
    /// Stores and queues sends in batches (`send::batch`).
    pub(crate) sends: SendBatcher,
    pub(crate) hub: Hub,
    pub ns: Namespace,
    pub(crate) settings: Arc<Settings>,
    /// The models AI chats may use (`MODELS_FILE`, or the environment's).
    pub(crate) models: Arc<Registry>,
    /// Becomes `true` when the server starts shutting down: sockets close with 1001.
    pub(crate) shutdown: watch::Receiver<bool>,
    pub sockets: SocketTracker,
    pub(crate) sessions: Arc<SessionCache>,
    /// The bounded pool every password hash and check goes through.
    pub(crate) hashing: Hashing,
}

/// Counts open WebSockets, so shutdown can wait for their close frames to go out, and each
/// user's, for `MAX_SOCKETS_PER_USER`; and each user's reply streams, for
/// `MAX_STREAMS_PER_USER`.
#[derive(Clone)]
pub struct SocketTracker {
    open: Arc<watch::Sender<usize>>,
    per_user: Arc<Mutex<HashMap<i64, usize>>>,
    streams_per_user: Arc<Mutex<HashMap<i64, usize>>>,
}

impl Default for SocketTracker {
    fn default() -> Self {
        SocketTracker {
            open: Arc::new(watch::channel(0).0),
            per_user: Arc::default(),
            streams_per_user: Arc::default(),
        }
    }
}

/// Takes one of `user_id`'s `max` places counted in `per_user` (0: no limit) until the guard
/// is dropped; `None` when all are taken.
fn reserve(
    per_user: &Arc<Mutex<HashMap<i64, usize>>>,
    user_id: i64,
    max: usize,
) -> Option<UserSocket> {
    let mut counts = lock(per_user);
    let open = counts.entry(user_id).or_default();
    if max > 0 && *open >= max {
        return None;
    }
    *open += 1;
    Some(UserSocket {
        user_id,
        per_user: per_user.clone(),
    })
}

impl SocketTracker {
    /// Marks a socket open until the guard is dropped.
    pub(crate) fn track(&self) -> SocketGuard {
        self.open.send_modify(|n| *n += 1);
        SocketGuard {
            open: self.open.clone(),
        }
    }

    /// Takes one of `user_id`'s `max` sockets on this instance (0: no limit) until the guard
    /// is dropped; `None` when all are taken.
    pub(crate) fn reserve_for_user(&self, user_id: i64, max: usize) -> Option<UserSocket> {
        reserve(&self.per_user, user_id, max)
    }

    /// Takes one of `user_id`'s `max` reply streams on this instance (0: no limit) until the
    /// guard is dropped; `None` when all are taken.
    pub(crate) fn reserve_stream_for_user(&self, user_id: i64, max: usize) -> Option<UserSocket> {
        reserve(&self.streams_per_user, user_id, max)
    }

    pub fn open(&self) -> usize {
        *self.open.borrow()
    }

    /// Waits until every socket has closed, or `limit` passes.
    pub(crate) async fn wait_closed(&self, limit: Duration) {
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

/// One socket of a user, counted until dropped.
pub(crate) struct UserSocket {
    user_id: i64,
    per_user: Arc<Mutex<HashMap<i64, usize>>>,
}

impl Drop for UserSocket {
    fn drop(&mut self) {
        let mut per_user = lock(&self.per_user);
        if let Some(open) = per_user.get_mut(&self.user_id) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                per_user.remove(&self.user_id);
            }
        }
    }
}

pub(crate) struct SocketGuard {
    open: Arc<watch::Sender<usize>>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}
