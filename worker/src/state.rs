//! What every job of the process shares: connections, the model client, the rate limiter, the
//! token counter, the settings a run reads, and the stop.
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::sync::{Semaphore, watch};

use aichat_shared::keys::Namespace;
use aichat_shared::models::Registry;

use crate::claim_batch::JobClaimer;
use crate::context::TokenCounter;
use crate::jobs_pushed::JobsPushed;
use crate::llm::LlmClient;
use crate::rate_limit::RateLimiter;
use crate::reply_batch::ReplySaver;
use crate::stop::Stopping;
use crate::stop_requests::StopRequests;
use crate::user_slots::UserSlots;

/// Everything a job needs, shared by all jobs of the process.
pub struct JobContext {
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub ns: Namespace,
    pub llm: LlmClient,
    /// The models chats may use, with their windows, caps, prices and fallbacks.
    pub models: Registry,
    pub limiter: RateLimiter,
    /// Turns of each user across the workers (`WORKER_PER_USER_CONCURRENCY`).
    pub user_slots: UserSlots,
    /// `WORKER_CONCURRENCY` permits: jobs past their user's turn that may run at once (the
    /// queue consumer takes more, to hold jobs waiting for their turn).
    pub running: Arc<Semaphore>,
    pub tokens: TokenCounter,
    /// `CONTEXT_TOKEN_BUDGET`: no model's prompt is larger.
    pub token_budget: usize,
    /// Seconds a chat's history stays in the context cache (`CONTEXT_CACHE_SECS`); 0: no cache.
    pub history_cache_secs: u64,
    /// Most of a model's prompt budget the system message takes, in percent
    /// (`SYSTEM_TOKEN_SHARE_PERCENT`).
    pub system_share_percent: u8,
    /// Completion tokens reserved under the token rate limit before the real count is known.
    pub completion_allowance: u64,
    pub delta_flush_every: Duration,
    pub delta_flush_chars: usize,
    /// Turns true when the worker starts shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// Running jobs, and what finished after the stop began (see `stop.rs`).
    pub stopping: Arc<Stopping>,
    /// Users' stop requests, routed to the job answering the message (`stop_requests.rs`).
    pub stop_requests: Arc<StopRequests>,
    /// Signalled when jobs are pushed: wakes the queue consumer (`jobs_pushed.rs`).
    pub jobs_pushed: JobsPushed,
    /// Takes jobs' messages, several per statement.
    pub claims: JobClaimer,
    /// Writes replies, several per statement.
    pub replies: ReplySaver,
    /// How long a finished reply (or failure) keeps trying to reach the database before the
    /// job is handed back to the queue.
    pub save_retry_for: Duration,
    pub hooks: Hooks,
}

/// Points where the fault suite's worker binary makes the process fail on purpose; none is
/// set in `aichat-worker`.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Runs right after this run's reply is committed, before anything is announced.
    pub after_save: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Awaited right after this run recorded its message's failure and announced it, before
    /// the job ends: holds the failed job alive (not yet acknowledged) for as long as it takes.
    pub after_failure:
        Option<Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>>,
}
