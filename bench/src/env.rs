//! The bench's world: a scratch PostgreSQL database, a Redis namespace, a temp directory for
//! logs and scripts, and the stacks of child processes each scenario runs against.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::postgres::{PgPool, PgPoolOptions};

use aichat_testkit::TestDb;
use aichat_testkit::postgres::try_drop_database;
use aichat_testkit::redis_server::{delete_keys_starting_with, forget_queues_starting_with};

use crate::procs::{self, Proc};

pub const PG_HOST: &str = "127.0.0.1";
pub const PG_PORT: u16 = 5432;
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Scratch database, namespace and directory; [`Env::cleanup`] removes all three.
pub struct Env {
    pub db_name: String,
    pub db_url: String,
    pub db: PgPool,
    pub redis: redis::aio::MultiplexedConnection,
    /// Prefix of every namespace this run uses (each scenario takes `{base_ns}_{scenario}`).
    pub base_ns: String,
    pub dir: PathBuf,
    pub release_dir: PathBuf,
    pub http: reqwest::Client,
    /// Settings given on the command line, over the bench's own.
    pub overrides: Overrides,
}

/// Settings for the children the scenarios start (`--api-env`, `--worker-env`), applied after
/// the bench's own so they win; printed when the run starts and in the report's notes.
#[derive(Debug, Default)]
pub struct Overrides {
    pub api: Vec<(String, String)>,
    pub worker: Vec<(String, String)>,
}

/// `KEY=VALUE`, as `--api-env` and `--worker-env` take it.
pub fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

