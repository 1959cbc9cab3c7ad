//! `aichat-worker` settings: flags with environment fallback (`aichat-worker --help` lists them).
use std::time::Duration;

use clap::Parser;

use aichat_shared::config::{DatabaseSettings, LogSettings, OpenAiSettings, RedisSettings};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "aichat-worker",
    version,
    about = "aichat completion worker: answers queued AI chat messages"
)]
pub struct Settings {
    #[command(flatten)]
    pub database: DatabaseSettings,
    #[command(flatten)]
    pub redis: RedisSettings,
    #[command(flatten)]
    pub openai: OpenAiSettings,
    #[command(flatten)]
    pub log: LogSettings,

    /// Completion jobs this process runs at once.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub worker_concurrency: u32,
    /// Jobs of one user running at once across every worker, so one user's backlog cannot
    /// hold every worker (0: no limit). Jobs past it wait, in the order their messages were
    /// sent, without holding a `WORKER_CONCURRENCY` slot.
    #[arg(long, env = "WORKER_PER_USER_CONCURRENCY", default_value_t = 0)]
    pub worker_per_user_concurrency: u32,
    /// Jobs this process holds beyond `WORKER_CONCURRENCY` while their users are at
    /// `WORKER_PER_USER_CONCURRENCY` (only with that limit set): other users' jobs are taken
    /// from the queue past a backlog of this many.
    #[arg(long, env = "WORKER_WAITING_JOBS", default_value_t = 256)]
    pub worker_waiting_jobs: u32,
    /// Seconds a running job's turn of its user lasts unless renewed (every third of it): how
    /// long a turn of a worker that died stays taken.
    #[arg(long, env = "WORKER_USER_SLOT_LEASE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..))]
    pub worker_user_slot_lease_secs: u64,
    /// Milliseconds between two looks at the queue when it is empty, besides the look a push
    /// wakes it for (`jobs_pushed.rs`): what a missed wake-up costs at most.
    #[arg(long, env = "WORKER_POLL_INTERVAL_MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub worker_poll_interval_ms: u64,
    /// Seconds between two heartbeats of this worker in Redis.
    #[arg(long, env = "WORKER_HEARTBEAT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub worker_heartbeat_secs: u64,
    /// Heartbeats a worker may miss before another one takes over its jobs
    /// (orphan window = heartbeat × this).
    #[arg(long, env = "WORKER_MISSED_HEARTBEATS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub worker_missed_heartbeats: u64,
    /// Seconds a stopping worker waits for its running jobs before it exits anyway (their jobs
    /// then go to another worker after the orphan window).
    #[arg(long, env = "WORKER_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub worker_shutdown_grace_secs: u64,
    /// Seconds between two sweeps for user messages left `queued` with no live job (Redis lost
    /// it, or it died during a long database outage); they are queued again. 0: no sweeping.
    #[arg(long, env = "WORKER_SWEEP_INTERVAL_SECS", default_value_t = 30)]
    pub worker_sweep_interval_secs: u64,
    /// Seconds a message must have been waiting before a sweep looks at it.
    #[arg(long, env = "WORKER_SWEEP_GRACE_SECS", default_value_t = 60)]
    pub worker_sweep_grace_secs: u64,
    /// Waiting messages one sweep looks at, at most: after Redis lost a backlog, the sweeps
    /// queue it again at up to this many per interval (each costs a few Redis calls and one
    /// row update).
    #[arg(long, env = "WORKER_SWEEP_MAX_MESSAGES", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub worker_sweep_max_messages: u64,
    /// Seconds a finished reply (or failure) keeps trying to reach an unreachable database
    /// before its job is handed back to the queue (which would call the model again).
    #[arg(long, env = "WORKER_SAVE_RETRY_SECS", default_value_t = 30)]
    pub worker_save_retry_secs: u64,
    /// Prefix of this process's worker name in Redis (default: the host name). The pid, the
    /// restart count and a random suffix are appended, so every run is unique.
    #[arg(long, env = "WORKER_NAME_PREFIX")]
    pub worker_name_prefix: Option<String>,
    /// Claim batches, and reply batches, each written at once by this process. Jobs that start
    /// (or finish) while one is being written go in the next, so one writer makes the batches
    /// as large as the load and a reply cost the database the least (BENCHMARKS.md, "Cost per
    /// answered message"); a second one lets the other batches go on while one waits on a lock
    /// another transaction holds (a chat being deleted).
    #[arg(long, env = "WORKER_BATCH_WRITERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_batch_writers: u16,
    /// Seconds a chat's history stays in the context cache in Redis after its last job, so the
    /// chat's next job reads only the turns after it from PostgreSQL. Each entry is at most a
    /// `CONTEXT_TOKEN_BUDGET` of text; 0: no cache (every job reads its whole history).
    #[arg(long, env = "CONTEXT_CACHE_SECS", default_value_t = 600)]
    pub context_cache_secs: u64,
    /// Address of the `/healthz` and `/metrics` HTTP server (port 0 picks a free one).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9100")]
    pub metrics_addr: String,

