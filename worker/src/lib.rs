//! aichat completion worker: takes completion jobs from the Redis queue (apalis), answers them
//! with the model, and serves `/healthz` and `/metrics`.
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;
use apalis::prelude::{
    BackendExt, Event, Monitor, ParallelizeExt, WorkerBuilder, WorkerBuilderExt,
};
use apalis_redis::RedisStorage;
use metrics_exporter_prometheus::PrometheusHandle;
use rand::Rng;
use redis::aio::ConnectionManager;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::watch;

use aichat_shared::backoff::Backoff;
use aichat_shared::config::DatabaseSettings;
use aichat_shared::{db, jobs, redis_conn};

pub mod context;
pub mod deltas;
pub mod http;
pub mod job;
pub mod llm;
pub mod metrics;
pub mod rate_limit;
pub mod reply_batch;
pub mod retry;
pub mod settings;
pub mod stop;
pub mod sweeper;

pub use job::Hooks;
pub use settings::Settings;

use crate::context::TokenCounter;
use crate::job::JobContext;
use crate::llm::{LlmClient, RetryPolicy};
use crate::rate_limit::{Limits, RateLimiter};
use crate::stop::Stopping;
use crate::sweeper::Sweeper;

/// Longest pause before a worker that lost Redis tries again.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
const RESTART_BACKOFF: Backoff = Backoff::new(Duration::from_millis(250), MAX_RESTART_DELAY);

/// A worker process, connected and bound, ready to run.
pub struct Worker {
    settings: Settings,
    redis: ConnectionManager,
    jobs: Arc<JobContext>,
    listener: TcpListener,
    metrics: PrometheusHandle,
    ready: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
}

impl Worker {
    /// Connects to Redis (PostgreSQL lazily), prepares the model client and binds
    /// `METRICS_ADDR` (port 0 picks one). Jobs start flowing in [`Worker::run_until`].
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_hooks(settings, Hooks::default()).await
    }

    /// [`Worker::build`] with fault hooks (the fault suite's worker binary).
    pub async fn build_with_hooks(settings: Settings, hooks: Hooks) -> anyhow::Result<Self> {
        // First: a model client that could never be answered is a reason not to start.
        let policy = RetryPolicy {
            max_attempts: settings.llm_max_attempts,
            attempt_timeout: Duration::from_secs(settings.llm_attempt_timeout_secs),
            max_total: Duration::from_secs(settings.llm_max_retry_secs),
            backoff_base: Duration::from_millis(settings.llm_backoff_base_ms),
            backoff_max: Duration::from_millis(settings.llm_backoff_max_ms),
        };
        let llm = LlmClient::new(&settings.openai, policy).context("building the model client")?;
        let metrics = metrics::install();
        metrics::describe(&settings.openai.allowed_models());
        let pool = db::pool(&settings.database).context("invalid DATABASE_URL")?;
        let redis = redis_conn::connect(settings.redis.redis_url.expose_secret())
            .await
            .context("connecting to Redis")?;
        let ns = settings
            .redis
            .namespace()
            .for_installation(wait_for_installation(&pool, &settings.database).await);
        let limiter = RateLimiter::new(
            redis.clone(),
            ns.clone(),
            Limits {
                requests: settings.rate_limit_rpm,
                tokens: settings.rate_limit_tpm,
                window: Duration::from_millis(settings.rate_limit_window_ms),
                margin: Duration::from_millis(settings.rate_limit_margin_ms),
            },
        );
        // Loading the BPE ranks takes a moment: do it now rather than in the first job.
        let tokens = tokio::task::spawn_blocking(TokenCounter::cl100k)
            .await
            .context("loading the tokenizer")?;
        let token_budget =
            usize::try_from(settings.openai.context_token_budget).unwrap_or(usize::MAX);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let jobs = Arc::new(JobContext {
            db: pool.clone(),
            redis: redis.clone(),
            ns,
            llm,
            limiter,
            tokens,
            token_budget,
            system_token_cap: token_budget
                .saturating_mul(usize::from(settings.openai.system_token_share_percent))
                / 100,
            max_completion_tokens: settings.openai.max_completion_tokens,
            allowed_models: settings.openai.allowed_models(),
            completion_allowance: settings.rate_limit_completion_tokens,
            default_model: settings.openai.openai_model.clone(),
            delta_flush_every: Duration::from_millis(settings.delta_flush_ms),
            delta_flush_chars: usize::try_from(settings.delta_flush_chars).unwrap_or(usize::MAX),
            shutdown: shutdown_rx,
            stopping: Stopping::new(),
            replies: reply_batch::ReplySaver::start(pool.clone()),
            save_retry_for: Duration::from_secs(settings.worker_save_retry_secs),
            hooks,
        });
        let listener = TcpListener::bind(&settings.metrics_addr)
            .await
            .with_context(|| format!("binding {}", settings.metrics_addr))?;
        Ok(Worker {
            settings,
            redis,
            jobs,
            listener,
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            shutdown,
        })
    }

    /// Port of the `/healthz` and `/metrics` server.
    pub fn metrics_port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Takes jobs until `shutdown` completes, then stops taking new ones and waits up to
    /// `WORKER_SHUTDOWN_GRACE_SECS` for the running ones.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.listener.local_addr()?;
        let router = http::router(http::HttpState {
            ready: self.ready.clone(),
            metrics: self.metrics.clone(),
        });
        let mut http_stop = self.shutdown.subscribe();
        let server = tokio::spawn(
            axum::serve(self.listener, router)
                .with_graceful_shutdown(async move {
                    let _ = http_stop.wait_for(|stopping| *stopping).await;
                })
                .into_future(),
        );
        tracing::info!(
            %addr,
            queue = %jobs::queue_config(&self.settings.redis.namespace()).queue.as_ref(),
            concurrency = self.settings.worker_concurrency,
            "aichat-worker starting"
        );

        let settings = self.settings;
        let config = queue_config(&settings);
        let stopping = self.jobs.stopping.clone();
        let (settled_tx, settled_rx) = watch::channel(false);
        // From the start until the in-flight set is settled, this process keeps its worker
        // registration fresh on its own: apalis heart-beats only while its fetch buffer is
        // empty (so not while a full worker holds a fetched batch) and stops at the signal.
        let keep_alive = {
            let stopping = stopping.clone();
            let redis = self.redis.clone();
            let workers_set = config.workers_set();
            let interval = settings.heartbeat_interval();
            tokio::spawn(async move {
                stopping
                    .keep_alive(redis, workers_set, interval, settled_rx)
                    .await;
            })
        };
        let sweeper = (settings.worker_sweep_interval_secs > 0).then(|| {
            let sweeper = Sweeper {
                db: self.jobs.db.clone(),
                redis: self.redis.clone(),
                queue: jobs::JobQueue::new(self.redis.clone(), &self.jobs.ns),
                interval: Duration::from_secs(settings.worker_sweep_interval_secs),
                grace: Duration::from_secs(settings.worker_sweep_grace_secs),
            };
            tokio::spawn(sweeper.run(self.shutdown.subscribe()))
        });
        let grace = settings.shutdown_grace();
        let terminator = {
            let stopping = stopping.clone();
            async move {
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
        };
        let monitor = monitor(&settings, self.redis.clone(), self.jobs, self.ready.clone())
            .with_terminator(terminator);
        let stop = self.shutdown;
        let ready = self.ready;
        let begin = stopping.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: no new jobs, waiting for running ones");
            ready.store(false, Ordering::SeqCst);
            begin.begin();
            let _ = stop.send(true);
            Ok(())
        };
        let result = monitor.run_with_signal(signal).await;
        let mut redis = self.redis;
        match stopping.settle(&mut redis, &config).await {
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
        let _ = settled_tx.send(true);
        let _ = keep_alive.await;
        if let Some(sweeper) = sweeper {
            let _ = sweeper.await;
        }
        if let Err(err) = server.await.context("metrics server task")? {
            tracing::warn!(error = %err, "metrics server ended with an error");
        }
        result.context("running the worker")?;
        tracing::info!("aichat-worker stopped");
        Ok(())
    }
}

