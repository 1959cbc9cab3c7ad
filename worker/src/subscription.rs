//! The worker process's pub/sub connection: stop requests for the jobs it runs
//! (`stop_requests.rs`) and pushes of new jobs (`jobs_pushed.rs`), each on its namespace
//! channel. Its task only routes what arrives; it does no I/O of its own, so a wake-up is
//! never held up behind anything else.
use std::sync::{Arc, Weak};

use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind};
use tokio::sync::mpsc;

use aichat_shared::keys::Namespace;
use aichat_shared::redis_conn::{self, value_text};

use crate::abort_on_drop::AbortOnDrop;
use crate::jobs_pushed::JobsPushed;
use crate::stop_requests::StopRequests;

/// Subscribes to the namespace's stop and jobs-pushed channels and routes what they carry,
/// until the returned handle or `requests` is dropped (its task then ends, closing its Redis
/// connection).
pub async fn subscribe(
    redis_url: &str,
    ns: &Namespace,
    requests: &Arc<StopRequests>,
    pushed: JobsPushed,
) -> redis::RedisResult<AbortOnDrop> {
    let (mut conn, pushes) = redis_conn::connect_pubsub(redis_url).await?;
    let channels = Channels {
        stop: ns.stop_requests(),
        pushed: ns.jobs_pushed(),
    };
    conn.subscribe(&[&channels.stop, &channels.pushed]).await?;
    let route = Route {
        requests: Arc::downgrade(requests),
        pushed,
        channels,
    };
    Ok(AbortOnDrop::spawn(route.run(conn, pushes)))
}

struct Channels {
    stop: String,
    pushed: String,
}

struct Route {
    requests: Weak<StopRequests>,
    pushed: JobsPushed,
    channels: Channels,
}

impl Route {
    /// Routes the subscription's pushes until the stop registry is dropped (or the task is
    /// aborted).
    async fn run(self, conn: ConnectionManager, mut pushes: mpsc::UnboundedReceiver<PushInfo>) {
        while let Some(push) = pushes.recv().await {
            let Some(requests) = self.requests.upgrade() else {
                return;
            };
            let channel = push.data.first().and_then(value_text);
            let on = |name: &String| channel.as_ref() == Some(name);
            match push.kind {
                PushKind::Message if on(&self.channels.pushed) => self.pushed.signal(),
                PushKind::Message if on(&self.channels.stop) => {
                    let id = push
                        .data
                        .get(1)
                        .and_then(value_text)
                        .and_then(|payload| payload.parse::<i64>().ok());
                    if let Some(id) = id
                        && requests.stop(id)
                    {
                        tracing::info!(message_id = id, "stop requested; stopping its run");
                    }
                }
                // Also the subscriptions made again after a reconnect: what was published
                // while the connection was down reached nobody.
                PushKind::Subscribe if on(&self.channels.pushed) => self.pushed.signal(),
                PushKind::Subscribe if on(&self.channels.stop) => requests.check_soon(),
                PushKind::Disconnection => {
                    tracing::warn!("worker's pub/sub connection to Redis lost; reconnecting");
                    let conn = conn.clone();
                    let alive = Arc::downgrade(&requests);
                    tokio::spawn(redis_conn::reconnect(move || {
                        alive.upgrade().map(|_| conn.clone())
                    }));
                }
                _ => {}
            }
        }
    }
}