    /// Model calls per message, first one included.
    #[arg(long, env = "LLM_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub llm_max_attempts: u32,
    /// Seconds one model call may stay silent (no response headers, or no chunk while
    /// streaming) before it is abandoned and retried.
    #[arg(long, env = "LLM_ATTEMPT_TIMEOUT_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub llm_attempt_timeout_secs: u64,
    /// Seconds after the first attempt past which no new attempt (or rate-limit wait) starts.
    #[arg(long, env = "LLM_MAX_RETRY_SECS", default_value_t = 120)]
    pub llm_max_retry_secs: u64,
    /// Base of the exponential backoff between attempts, in milliseconds (full jitter).
    #[arg(long, env = "LLM_BACKOFF_BASE_MS", default_value_t = 500)]
    pub llm_backoff_base_ms: u64,
    /// Longest single backoff between attempts, in milliseconds.
    #[arg(long, env = "LLM_BACKOFF_MAX_MS", default_value_t = 20_000)]
    pub llm_backoff_max_ms: u64,

    /// Requests per model per rate-limit window, shared by every worker (0: no limit).
    #[arg(long, env = "RATE_LIMIT_RPM", default_value_t = 3500)]
    pub rate_limit_rpm: u64,
    /// Tokens (prompt + expected completion) per model per rate-limit window, shared by every
    /// worker (0: no limit).
    #[arg(long, env = "RATE_LIMIT_TPM", default_value_t = 90_000)]
    pub rate_limit_tpm: u64,
    /// Length of the sliding rate-limit window in milliseconds.
    #[arg(long, env = "RATE_LIMIT_WINDOW_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rate_limit_window_ms: u64,
    /// Extra milliseconds each admitted request holds its slot, so the delay between admission
    /// and arrival at the provider cannot squeeze one request too many into the provider's
    /// window. The default is well above that delay on a busy host opening new connections.
    #[arg(long, env = "RATE_LIMIT_MARGIN_MS", default_value_t = 250)]
    pub rate_limit_margin_ms: u64,
    /// Completion tokens reserved per request before the real count is known.
    #[arg(long, env = "RATE_LIMIT_COMPLETION_TOKENS", default_value_t = 500)]
    pub rate_limit_completion_tokens: u64,

    /// Milliseconds between two `assistant_delta` events of one reply.
    #[arg(long, env = "DELTA_FLUSH_MS", default_value_t = 50)]
    pub delta_flush_ms: u64,
    /// Characters that make an `assistant_delta` go out before `DELTA_FLUSH_MS` has passed.
    #[arg(long, env = "DELTA_FLUSH_CHARS", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub delta_flush_chars: u64,
}

impl Settings {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.worker_poll_interval_ms)
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.worker_heartbeat_secs)
    }

    /// How long after its last heartbeat a worker's jobs are handed to another worker.
    pub fn orphan_window(&self) -> Duration {
        self.heartbeat_interval()
            .saturating_mul(u32::try_from(self.worker_missed_heartbeats).unwrap_or(u32::MAX))
    }

    /// Jobs the queue consumer runs at once: the model slots, and room for jobs waiting for
    /// their user's turn.
    pub fn jobs_taken_at_once(&self) -> usize {
        let waiting = if self.worker_per_user_concurrency > 0 {
            self.worker_waiting_jobs
        } else {
            0
        };
        usize::try_from(self.worker_concurrency.saturating_add(waiting)).unwrap_or(64)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.worker_shutdown_grace_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::Settings;
    use clap::{CommandFactory, Parser};

    #[test]
    fn every_setting_has_a_default() {
        Settings::command().debug_assert();
        let settings = Settings::try_parse_from(["aichat-worker"]).expect("defaults parse");
        assert_eq!(settings.worker_concurrency, 64);
        assert!(settings.worker_poll_interval_ms <= 100);
        assert!(settings.orphan_window().as_secs() <= 15);
        assert_eq!(settings.rate_limit_window_ms, 60_000);
    }
}