/// The database's installation id (`db::installation_id`), asked for until it is there: a
/// worker may start before PostgreSQL is up or before the API has created the schema, and
/// its Redis keys must name the database whose messages it answers.
async fn wait_for_installation(pool: &db::Pool, database: &DatabaseSettings) -> String {
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

/// Most tasks one fetch takes from the queue.
const FETCH_BATCH: usize = 8;

/// The queue configuration of this worker: the shared one plus heartbeats and batch size.
fn queue_config(settings: &Settings) -> apalis_redis::Config {
    // Up to FETCH_BATCH tasks per fetch: filling 500 free slots one Lua round trip at a time
    // took ~0.3 s (BENCHMARKS.md, concurrency). apalis heart-beats only while nothing fetched
    // waits in its buffer, so `Stopping::keep_alive` refreshes the registration on its own,
    // and a full worker holding a batch is not taken for dead.
    jobs::queue_config(&settings.redis.namespace())
        .batch_size(
            FETCH_BATCH
                .min(usize::try_from(settings.worker_concurrency).unwrap_or(1))
                .max(1),
        )
        .heartbeat_interval(settings.heartbeat_interval())
        .missed_heartbeats(usize::try_from(settings.worker_missed_heartbeats).unwrap_or(2))
}

/// The apalis monitor running one queue consumer, restarted (with a growing pause) whenever
/// its poll loop dies, e.g. because Redis went away.
fn monitor(
    settings: &Settings,
    redis: ConnectionManager,
    jobs: Arc<JobContext>,
    ready: Arc<AtomicBool>,
) -> Monitor {
    let config = queue_config(settings);
    let poll = settings.poll_interval();
    let concurrency = usize::try_from(settings.worker_concurrency).unwrap_or(64);
    let prefix = settings
        .worker_name_prefix
        .clone()
        .unwrap_or_else(host_name);
    // Failures since the last successful heartbeat: what the pause before a restart grows
    // with (apalis' own restart count never goes down).
    let failures = Arc::new(AtomicU32::new(0));
    let (failed, recovered) = (failures.clone(), failures.clone());
    let on_restart = ready.clone();
    let stopping = jobs.stopping.clone();
    Monitor::new()
        .register(move |restarts| {
            let pause = restart_delay(failures.load(Ordering::SeqCst));
            let probe = redis.clone();
            let backend = RedisStorage::<serde_json::Value>::new(redis.clone())
                .with_config(config.clone())
                .before_start(move |_| {
                    let probe = probe.clone();
                    async move {
                        if !pause.is_zero() {
                            tracing::info!(
                                restarts,
                                pause_ms = pause.as_millis() as u64,
                                "restarting the queue consumer"
                            );
                            restart_pause(probe, pause).await;
                        }
                        Ok(())
                    }
                })
                .poll_with_interval(poll);
            let name = worker_name(&prefix, restarts);
            stopping.register_name(&name);
            WorkerBuilder::new(name)
                .backend(backend)
                .data(jobs.clone())
                .concurrency(concurrency)
                .parallelize(tokio::spawn)
                .catch_panic()
                .build(job::answer_message)
        })
        .should_restart(move |worker, error| {
            tracing::error!(worker = worker.name(), %error, "queue consumer failed; restarting");
            on_restart.store(false, Ordering::SeqCst);
            failed.fetch_add(1, Ordering::SeqCst);
            metrics::worker_restart();
            true
        })
        .on_event(move |worker, event| match event {
            // Sent once the worker is registered in Redis, then on every heartbeat.
            Event::HeartBeat => {
                recovered.store(0, Ordering::SeqCst);
                if !ready.swap(true, Ordering::SeqCst) {
                    tracing::info!(worker = worker.name(), "taking jobs");
                }
            }
            Event::Error(error) => {
                tracing::debug!(worker = worker.name(), %error, "job ended with an error");
            }
            _ => {}
        })
}

/// Unique per process and per restart: apalis refuses a name seen alive within the orphan
/// window, even after a clean stop.
fn worker_name(prefix: &str, restarts: usize) -> String {
    let suffix: u32 = rand::rng().random();
    format!("{prefix}-{}-{restarts}-{suffix:08x}", std::process::id())
}

/// Pause before restarting after `failures` failures in a row: none for a first start, then
/// 250 ms doubling up to 30 s, half of it random (workers that lost Redis together do not
/// return together).
fn restart_delay(failures: u32) -> Duration {
    RESTART_BACKOFF.delay_at_least_half(failures)
}

/// Sleeps `pause` before a restart, but ends early once Redis, unreachable at some point of
/// the pause, answers again: after an outage the consumer comes back within a quarter second
/// of Redis instead of sitting out a backoff that grew while Redis was away. When Redis stays
/// reachable (the consumer failed for another reason) the whole pause applies.
async fn restart_pause(mut redis: ConnectionManager, pause: Duration) {
    let deadline = tokio::time::Instant::now() + pause;
    let mut was_down = false;
    loop {
        let ping = tokio::time::timeout(
            Duration::from_secs(1),
            redis::cmd("PING").query_async::<String>(&mut redis),
        )
        .await;
        match ping {
            Ok(Ok(_)) if was_down => {
                tracing::info!("Redis answers again; restarting the queue consumer now");
                return;
            }
            Ok(Ok(_)) => {}
            _ => was_down = true,
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return;
        }
        tokio::time::sleep((deadline - now).min(Duration::from_millis(250))).await;
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "aichat-worker".to_owned())
}

/// The `aichat-worker` process: settings from flags and the environment (and `.env`), logs,
/// then jobs until Ctrl-C or SIGTERM. Returns once the graceful stop is over.
pub async fn run_from_env() -> anyhow::Result<()> {
    run_from_env_with_hooks(Hooks::default()).await
}

/// [`run_from_env`] with fault hooks (the fault suite's worker binary).
pub async fn run_from_env_with_hooks(hooks: Hooks) -> anyhow::Result<()> {
    use clap::Parser;
    aichat_shared::config::load_dotenv();
    let settings = Settings::parse();
    aichat_shared::telemetry::init(&settings.log);
    tracing::debug!(?settings, "settings");
    let worker = Worker::build_with_hooks(settings, hooks).await?;
    worker.run_until(shutdown_signal()).await
}

pub use aichat_shared::signals::shutdown_signal;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_differ_per_run() {
        assert_ne!(worker_name("h", 0), worker_name("h", 0));
        assert!(worker_name("host", 3).starts_with(&format!("host-{}-3-", std::process::id())));
    }

    #[test]
    fn restart_pauses_grow_and_stay_capped() {
        assert_eq!(restart_delay(0), Duration::ZERO);
        assert!(restart_delay(1) <= Duration::from_millis(250));
        assert!(restart_delay(1) >= Duration::from_millis(125));
        assert!(restart_delay(50) <= MAX_RESTART_DELAY);
        assert!(restart_delay(50) >= MAX_RESTART_DELAY / 2);
    }
}
