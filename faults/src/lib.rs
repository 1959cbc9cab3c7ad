//! Fault-injection harness: a fresh PostgreSQL database and Redis namespace per test, the real
//! API (in process), workers in process or as real processes (to SIGKILL / SIGTERM them), the
//! fake model over real HTTP, a private `redis-server` to stop and restart, and the two checks
//! every fault test ends with: [`Env::audit`] (every user message answered exactly once, from
//! the database) and [`EventCounter`] (every reply announced at most once, from pub/sub).
//!
//! Everything talks to loopback only. Every wait is bounded by a deadline.
use std::collections::HashMap;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aichat_fake_llm::{FakeConfig, FakeLlm};
use clap::Parser;
use futures::StreamExt;
use redis::AsyncCommands;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const PASSWORD: &str = "correct horse";
pub const MODEL: &str = "gpt-test";

/// Fault tests that load the machine (processes, outages, hundreds of messages) take this lock,
/// so two of them never distort each other's timings; light tests run alongside freely.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

use aichat_testkit::delete_namespace;
pub use aichat_testkit::{PrivateRedis, TestDb, eventually, free_port, pg_base, redis_url};

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

// ---------------------------------------------------------------------------------------------
// The API, in process

pub struct Api {
    pub base: String,
    pub state: aichat_api::state::AppState,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("{}{path}", self.base.replacen("http://", "ws://", 1))
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Workers

/// A worker running in this process (for faults that need no signal).
pub struct InProcessWorker {
    pub port: u16,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl InProcessWorker {
    /// Asks for a graceful stop and waits for it (bounded).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(40), self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => panic!("worker ended with an error: {err:#}"),
            Ok(Err(err)) => panic!("worker task: {err}"),
            Err(_) => panic!("worker did not stop in time"),
        }
    }
}

/// A worker as a real process (the `faults-worker` binary: the `aichat-worker` entry point).
pub struct WorkerProcess {
    child: tokio::process::Child,
    pub pid: i32,
    pub port: u16,
}

impl WorkerProcess {
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child this struct owns and has not reaped.
        let rc = unsafe { libc::kill(self.pid, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid);
    }