impl Env {
    pub async fn create(release_dir: PathBuf, overrides: Overrides) -> anyhow::Result<Self> {
        // Children run in the bench directory: the path must not be relative.
        let release_dir = std::fs::canonicalize(&release_dir)
            .with_context(|| format!("release directory {}", release_dir.display()))?;
        for bin in ["aichat-api", "aichat-worker", "aichat-fake-llm"] {
            let path = release_dir.join(bin);
            if !path.is_file() {
                bail!(
                    "{} not found: build first with `cargo build --release -p aichat-api -p aichat-worker -p aichat-fake-llm`",
                    path.display()
                );
            }
        }
        let test_db = TestDb::try_create("aichat_bench").await.context(
            "creating the bench database (PostgreSQL at TEST_PG_URL, default 127.0.0.1:5432)",
        )?;
        let (db_name, db_url) = (test_db.name, test_db.url);
        let base_ns = db_name.clone();
        let dir = std::env::temp_dir().join(&db_name);
        std::fs::create_dir_all(&dir).context("creating the bench directory")?;
        let db = PgPoolOptions::new()
            .max_connections(8)
            .connect_lazy(&db_url)?;
        let client = redis::Client::open(REDIS_URL)?;
        let redis = client
            .get_multiplexed_async_connection()
            .await
            .context("connecting to Redis at 127.0.0.1:6379")?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Env {
            db_name,
            db_url,
            db,
            redis,
            base_ns,
            dir,
            release_dir,
            http,
            overrides,
        })
    }

    /// Drops the database and deletes every Redis key of the run's namespaces.
    pub async fn cleanup(self) -> anyhow::Result<()> {
        self.db.close().await;
        let mut problems = Vec::new();
        if let Err(e) = try_drop_database(&self.db_name).await {
            problems.push(format!("dropping {}: {e}", self.db_name));
        }
        match delete_keys_starting_with(REDIS_URL, &self.base_ns).await {
            Ok(n) => eprintln!("cleanup: dropped {}, deleted {n} Redis keys", self.db_name),
            Err(e) => problems.push(format!("deleting Redis keys: {e}")),
        }
        // The workers registered their queues in apalis's global list, outside the namespaces.
        if let Err(e) = forget_queues_starting_with(REDIS_URL, &self.base_ns).await {
            problems.push(format!("taking the queues out of apalis's list: {e}"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if problems.is_empty() {
            Ok(())
        } else {
            bail!(problems.join("; "))
        }
    }

    pub fn ns(&self, scenario: &str) -> String {
        format!("{}_{scenario}", self.base_ns)
    }
}

/// What a scenario runs against.
pub struct Stack {
    pub ns: String,
    pub api: Option<Proc>,
    pub api_port: u16,
    pub fake: Option<Proc>,
    pub fake_port: u16,
    pub workers: Vec<Proc>,
    pub worker_metrics: Vec<String>,
    seq: usize,
}

impl Stack {
    /// Starts the API (which applies the migrations) under the scenario's namespace.
    pub async fn api(env: &Env, scenario: &str) -> anyhow::Result<Self> {
        let mut stack = Stack {
            ns: env.ns(scenario),
            api: None,
            api_port: 0,
            fake: None,
            fake_port: procs::free_port()?,
            workers: Vec::new(),
            worker_metrics: Vec::new(),
            seq: 0,
        };
        stack.api_port = procs::free_port()?;
        let mut envs = stack.common(env);
        envs.extend(kv(&[
            ("API_ADDR", &format!("127.0.0.1:{}", stack.api_port)),
            ("SEND_RATE_PER_MINUTE", "0"),
            ("RUN_MIGRATIONS", "true"),
            // Sized for the load the scenarios make (fan-out: up to tens of thousands of
            // sockets, several per account when spread over fewer chats).
            ("MAX_CONNECTIONS", "65536"),
            ("MAX_SOCKETS_PER_USER", "0"),
        ]));
        envs.extend(env.overrides.api.iter().cloned());
        let mut api = Proc::spawn(
            &format!("{scenario}-api"),
            &env.release_dir.join("aichat-api"),
            &envs,
            &env.dir,
        )?;
        let url = format!("http://127.0.0.1:{}/healthz", stack.api_port);
        procs::wait_ready(&env.http, &mut api, &url, Duration::from_secs(60)).await?;
        stack.api = Some(api);
        Ok(stack)
    }

    fn common(&self, env: &Env) -> Vec<(String, String)> {
        kv(&[
            ("DATABASE_URL", &env.db_url),
            ("REDIS_URL", REDIS_URL),
            ("AICHAT_NAMESPACE", &self.ns),
            ("RUST_LOG", "warn"),
            ("LOG_FORMAT", "text"),
            ("OPENAI_API_KEY", "bench-key"),
            (
                "OPENAI_BASE_URL",
                &format!("http://127.0.0.1:{}/v1", self.fake_port),
            ),
        ])
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn fake_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.fake_port)
    }

    /// Starts the fake model with a fixed latency before its response headers.
    /// `keep` bounds the fake's request log (its memory grows until it holds that many).
    pub async fn start_fake(
        &mut self,
        env: &Env,
        latency_ms: u64,
        keep: usize,
    ) -> anyhow::Result<()> {
        let envs = kv(&[
            ("FAKE_LLM_ADDR", &format!("127.0.0.1:{}", self.fake_port)),
            ("FAKE_LLM_LATENCY_MS", &latency_ms.to_string()),
            ("FAKE_LLM_MAX_RECORDED", &keep.to_string()),
            ("RUST_LOG", "warn"),
        ]);
        let mut fake = Proc::spawn(
            &format!("{}-fake", self.ns),
            &env.release_dir.join("aichat-fake-llm"),
            &envs,
            &env.dir,
        )?;
        let url = format!("{}/healthz", self.fake_url());
        procs::wait_ready(&env.http, &mut fake, &url, Duration::from_secs(30)).await?;
        self.fake = Some(fake);
        Ok(())
    }

    /// Starts one more worker (shared rate limits off) and waits until it takes jobs.
    pub async fn add_worker(&mut self, env: &Env, concurrency: u32) -> anyhow::Result<()> {
        let port = procs::free_port()?;
        self.seq += 1;
        let mut envs = self.common(env);
        envs.extend(kv(&[
            ("METRICS_ADDR", &format!("127.0.0.1:{port}")),
            ("WORKER_CONCURRENCY", &concurrency.to_string()),
            ("RATE_LIMIT_RPM", "0"),
            ("RATE_LIMIT_TPM", "0"),
            ("WORKER_NAME_PREFIX", "bench"),
        ]));
        envs.extend(env.overrides.worker.iter().cloned());
        let mut worker = Proc::spawn(
            &format!("{}-worker{}", self.ns, self.seq),
            &env.release_dir.join("aichat-worker"),
            &envs,
            &env.dir,
        )?;
        let url = format!("http://127.0.0.1:{port}/healthz");
        procs::wait_ready(&env.http, &mut worker, &url, Duration::from_secs(60)).await?;
        self.workers.push(worker);
        self.worker_metrics
            .push(format!("http://127.0.0.1:{port}/metrics"));
        Ok(())
    }

    pub async fn stop_workers(&mut self) {
        for w in self.workers.drain(..) {
            w.stop(Duration::from_secs(5)).await;
        }
        self.worker_metrics.clear();
    }

    pub async fn stop(mut self) {
        self.stop_workers().await;
        if let Some(api) = self.api.take() {
            api.stop(Duration::from_secs(5)).await;
        }
        if let Some(fake) = self.fake.take() {
            fake.stop(Duration::from_secs(2)).await;
        }
    }

    /// Errors if any child died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(api) = self.api.as_mut() {
            api.check_alive()?;
        }
        if let Some(fake) = self.fake.as_mut() {
            fake.check_alive()?;
        }
        for w in &mut self.workers {
            w.check_alive()?;
        }
        Ok(())
    }

    /// (short name, pid) of each child.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let mut out = Vec::new();
        if let Some(api) = &self.api {
            out.push(("api", api.pid()));
        }
        for (i, w) in self.workers.iter().enumerate() {
            out.push((if i == 0 { "worker1" } else { "worker2" }, w.pid()));
        }
        if let Some(fake) = &self.fake {
            out.push(("fake", fake.pid()));
        }
        out
    }

    pub fn api_pid(&self) -> u32 {
        self.api.as_ref().map(|a| a.pid()).unwrap_or(0)
    }
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Sum of `aichat_worker_<name>` counters (over all labels) in Prometheus text.
pub fn prom_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}

