//! What a worker process runs beside its queue consumer (`monitor.rs`): the wait for the
//! database at build, the `/healthz` and `/metrics` server, the refresh of its worker
//! registration until its in-flight jobs are settled, the sweeper, and the stop (the signal,
//! then the drain of the running jobs).
//!
//! Every task ends at the stop: the HTTP server and the sweeper when the stop channel turns
//! true, the registration refresh once [`Registration::settle`] has handed the in-flight jobs
//! over.
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use redis::aio::ConnectionManager;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use aichat_shared::config::DatabaseSettings;
use aichat_shared::db;
use aichat_shared::jobs::JobQueue;

use crate::http::{self, HttpState};
use crate::monitor::restart_delay;
use crate::settings::Settings;
use crate::state::JobContext;
use crate::stop::Stopping;
use crate::sweeper::Sweeper;

/// The database's installation id (`db::installation_id`), asked for until it is there: a
/// worker may start before PostgreSQL is up or before the API has created the schema, and
/// its Redis keys must name the database whose messages it answers.
pub async fn wait_for_installation(pool: &db::Pool, database: &DatabaseSettings) -> String {
    let mut failures = 0u32;
    loop {
        match db::installation_id(pool).await {
            Ok(id) => return id,
            Err(err) => {
                if let Some(hint) = db::missing_database_hint(database, &err) {
                    tracing::error!("{hint}");
                } else if failures == 0 {
                    tracing::warn!(
                        error = %err,
                        "waiting for the database and its schema (DATABASE_URL; the API applies \
                         the schema at start, or run `aichat-api migrate`)"
                    );
                }
                failures = failures.saturating_add(1);
                tokio::time::sleep(restart_delay(failures).max(Duration::from_millis(100))).await;
            }
        }
    }
}

/// Serves `/healthz` and `/metrics` on `listener` until `stop` turns true.
pub fn serve_http(
    listener: TcpListener,
    state: HttpState,
    stop: &watch::Sender<bool>,
) -> JoinHandle<std::io::Result<()>> {
    let mut stop = stop.subscribe();
    tokio::spawn(
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|stopping| *stopping).await;
            })
            .into_future(),
    )
}

/// Waits for the HTTP server to end; an error of the server itself is only logged.
pub async fn join_http(server: JoinHandle<std::io::Result<()>>) -> anyhow::Result<()> {
    if let Err(err) = server.await.context("metrics server task")? {
        tracing::warn!(error = %err, "metrics server ended with an error");
    }
    Ok(())
}

/// The sweeper (`sweeper.rs`), every `WORKER_SWEEP_INTERVAL_SECS` until `stop` turns true;
/// none when that interval is 0.
pub fn start_sweeper(
    settings: &Settings,
    jobs: &JobContext,
    redis: &ConnectionManager,
    stop: &watch::Sender<bool>,
) -> Option<JoinHandle<()>> {
    (settings.worker_sweep_interval_secs > 0).then(|| {
        let sweeper = Sweeper {
            db: jobs.db.clone(),
            redis: redis.clone(),
            queue: JobQueue::new(redis.clone(), &jobs.ns),
            interval: Duration::from_secs(settings.worker_sweep_interval_secs),
            grace: Duration::from_secs(settings.worker_sweep_grace_secs),
            max_messages: usize::try_from(settings.worker_sweep_max_messages).unwrap_or(usize::MAX),
        };
        tokio::spawn(sweeper.run(stop.subscribe()))
    })
}

/// This process's worker registration, kept fresh from the start until the in-flight jobs are
/// settled. apalis heart-beats only while its fetch buffer is empty (so not while a full
/// worker holds a fetched batch) and stops at the signal; a registration left to go stale
/// would let other workers take over jobs that still run here.
pub struct Registration {
    stopping: Arc<Stopping>,
    settled: watch::Sender<bool>,
    refresh: JoinHandle<()>,
}

impl Registration {
    /// Starts refreshing the registration every `interval`.
    pub fn keep_alive(
        stopping: Arc<Stopping>,
        redis: ConnectionManager,
        config: &apalis_redis::Config,
        interval: Duration,
    ) -> Self {
        let (settled, settled_rx) = watch::channel(false);
        let refresh = {
            let stopping = stopping.clone();
            let workers_set = config.workers_set();
            tokio::spawn(async move {
                stopping
                    .keep_alive(redis, workers_set, interval, settled_rx)
                    .await;
            })
        };
        Registration {
            stopping,
            settled,
            refresh,
        }
    }

    /// Once the consumer has stopped: acknowledges what finished during the stop, hands the
    /// other in-flight jobs back to the queue (`Stopping::settle`), then ends the refresh.
    pub async fn settle(self, mut redis: ConnectionManager, config: &apalis_redis::Config) {
        match self.stopping.settle(&mut redis, config).await {
            Ok(settled) => tracing::info!(
                acknowledged = settled.acknowledged,
                handed_back = settled.handed_back,
                "in-flight jobs settled"
            ),
            Err(err) => tracing::warn!(
                error = %err,
                "could not settle the in-flight jobs; other workers take them over after the \
                 orphan window"
            ),
        }
        let _ = self.settled.send(true);
        let _ = self.refresh.await;
    }
}

/// Resolves once `shutdown` does, having begun the stop: `/healthz` answers 503, no job that
/// has not reached the model yet goes on, jobs that finish from now on are remembered for
/// settling, and the HTTP server and the sweeper end. The monitor's signal.
pub async fn begin_stop(
    shutdown: impl Future<Output = ()>,
    ready: Arc<AtomicBool>,
    stopping: Arc<Stopping>,
    stop: watch::Sender<bool>,
) -> std::io::Result<()> {
    shutdown.await;
    tracing::info!("shutting down: no new jobs, waiting for running ones");
    ready.store(false, Ordering::SeqCst);
    stopping.begin();
    let _ = stop.send(true);
    Ok(())
}

/// The monitor's terminator: waits for the running jobs, at most `grace`, then abandons
/// those still running.
pub async fn drain(stopping: Arc<Stopping>, grace: Duration) {
    let drained = stopping.drain(grace).await;
    if drained.in_time {
        tracing::info!("every running job finished");
    } else {
        tracing::warn!(
            abandoned = drained.abandoned,
            grace_secs = grace.as_secs(),
            "shutdown grace over; abandoning the jobs still running"
        );
    }
}
