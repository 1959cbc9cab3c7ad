//! A test's own stack: a fresh database and Redis namespace ([`Env`]), the real API in process
//! ([`Api`]), workers in process or as real processes (to SIGKILL / SIGTERM them), the fake
//! model over real HTTP, and what the queue holds.
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use aichat_fake_llm::{FakeConfig, FakeLlm};
use clap::Parser;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{
    ALLOWED_MODELS, MODEL, TestDb, delete_namespace, eventually, free_port, init_logs, redis_url,
    unique_name,
};

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

    /// Stops accepting requests and closes every WebSocket, without waiting.
    pub fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// [`Api::shut_down`], then waits (at most 10 s) until it has stopped.
    pub async fn stop(mut self) {
        self.shut_down();
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

/// The settings of the login and registration windows: off in tests (they register and log in
/// many accounts from one address) unless a test sets them.
pub const AUTH_WINDOWS: [&str; 3] = [
    "--registrations-per-address",
    "--login-attempts-per-address",
    "--login-attempts-per-username",
];

/// The flags of a test's API: its database, Redis and namespace, the test models, the login
/// windows off unless `extra` sets them, then `extra` (which may repeat a flag to override it).
pub fn api_args(db_url: &str, redis_url: &str, ns: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "aichat-api",
        "--api-addr",
        "127.0.0.1:0",
        "--database-url",
        db_url,
        "--redis-url",
        redis_url,
        "--aichat-namespace",
        ns,
        "--openai-model",
        MODEL,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for flag in AUTH_WINDOWS {
        if !extra.contains(&flag) {
            args.extend([flag.to_owned(), "0".to_owned()]);
        }
    }
    if !extra.contains(&"--allowed-models") {
        args.extend(["--allowed-models".to_owned(), ALLOWED_MODELS.to_owned()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Builds the API from `args` and serves it in this process until [`Api::stop`].
pub async fn start_api(args: Vec<String>) -> Api {
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

/// The flags of a test's worker: its database, Redis and namespace, the fake model, the test
/// models, fast polling, a 1 s × 2 orphan window, a free metrics port; `extra` (flag, value,
/// flag, value, ...) override or add.
pub fn worker_args(
    db_url: &str,
    redis_url: &str,
    ns: &str,
    model_url: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut pairs: Vec<(String, String)> = [
        ("--database-url", db_url),
        ("--redis-url", redis_url),
        ("--aichat-namespace", ns),
        ("--openai-base-url", model_url),
        ("--openai-api-key", "test-key"),
        ("--openai-model", MODEL),
        ("--allowed-models", ALLOWED_MODELS),
        ("--metrics-addr", "127.0.0.1:0"),
        ("--worker-poll-interval-ms", "20"),
        ("--worker-heartbeat-secs", "1"),
        ("--worker-missed-heartbeats", "2"),
        ("--worker-shutdown-grace-secs", "5"),
        ("--worker-name-prefix", "test"),
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

/// Builds a worker from `args` and runs it in this process until it is stopped or dropped.
pub async fn start_worker(args: Vec<String>) -> InProcessWorker {
    let settings = aichat_worker::Settings::try_parse_from(args).expect("worker settings");
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

    /// SIGKILL, then waits (at most 10 s) for the process to end.
    pub async fn kill(&mut self) {
        self.sigkill();
        self.wait(Duration::from_secs(10)).await;
    }

    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// The sum of a counter (all label sets) on a worker's `/metrics`; 0 when absent. In-process
/// workers share one recorder per test binary: compare before and after.
pub async fn worker_metric(port: u16, name: &str) -> f64 {
    let Ok(resp) = scrape(port).await else {
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

/// The whole text of a worker's `/metrics`; panics if it does not answer (within 5 s).
pub async fn worker_metrics_text(port: u16) -> String {
    let resp = scrape(port).await.expect("the worker's /metrics answers");
    resp.text().await.expect("the metrics text")
}

/// One GET of a worker's `/metrics`, bounded by 5 s.
async fn scrape(port: u16) -> reqwest::Result<reqwest::Response> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let client = reqwest::Client::new();
    client.get(url).timeout(Duration::from_secs(5)).send().await
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
        let ns = unique_name("aichat_ftest");
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
        let mut flags = vec!["--run-migrations", "false"];
        flags.extend_from_slice(extra);
        start_api(api_args(&self.db.url, &self.redis_url, &self.ns, &flags)).await
    }

    /// Worker flags for this test: fast polling, 1 s × 2 orphan window, a free metrics port;
    /// `extra` (flag, value, flag, value, ...) override or add.
    pub fn worker_args(&self, extra: &[&str]) -> Vec<String> {
        worker_args(
            &self.db.url,
            &self.redis_url,
            &self.ns,
            &self.fake.base_url(),
            extra,
        )
    }

    pub async fn worker(&self, extra: &[&str]) -> InProcessWorker {
        start_worker(self.worker_args(extra)).await
    }

    /// [`Env::worker`], once its `/healthz` says it is taking jobs (at most 30 s).
    pub async fn ready_worker(&self, extra: &[&str]) -> InProcessWorker {
        let worker = self.worker(extra).await;
        wait_worker_ready(worker.port, Duration::from_secs(30)).await;
        worker
    }

    /// Starts `binary` (pass `env!("CARGO_BIN_EXE_faults-worker")`) as a worker of this test.
    /// Its log is shown only when `TEST_LOG` is set (as its filter).
    pub fn worker_process(&self, binary: &str, extra: &[&str]) -> WorkerProcess {
        self.worker_process_env(binary, extra, &[])
    }

    /// [`Env::worker_process`], once its `/healthz` says it is taking jobs (at most 30 s).
    pub async fn ready_worker_process(&self, binary: &str, extra: &[&str]) -> WorkerProcess {
        let worker = self.worker_process(binary, extra);
        wait_worker_ready(worker.port, Duration::from_secs(30)).await;
        worker
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

    /// The end of a test: stops `workers` (gracefully) and `api`, then [`Env::cleanup`].
    pub async fn finish(self, api: Api, workers: impl IntoIterator<Item = InProcessWorker>) {
        for worker in workers {
            worker.stop().await;
        }
        api.stop().await;
        self.cleanup().await;
    }

    pub async fn cleanup(self) {
        let _ = self.fake.shutdown().await;
        self.pool.close().await;
        delete_namespace(&self.redis_url, &self.ns).await;
        self.db.drop_database().await;
    }
}
