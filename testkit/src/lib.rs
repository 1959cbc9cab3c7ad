//! The test kit: the one place that creates a test database, a Redis namespace or a private
//! Redis server (and removes them again), starts the API, workers and the fake model (in
//! process or as processes), and holds the HTTP and WebSocket clients and the "answered exactly
//! once" checks. The API, worker and fault suites stand on it (`api/tests/api/common`,
//! `worker/tests/worker/common` add only what their own tests share); the benchmark tool reuses
//! its database and Redis parts.
//!
//! Everything talks to loopback only, and every wait is bounded by a deadline.
pub mod audit;
pub mod client;
pub mod postgres;
pub mod process;
pub mod queue;
pub mod redis_server;
pub mod slow_link;
pub mod stack;
pub mod store;
pub mod ws;

use std::future::Future;
use std::time::{Duration, Instant};

pub use audit::{Audit, AuditRow, EventCounter, EventCounts};
pub use client::{Answer, Client, User};
pub use postgres::TestDb;
pub use process::ApiProcess;
pub use queue::QueueSnapshot;
pub use redis_server::{PrivateRedis, delete_namespace};
pub use slow_link::SlowLink;
pub use stack::{
    Api, Env, InProcessWorker, WorkerProcess, wait_worker_ready, worker_metric, worker_metrics_text,
};
pub use store::{DEFAULT_CONTEXT, chat_owner, queue_completion, store_user_message};
pub use ws::{
    Ws, WsCollector, WsNext, closed_with, event_of, next_event, send_ws, ws_connect, ws_next,
    ws_open, ws_send, ws_until,
};

/// The password of every user the tests register.
pub const PASSWORD: &str = "correct horse";
/// The model the tests' API and workers are configured with.
pub const MODEL: &str = "gpt-test";
/// `ALLOWED_MODELS` of every test API and worker unless a test sets it (`MODEL` is the default).
pub const ALLOWED_MODELS: &str = "gpt-4o-mini,m-2";

/// Tests that load the machine (processes, outages, hundreds of messages) take this lock, so
/// two of them never distort each other's timings; light tests run alongside freely.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Logs of in-process components when `TEST_LOG` is set (e.g. `TEST_LOG=aichat_worker=debug`).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let settings = aichat_shared::config::LogSettings {
            log_format: aichat_shared::config::LogFormat::Text,
            log_filter: filter,
        };
        aichat_shared::telemetry::init(&settings);
    }
}

/// A line the RELIABILITY.md figures are copied from: `FAULT <name> key=value ...`.
pub fn report(fault: &str, figures: &[(&str, String)]) {
    let line: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
    eprintln!("FAULT {fault} {}", line.join(" "));
}

/// The fake model's defaults with every answer delayed by `latency_ms`.
pub fn fake_with_latency(latency_ms: u64) -> aichat_fake_llm::FakeConfig {
    aichat_fake_llm::FakeConfig {
        latency_ms,
        ..aichat_fake_llm::FakeConfig::default()
    }
}

/// The fake model's defaults, answering every call with `outcome` once its script is empty.
pub fn fake_always(outcome: aichat_fake_llm::Outcome) -> aichat_fake_llm::FakeConfig {
    aichat_fake_llm::FakeConfig {
        always: Some(outcome),
        ..aichat_fake_llm::FakeConfig::default()
    }
}

/// Worker flags: `extra`, and a sweeper looking every `interval` seconds for messages queued
/// more than `grace` seconds ago whose job is gone.
pub fn with_sweeper<'a>(interval: &'a str, grace: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--worker-sweep-interval-secs",
        interval,
        "--worker-sweep-grace-secs",
        grace,
    ];
    flags.extend_from_slice(extra);
    flags
}

/// A figure of a report line: `x` with one decimal.
pub fn one_decimal(x: f64) -> String {
    format!("{x:.1}")
}

/// A duration as a report line gives it: seconds with one decimal.
pub fn secs(d: Duration) -> String {
    one_decimal(d.as_secs_f64())
}

/// The value at quantile `q` (0–1) of sorted `values`, 0 when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let i = ((values.len() - 1) as f64 * q).round() as usize;
    values[i.min(values.len() - 1)]
}

/// Now, as Unix epoch seconds.
pub fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The PostgreSQL server tests use (`TEST_PG_URL`, default the local one), without a database.
pub fn pg_base() -> String {
    std::env::var("TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The Redis server tests share (`TEST_REDIS_URL`, default the local one); each test keeps to
/// a namespace of its own.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A namespace no other test uses: `{prefix}_{uuid}`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Tokens (cl100k, with the worker's framing) of a prompt as the fake model recorded it: its
/// `messages` array.
pub fn prompt_tokens(
    counter: &aichat_worker::context::TokenCounter,
    messages: &[serde_json::Value],
) -> usize {
    use aichat_worker::context::{PromptMessage, Role};
    let prompt: Vec<PromptMessage> = messages
        .iter()
        .map(|m| {
            let role = match m["role"].as_str() {
                Some("system") => Role::System,
                Some("assistant") => Role::Assistant,
                _ => Role::User,
            };
            PromptMessage::new(role, m["content"].as_str().unwrap_or_default())
        })
        .collect();
    counter.prompt(&prompt)
}
