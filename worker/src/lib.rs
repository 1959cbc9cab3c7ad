//! aichat completion worker: takes completion jobs from the Redis queue (apalis), answers them
//! with the model, and serves `/healthz` and `/metrics`.
//!
//! [`Worker::build`] connects and prepares everything a job needs; [`Worker::run_until`] starts
//! the queue consumer (`monitor.rs`) and the tasks beside it (`tasks.rs`), and stops them in
//! order.
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::ConnectionManager;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use aichat_shared::jobs::JobQueue;
use aichat_shared::models::Keys;
use aichat_shared::{db, redis_conn};

mod abort_on_drop;
mod claim_batch;
pub mod context;
mod deltas;
mod history_cache;
mod http;
mod job;
mod jobs_pushed;
mod llm;
mod metrics;
mod monitor;
mod outcome;
pub mod rate_limit;
mod reply_batch;
mod request;
mod retry;
mod save;
mod settings;
mod state;
mod stop;
mod stop_requests;
mod subscription;
mod sweeper;
mod tasks;
mod user_slots;

pub use aichat_shared::signals::shutdown_signal;
pub use settings::Settings;
pub use state::Hooks;

use crate::abort_on_drop::AbortOnDrop;
use crate::context::TokenCounter;
use crate::jobs_pushed::JobsPushed;
use crate::llm::LlmClient;
use crate::rate_limit::{Limits, RateLimiter};
use crate::retry::RetryPolicy;
use crate::state::JobContext;
use crate::stop::Stopping;
use crate::stop_requests::StopRequests;
use crate::user_slots::UserSlots;

/// A worker process, connected and bound, ready to run.
pub struct Worker {
    settings: Settings,
    redis: ConnectionManager,
    jobs: Arc<JobContext>,
    listener: TcpListener,
    metrics: PrometheusHandle,
    ready: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    /// Stop requests and pushed jobs reach `jobs` through it until the run ends.
    subscription: AbortOnDrop,
    /// Stop requests recorded in the database reach `jobs` through it until the run ends.
    stop_checks: AbortOnDrop,
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
        let models = settings.openai.registry(Keys::Read)?;
        let llm = LlmClient::new(&models, policy).context("building the model clients")?;
        let metrics = metrics::install();
        let names: Vec<String> = models.models().iter().map(|m| m.name.clone()).collect();
        metrics::describe(&names);
        let pool = db::pool(
            &settings.database,
            db::Planning::KeyedGeneric,
            settings.database.database_max_connections,
        )
        .context("invalid DATABASE_URL")?;
        let redis = redis_conn::connect(settings.redis.redis_url.expose_secret())
            .await
            .context("connecting to Redis")?;
        let ns = settings
            .redis
            .namespace()
            .for_installation(tasks::wait_for_installation(&pool, &settings.database).await);
        let limits = Limits {
            requests: settings.rate_limit_rpm,
            tokens: settings.rate_limit_tpm,
            window: Duration::from_millis(settings.rate_limit_window_ms),
            margin: Duration::from_millis(settings.rate_limit_margin_ms),
        };
        // Each registry model has its own window; `rpm`/`tpm` of the file replace the defaults.
        let limiter = models.models().iter().fold(
            RateLimiter::new(redis.clone(), ns.clone(), limits),
            |limiter, model| match (model.rpm, model.tpm) {
                (None, None) => limiter,
                (rpm, tpm) => limiter.with_model_limits(
                    &model.name,
                    Limits {
                        requests: rpm.unwrap_or(limits.requests),
                        tokens: tpm.unwrap_or(limits.tokens),
                        ..limits
                    },
                ),
            },
        );
        // Loading the BPE ranks takes a moment: do it now rather than in the first job.
        let tokens = tokio::task::spawn_blocking(TokenCounter::cl100k)
            .await
            .context("loading the tokenizer")?;
        let token_budget =
            usize::try_from(settings.openai.context_token_budget).unwrap_or(usize::MAX);
        let stop_requests = StopRequests::new();
        let jobs_pushed = JobsPushed::default();
        let stop_checks = stop_requests::keep_checking(&stop_requests, pool.clone());
        let subscription = subscription::subscribe(
            settings.redis.redis_url.expose_secret(),
            &ns,
            &stop_requests,
            jobs_pushed.clone(),
        )
        .await
        .context("subscribing to stop requests and pushed jobs")?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let user_slots = UserSlots::new(
            redis.clone(),
            ns.clone(),
            settings.worker_per_user_concurrency,
            Duration::from_secs(settings.worker_user_slot_lease_secs),
        );
        let jobs = Arc::new(JobContext {
            db: pool.clone(),
            redis: redis.clone(),
            ns,
            llm,
            models,
            limiter,
            user_slots,
            running: Arc::new(Semaphore::new(
                usize::try_from(settings.worker_concurrency).unwrap_or(64),
            )),
            tokens,
            token_budget,
            history_cache_secs: settings.context_cache_secs,
            system_share_percent: settings.openai.system_token_share_percent,
            completion_allowance: settings.rate_limit_completion_tokens,
            delta_flush_every: Duration::from_millis(settings.delta_flush_ms),
            delta_flush_chars: usize::try_from(settings.delta_flush_chars).unwrap_or(usize::MAX),
            shutdown: shutdown_rx,
            stopping: Stopping::new(),
            stop_requests,
            jobs_pushed,
            claims: claim_batch::JobClaimer::start(
                pool.clone(),
                settings.worker_batch_writers.into(),
            ),
            replies: reply_batch::ReplySaver::start(
                pool.clone(),
                settings.worker_batch_writers.into(),
            ),
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
            subscription,
            stop_checks,
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
        let Worker {
            settings,
            redis,
            jobs,
            listener,
            metrics,
            ready,
            shutdown: stop,
            subscription,
            stop_checks,
        } = self;
        let addr = listener.local_addr()?;
        let http = http::HttpState {
            ready: ready.clone(),
            metrics,
            queue: JobQueue::new(redis.clone(), &jobs.ns),
        };
        let server = tasks::serve_http(listener, http, &stop);
        let config = monitor::queue_config(&settings);
        tracing::info!(
            %addr,
            queue = %config.queue.as_ref(),
            concurrency = settings.worker_concurrency,
            "aichat-worker starting"
        );
        let stopping = jobs.stopping.clone();
        let registration = tasks::Registration::keep_alive(
            stopping.clone(),
            redis.clone(),
            &config,
            settings.heartbeat_interval(),
        );
        let sweeper = tasks::start_sweeper(&settings, &jobs, &redis, &stop);
        let consumer = monitor::monitor(&settings, redis.clone(), jobs, ready.clone())
            .with_terminator(tasks::drain(stopping.clone(), settings.shutdown_grace()));
        let result = consumer
            .run_with_signal(tasks::begin_stop(shutdown, ready, stopping, stop))
            .await;
        // No job runs any more: nothing is left to stop or to wake.
        drop(subscription);
        drop(stop_checks);
        registration.settle(redis, &config).await;
        if let Some(sweeper) = sweeper {
            let _ = sweeper.await;
        }
        tasks::join_http(server).await?;
        result.context("running the worker")?;
        tracing::info!("aichat-worker stopped");
        Ok(())
    }
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