    pub fn sigkill(&self) {
        self.signal(libc::SIGKILL);
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits for the process to end; `None` if it is still running after `limit`.
    pub async fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .map(|status| status.expect("wait for the worker process"))
    }

    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// The sum of a counter (all label sets) on a worker's `/metrics`; 0 when absent. In-process
/// workers share one recorder per test binary: compare before and after.
pub async fn worker_metric(port: u16, name: &str) -> f64 {
    let Ok(resp) = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
    else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until a worker's `/healthz` says it is taking jobs.
pub async fn wait_worker_ready(port: u16, limit: Duration) {
    let client = reqwest::Client::new();
    eventually(limit, "worker ready", || {
        let client = client.clone();
        async move {
            let status = client
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()?
                .status();
            status.is_success().then_some(())
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The environment of one test

pub struct Env {
    pub db: TestDb,
    pub pool: PgPool,
    pub ns: String,
    pub redis_url: String,
    pub fake: FakeLlm,
    pub http: reqwest::Client,
}

impl Env {
    pub async fn start(fake: FakeConfig) -> Env {
        Self::start_with_redis(fake, redis_url()).await
    }

    pub async fn start_with_redis(fake: FakeConfig, redis_url: String) -> Env {
        init_logs();
        let db = TestDb::create("aichat_ftest").await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&db.url)
            .await
            .expect("connect the test database");
        aichat_shared::db::migrate(&pool).await.expect("migrate");
        let ns = format!("aichat_ftest_{}", uuid::Uuid::new_v4().simple());
        let fake = FakeLlm::start(fake).await.expect("fake model starts");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client");
        Env {
            db,
            pool,
            ns,
            redis_url,
            fake,
            http,
        }
    }

    /// Starts an API instance of this test (migrations already applied); `extra` are more
    /// flags, e.g. `["--send-rate-per-minute", "0"]`.
    pub async fn api(&self, extra: &[&str]) -> Api {
        let mut args: Vec<String> = [
            "aichat-api",
            "--api-addr",
            "127.0.0.1:0",
            "--database-url",
            &self.db.url,
            "--redis-url",
            &self.redis_url,
            "--aichat-namespace",
            &self.ns,
            "--openai-model",
            MODEL,
            "--run-migrations",
            "false",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Tests register and log in many accounts from one address: the login and
        // registration windows are off unless a test sets them.
        for flag in [
            "--registrations-per-address",
            "--login-attempts-per-address",
            "--login-attempts-per-username",
        ] {
            if !extra.contains(&flag) {
                args.extend([flag.to_owned(), "0".to_owned()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let settings = aichat_api::Settings::try_parse_from(args).expect("api settings");
        let app = aichat_api::Application::build(settings)
            .await
            .expect("api builds");
        let base = format!("http://127.0.0.1:{}", app.port());
        let state = app.state().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        Api {
            base,
            state,
            stop: Some(stop),
            task,
        }
    }

    /// Worker flags for this test: fast polling, 1 s × 2 orphan window, a free metrics port;
    /// `extra` (flag, value, flag, value, ...) override or add.
    pub fn worker_args(&self, extra: &[&str]) -> Vec<String> {
        let base_url = self.fake.base_url();
        let mut pairs: Vec<(String, String)> = [
            ("--database-url", self.db.url.as_str()),
            ("--redis-url", self.redis_url.as_str()),
            ("--aichat-namespace", self.ns.as_str()),
            ("--openai-base-url", base_url.as_str()),
            ("--openai-api-key", "test-key"),
            ("--openai-model", MODEL),
            ("--metrics-addr", "127.0.0.1:0"),
            ("--worker-poll-interval-ms", "20"),
            ("--worker-heartbeat-secs", "1"),
            ("--worker-missed-heartbeats", "2"),
            ("--worker-shutdown-grace-secs", "5"),
            ("--worker-name-prefix", "fault"),
            ("--llm-backoff-base-ms", "100"),
            ("--llm-backoff-max-ms", "1000"),
        ]
        .iter()
        .map(|(flag, value)| (flag.to_string(), value.to_string()))
        .collect();
        for pair in extra.chunks(2) {
            let [flag, value] = pair else {
                panic!("extra worker flags come in flag/value pairs: {extra:?}");
            };
            pairs.retain(|(existing, _)| existing != flag);
            pairs.push((flag.to_string(), value.to_string()));
        }
        std::iter::once("aichat-worker".to_owned())
            .chain(pairs.into_iter().flat_map(|(flag, value)| [flag, value]))
            .collect()
    }

    pub async fn worker(&self, extra: &[&str]) -> InProcessWorker {
        let settings =
            aichat_worker::Settings::try_parse_from(self.worker_args(extra)).expect("settings");
        let worker = aichat_worker::Worker::build(settings)
            .await
            .expect("worker builds");
        let port = worker.metrics_port();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run_until(async move {
            let _ = stopped.await;
        }));
        InProcessWorker { port, stop, task }
    }

    /// Starts `binary` (pass `env!("CARGO_BIN_EXE_faults-worker")`) as a worker of this test.
    /// Its log is shown only when `TEST_LOG` is set (as its filter).
    pub fn worker_process(&self, binary: &str, extra: &[&str]) -> WorkerProcess {
        self.worker_process_env(binary, extra, &[])
    }

    /// [`Env::worker_process`] with more environment variables (the fault binary's switches,
    /// such as `FAULTS_DIE_AFTER_SAVE`).
    pub fn worker_process_env(
        &self,
        binary: &str,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> WorkerProcess {
        let port = free_port();
        let metrics_addr = format!("127.0.0.1:{port}");
        let test_log = std::env::var("TEST_LOG").ok();
        let log = test_log.clone().unwrap_or_else(|| "error".into());
        let mut flags = vec![
            "--metrics-addr",
            metrics_addr.as_str(),
            "--log-filter",
            &log,
        ];
        flags.extend_from_slice(extra);
        let args = self.worker_args(&flags);
        let child = tokio::process::Command::new(binary)
            .args(&args[1..])
            .envs(vars.iter().copied())
            .stdout(if test_log.is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the worker binary");
        let pid = child.id().expect("worker pid") as i32;
        WorkerProcess { child, pid, port }
    }

    /// Counts every user message and its replies, straight from the database.
    pub async fn audit(&self) -> Audit {
        let rows: Vec<(i64, String, Option<String>, i64)> = sqlx::query_as(
            "select u.id, u.status, u.error, count(r.id)
             from ai_messages u left join ai_messages r on r.reply_to = u.id
             where u.role = 'user' group by u.id order by u.id",
        )
        .fetch_all(&self.pool)
        .await
        .expect("audit query");
        let stray: i64 = sqlx::query_scalar(
            "select count(*) from ai_messages where role = 'assistant' and reply_to is null",
        )
        .fetch_one(&self.pool)
        .await
        .expect("audit query");
        Audit {
            messages: rows
                .into_iter()
                .map(|(id, status, error, replies)| AuditRow {
                    id,
                    status,
                    error,
                    replies,
                })
                .collect(),
            stray_replies: stray,
        }
    }

    /// Seconds from each user message to its reply (answered messages only), sorted.
    pub async fn reply_delays(&self) -> Vec<f64> {
        let mut delays: Vec<f64> = sqlx::query_scalar(
            "select extract(epoch from r.timestamp - u.timestamp)::float8
             from ai_messages u join ai_messages r on r.reply_to = u.id",
        )
        .fetch_all(&self.pool)
        .await
        .expect("delay query");
        delays.sort_by(f64::total_cmp);
        delays
    }

    /// Seconds from `since` (Unix epoch seconds) to the first reply saved after it.
    pub async fn first_reply_after(&self, since: f64) -> Option<f64> {
        sqlx::query_scalar::<_, Option<f64>>(
            "select min(extract(epoch from timestamp)::float8) - $1 from ai_messages
             where role = 'assistant' and extract(epoch from timestamp)::float8 > $1",
        )
        .bind(since)
        .fetch_one(&self.pool)
        .await
        .expect("first reply query")
    }

    /// Waits until no user message is `queued` any more and returns the audit; panics after
    /// `limit` with what is still waiting.
    pub async fn settled(&self, limit: Duration) -> Audit {
        let deadline = Instant::now() + limit;
        loop {
            let audit = self.audit().await;
            if audit.queued().is_empty() {
                return audit;
            }
            assert!(
                Instant::now() < deadline,
                "{} message(s) still queued after {limit:?}: {:?}",
                audit.queued().len(),
                audit.queued()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn queue(&self) -> String {
        format!("{}:jobs:completion", self.ns)
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }

    /// Members of one of the queue's sets (`dead`, `done`, ...).
    pub async fn queue_set(&self, suffix: &str) -> Vec<String> {
        let mut conn = self.redis().await;
        conn.smembers(format!("{}:{suffix}", self.queue()))
            .await
            .expect("queue set")
    }

    /// Where the queue's jobs are: waiting, scheduled, in flight (per worker), done, dead.
    pub async fn queue_snapshot(&self) -> QueueSnapshot {
        let mut conn = self.redis().await;
        let q = self.queue();
        let waiting: u64 = conn.llen(format!("{q}:active")).await.unwrap_or(0);
        let scheduled: u64 = conn.zcard(format!("{q}:scheduled")).await.unwrap_or(0);
        let done: u64 = conn.scard(format!("{q}:done")).await.unwrap_or(0);
        let dead: u64 = conn.scard(format!("{q}:dead")).await.unwrap_or(0);
        let workers: Vec<String> = conn
            .zrange(format!("{q}:workers"), 0, -1)
            .await
            .unwrap_or_default();
        let mut in_flight = Vec::new();
        for worker in workers {
            let n: u64 = conn
                .scard(format!("{q}:inflight:{worker}"))
                .await
                .unwrap_or(0);
            in_flight.push((worker, n));
        }
        QueueSnapshot {
            waiting,
            scheduled,
            in_flight,
            done,
            dead,
        }
    }

    /// The user messages whose jobs the worker process `pid` holds right now.
    pub async fn held_by_pid(&self, pid: i32) -> Vec<i64> {
        let mut conn = self.redis().await;
        let q = self.queue();
        let workers: Vec<String> = conn
            .zrange(format!("{q}:workers"), 0, -1)
            .await
            .unwrap_or_default();
        let mut messages = Vec::new();
        for worker in workers.iter().filter(|w| w.contains(&format!("-{pid}-"))) {
            let tasks: Vec<String> = conn
                .smembers(format!("{q}:inflight:{worker}"))
                .await
                .unwrap_or_default();
            for task in tasks {
                let args: Option<Vec<u8>> =
                    conn.hget(format!("{q}:data"), &task).await.unwrap_or(None);
                if let Some(id) = args
                    .and_then(|a| serde_json::from_slice::<Value>(&a).ok())
                    .and_then(|job| job["message_id"].as_i64())
                {
                    messages.push(id);
                }
            }
        }
        messages
    }

    /// Watches, in the background, for the workers of process `pid` to leave the workers set
    /// (their jobs put back in the queue by another worker); the time that took from now, or
    /// `None` after 30 s.
    pub fn watch_takeover(&self, pid: i32) -> JoinHandle<Option<Duration>> {
        let redis_url = self.redis_url.clone();
        let workers_set = format!("{}:workers", self.queue());
        let started = Instant::now();
        tokio::spawn(async move {
            let client = redis::Client::open(redis_url.as_str()).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let marker = format!("-{pid}-");
            while started.elapsed() < Duration::from_secs(30) {
                let workers: Vec<String> =
                    conn.zrange(&workers_set, 0, -1).await.unwrap_or_default();
                if !workers.iter().any(|w| w.contains(&marker)) {
                    return Some(started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None
        })
    }

    /// Seconds from `since` (Unix epoch seconds) to the last reply to one of `ids`.
    pub async fn last_reply_to(&self, ids: &[i64], since: f64) -> Option<f64> {
        sqlx::query_scalar::<_, Option<f64>>(
            "select max(extract(epoch from timestamp)::float8) - $2 from ai_messages
             where reply_to = any($1)",
        )
        .bind(ids)
        .bind(since)
        .fetch_one(&self.pool)
        .await
        .expect("last reply query")
    }

    pub async fn cleanup(self) {
        let _ = self.fake.shutdown().await;
        self.pool.close().await;
        delete_namespace(&self.redis_url, &self.ns).await;
        self.db.drop_database().await;
    }
}

/// Counts of the completion queue's jobs by state.
#[derive(Debug, Clone, Default)]
pub struct QueueSnapshot {
    pub waiting: u64,
    pub scheduled: u64,
    /// Registered workers and how many jobs each holds.
    pub in_flight: Vec<(String, u64)>,
    pub done: u64,
    pub dead: u64,
}

#[derive(Debug, Clone)]
pub struct AuditRow {
    pub id: i64,
    pub status: String,
    pub error: Option<String>,
    pub replies: i64,
}

/// The database's view of every user message: what a lost or duplicated message looks like.
#[derive(Debug, Clone)]
pub struct Audit {
    pub messages: Vec<AuditRow>,
    /// Assistant messages answering nothing (must be 0).
    pub stray_replies: i64,
}

impl Audit {
    pub fn with_status(&self, status: &str) -> Vec<i64> {
        self.messages
            .iter()
            .filter(|m| m.status == status)
            .map(|m| m.id)
            .collect()
    }

    pub fn queued(&self) -> Vec<i64> {
        self.with_status("queued")
    }

    /// Messages with more than one reply.
    pub fn duplicated(&self) -> Vec<i64> {
        self.messages
            .iter()
            .filter(|m| m.replies > 1)
            .map(|m| m.id)
            .collect()
    }

    /// Messages of `ids` that are not answered with exactly one reply (missing ones included).
    pub fn not_answered_once(&self, ids: &[i64]) -> Vec<i64> {
        let by_id: HashMap<i64, &AuditRow> = self.messages.iter().map(|m| (m.id, m)).collect();
        ids.iter()
            .copied()
            .filter(|id| {
                by_id
                    .get(id)
                    .is_none_or(|m| m.status != "answered" || m.replies != 1)
            })
            .collect()
    }

    /// Asserts that every message of `ids` is answered with exactly one reply, that nothing
    /// else was stored, and that nothing answers twice.
    pub fn assert_answered_once(&self, ids: &[i64]) {
        let bad = self.not_answered_once(ids);
        let detail: Vec<&AuditRow> = self
            .messages
            .iter()
            .filter(|m| bad.contains(&m.id))
            .collect();
        assert!(
            bad.is_empty(),
            "{} of {} message(s) not answered exactly once: {detail:?}",
            bad.len(),
            ids.len()
        );
        assert_eq!(
            self.messages.len(),
            ids.len(),
            "stored user messages differ from the accepted ones"
        );
        assert!(self.duplicated().is_empty(), "{:?}", self.duplicated());
        assert_eq!(
            self.stray_replies, 0,
            "assistant messages answering nothing"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Pub/sub: how many times each reply was announced

/// Counts the events of every chat of a namespace (`PSUBSCRIBE {ns}:chat:*`).
pub struct EventCounter {
    counts: Arc<Mutex<EventCounts>>,
    task: JoinHandle<()>,
    redis_url: String,
    channel: String,
}

#[derive(Debug, Default, Clone)]
pub struct EventCounts {
    /// `assistant_message` events per answered user message (`reply_to`).
    pub replies: HashMap<i64, u32>,
    /// `error` events per user message.
    pub errors: HashMap<i64, u32>,
    pub user_messages: u64,
    pub deltas: u64,
    markers: std::collections::HashSet<String>,
}

impl EventCounter {
    pub async fn start(redis_url: &str, ns: &str) -> EventCounter {
        let client = redis::Client::open(redis_url).expect("redis url");
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
        pubsub
            .psubscribe(format!("{ns}:chat:*"))
            .await
            .expect("psubscribe");
        let counts = Arc::new(Mutex::new(EventCounts::default()));
        let sink = counts.clone();
        let task = tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                let Ok(event) = serde_json::from_str::<Value>(&payload) else {
                    continue;
                };
                let mut counts = sink.lock().unwrap_or_else(|p| p.into_inner());
                match event["type"].as_str() {
                    Some("assistant_message") => {
                        if let Some(id) = event["message"]["reply_to"].as_i64() {
                            *counts.replies.entry(id).or_default() += 1;
                        }
                    }
                    Some("error") => {
                        if let Some(id) = event["message_id"].as_i64() {
                            *counts.errors.entry(id).or_default() += 1;
                        }
                    }
                    Some("user_message") => counts.user_messages += 1,
                    Some("assistant_delta") => counts.deltas += 1,
                    Some("marker") => {
                        if let Some(id) = event["id"].as_str() {
                            counts.markers.insert(id.to_owned());
                        }
                    }
                    _ => {}
                }
            }
        });
        EventCounter {
            counts,
            task,
            redis_url: redis_url.to_owned(),
            channel: format!("{ns}:chat:0"),
        }
    }

    /// Publishes a marker on the namespace's channels and waits until the reader has passed
    /// it: every event published before this call is then counted.
    pub async fn drain(&self) -> EventCounts {
        let marker = uuid::Uuid::new_v4().to_string();
        let mut conn = redis::Client::open(self.redis_url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let event = json!({"type": "marker", "id": marker}).to_string();
        let _: i64 = conn.publish(&self.channel, &event).await.expect("publish");
        let counts = self.counts.clone();
        eventually(Duration::from_secs(10), "the pub/sub marker", || {
            let counts = counts.clone();
            let marker = marker.clone();
            async move {
                let counts = counts.lock().map(|c| c.clone()).ok()?;
                counts.markers.contains(&marker).then_some(counts)
            }
        })
        .await
    }

    pub fn snapshot(&self) -> EventCounts {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Drop for EventCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EventCounts {
    /// Messages announced more than once.
    pub fn announced_twice(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .replies
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Messages of `ids` never announced.
    pub fn never_announced(&self, ids: &[i64]) -> Vec<i64> {
        ids.iter()
            .copied()
            .filter(|id| !self.replies.contains_key(id))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP client

#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub token: String,
}

/// The answer to one request: status, JSON body (`Null` if none), and headers.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub retry_after: Option<String>,
}

pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
}

impl Client {
    pub fn new(api: &Api) -> Client {
        Client::for_base(&api.base, Duration::from_secs(30))
    }

    pub fn for_base(base: &str, timeout: Duration) -> Client {
        Client {
            base: base.to_owned(),
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("http client"),
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        self.try_call(method, path, token, body, &[])
            .await
            .unwrap_or_else(|err| panic!("{path}: {err}"))
    }

    /// Like `call`, with extra headers, and the transport error instead of a panic.
    pub async fn try_call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, reqwest::Error> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text().await?;
        Ok(Answer {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            retry_after,
        })
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// Registers and logs in `username`.
    pub async fn user(&self, username: &str) -> User {
        let reg = self
            .call(
                Method::POST,
                "/api/register/",
                None,
                Some(json!({"username": username, "password": PASSWORD, "password_confirm": PASSWORD})),
            )
            .await;
        assert_eq!(reg.status, StatusCode::CREATED, "{}", reg.body);
        self.login(username).await
    }

    pub async fn login(&self, username: &str) -> User {
        let login = self
            .call(
                Method::POST,
                "/api/login/",
                None,
                Some(json!({"username": username, "password": PASSWORD})),
            )
            .await;
        assert_eq!(login.status, StatusCode::OK, "{}", login.body);
        User {
            id: login.body["id"].as_i64().expect("id"),
            username: username.to_owned(),
            token: login.body["token"].as_str().expect("token").to_owned(),
        }
    }

    pub async fn ai_chat(&self, owner: &User, title: &str) -> i64 {
        let created = self
            .post("/api/ai/chats/", &owner.token, json!({"title": title}))
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
        created.body["id"].as_i64().expect("ai chat id")
    }

    /// POSTs one message; the raw answer (202 expected in good times).
    pub async fn send(&self, user: &User, chat: i64, content: &str) -> Result<Answer, String> {
        self.try_call(
            Method::POST,
            &format!("/api/ai/chats/{chat}/send_message/"),
            Some(&user.token),
            Some(json!({"content": content})),
            &[],
        )
        .await
        .map_err(|err| {
            if err.is_timeout() {
                "timed out".to_owned()
            } else {
                format!("transport error: {err}")
            }
        })
    }

    /// Sends and insists on 202; the new message's id.
    pub async fn send_ok(&self, user: &User, chat: i64, content: &str) -> i64 {
        let answer = self.send(user, chat, content).await.expect("send");
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
        answer.body["message"]["id"].as_i64().expect("message id")
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket client

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn ws_connect(api: &Api, chat: i64, token: &str) -> Ws {
    let url = api.ws_url(&format!("/ws/ai-chat/{chat}/?token={token}"));
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("websocket connects in time")
    .expect("websocket connects");
    ws
}

/// What a socket yielded next.
#[derive(Debug)]
pub enum WsNext {
    Event(Value),
    Closed(Option<u16>),
    TimedOut,
}

/// The next text event or close, skipping pings; `TimedOut` after `limit`.
pub async fn ws_next(ws: &mut Ws, limit: Duration) -> WsNext {
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return WsNext::TimedOut,
            Ok(None) | Ok(Some(Err(_))) => return WsNext::Closed(None),
            Ok(Some(Ok(Message::Text(text)))) => {
                return WsNext::Event(serde_json::from_str(&text).unwrap_or(Value::Null));
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return WsNext::Closed(frame.map(|f| u16::from(f.code)));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Reads until an event satisfies `want`; panics on close or after `limit`.
pub async fn ws_until(ws: &mut Ws, limit: Duration, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws_next(ws, left).await {
            WsNext::Event(event) if want(&event) => return event,
            WsNext::Event(_) => continue,
            other => panic!("wanted an event within {limit:?}, got {other:?}"),
        }
    }
}

pub async fn ws_send(ws: &mut Ws, value: Value) -> bool {
    use futures::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        value.to_string().into(),
    ))
    .await
    .is_ok()
}

/// A socket read by a task of its own: every event (and the close code, if any) is kept.
pub struct WsCollector {
    seen: Arc<Mutex<Vec<Value>>>,
    closed: Arc<Mutex<Option<Option<u16>>>>,
    task: JoinHandle<()>,
}

impl WsCollector {
    pub fn start(mut ws: Ws) -> WsCollector {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(None));
        let (sink, close) = (seen.clone(), closed.clone());
        let task = tokio::spawn(async move {
            loop {
                match ws_next(&mut ws, Duration::from_secs(3600)).await {
                    WsNext::Event(event) => {
                        sink.lock().unwrap_or_else(|p| p.into_inner()).push(event)
                    }
                    WsNext::Closed(code) => {
                        *close.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
                        return;
                    }
                    WsNext::TimedOut => return,
                }
            }
        });
        WsCollector { seen, closed, task }
    }

    pub fn events(&self) -> Vec<Value> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// `Some(code)` once the server closed the socket (`Some(None)`: no close frame).
    pub fn closed(&self) -> Option<Option<u16>> {
        self.closed.lock().ok().and_then(|c| *c)
    }

    /// Waits until an event satisfies `want`; panics after `limit`.
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        want: impl Fn(&Value) -> bool,
    ) -> Value {
        eventually(limit, what, || {
            let found = self.events().into_iter().find(|e| want(e));
            async move { found }
        })
        .await
    }

    /// `assistant_message` events per answered message id.
    pub fn replies(&self) -> HashMap<i64, u32> {
        let mut replies = HashMap::new();
        for event in self.events() {
            if event["type"] == "assistant_message"
                && let Some(id) = event["message"]["reply_to"].as_i64()
            {
                *replies.entry(id).or_default() += 1;
            }
        }
        replies
    }
}

impl Drop for WsCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