/// Jobs a worker is running now, from its counters.
pub async fn worker_in_flight(http: &reqwest::Client, url: &str) -> Option<f64> {
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    let started = prom_sum(&text, "aichat_worker_jobs_started_total");
    let ended: f64 = [
        "aichat_worker_jobs_succeeded_total",
        "aichat_worker_jobs_failed_total",
        "aichat_worker_jobs_skipped_total",
        "aichat_worker_jobs_requeued_total",
    ]
    .iter()
    .map(|n| prom_sum(&text, n))
    .sum();
    Some(started - ended)
}

/// Messages of these chats still waiting for their reply (`queued`, or `answering`).
pub async fn queued_in(db: &PgPool, chats: &[i64]) -> anyhow::Result<i64> {
    let n: i64 = sqlx::query_scalar(
        "select count(*) from ai_messages where ai_chat_id = any($1) and role = 'user' \
         and status in ('queued', 'answering')",
    )
    .bind(chats)
    .fetch_one(db)
    .await?;
    Ok(n)
}

/// Deletes the messages of these chats still waiting for a reply: their jobs go with the
/// scenario's namespace, and the next scenarios' sweepers would otherwise queue them again.
/// Then vacuums the table, as autovacuum would in time: the index entries of a deleted backlog
/// of tens of thousands would otherwise be read by the next scenario's statements (its
/// worker's first sweep reads every one of them), and counted as theirs.
pub async fn forget_queued(db: &PgPool, chats: &[i64]) -> anyhow::Result<u64> {
    let done = sqlx::query(
        "delete from ai_messages where ai_chat_id = any($1) and status in ('queued', 'answering')",
    )
    .bind(chats)
    .execute(db)
    .await?;
    if done.rows_affected() > 0 {
        sqlx::query("vacuum (analyze) ai_messages")
            .execute(db)
            .await?;
    }
    Ok(done.rows_affected())
}

/// Assistant messages saved in these chats.
pub async fn replies_in(db: &PgPool, chats: &[i64]) -> anyhow::Result<i64> {
    let n: i64 = sqlx::query_scalar(
        "select count(*) from ai_messages where ai_chat_id = any($1) and role = 'assistant'",
    )
    .bind(chats)
    .fetch_one(db)
    .await?;
    Ok(n)
}
