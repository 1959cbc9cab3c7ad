//! Test harness: a fresh database and Redis namespace per test, the real fake model server,
//! workers started through the library (or as the built binary), and a pub/sub listener on a
//! chat's channel. Messages are stored and jobs queued with the same shared functions the API
//! uses.
#![allow(dead_code)]

/// How long a test waits for a reply before it fails.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

use std::time::{Duration, Instant};

use aichat_fake_llm::{FakeConfig, FakeLlm};
use aichat_shared::db;
use aichat_shared::db::ai_chats::NewAiChat;
use aichat_shared::domain::{AiMessage, ContextOptions, User};
use aichat_shared::events::ChatEvent;
use aichat_shared::jobs::{CompletionJob, JobQueue};
use aichat_shared::keys::Namespace;
use aichat_worker::{Settings, Worker};
use clap::Parser;
use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde_json::Value;
use sqlx::PgPool;

use aichat_testkit::postgres::drop_database;
use aichat_testkit::{TestDb, delete_namespace, redis_url, unique_name};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const MODEL: &str = "gpt-test";
pub const SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// Logs of in-process workers, when `TEST_LOG` is set (e.g. `TEST_LOG=aichat_worker=debug`).
fn init_logs() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let settings = aichat_shared::config::LogSettings {
            log_format: aichat_shared::config::LogFormat::Text,
            log_filter: filter,
        };
        aichat_shared::telemetry::init(&settings);
    }
}

pub struct TestEnv {
    pub db: PgPool,
    pub db_url: String,
    db_name: String,
    pub ns: String,
    pub redis_url: String,
    pub redis: ConnectionManager,
    pub queue: JobQueue,
    pub fake: FakeLlm,
}

/// A worker running in this process.
pub struct RunningWorker {
    pub port: u16,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningWorker {
    /// Asks for a graceful stop and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let result = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("worker stops in time")
            .expect("worker task");
        result.expect("worker ran without error");
    }
}

/// What a chat's channel carried, in order.
pub struct Events {
    stream: redis::aio::PubSubStream,
    // Held so the subscription stays open.
    _sink: redis::aio::PubSubSink,
    pub seen: Vec<Value>,
}

impl Events {
    /// The next event, or a panic after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Value {
        let msg = tokio::time::timeout(timeout, self.stream.next())
            .await
            .expect("an event in time")
            .expect("subscription open");
        let payload: String = msg.get_payload().expect("text payload");
        let value: Value = serde_json::from_str(&payload).expect("JSON event");
        self.seen.push(value.clone());
        value
    }

    /// Reads events until one satisfies `done`; returns it. Everything read stays in `seen`.
    pub async fn until(&mut self, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.next(left).await;
            if done(&event) {
                return event;
            }
        }
    }

    /// The `assistant_message` answering `message_id`.
    pub async fn reply_to(&mut self, message_id: i64, timeout: Duration) -> Value {
        self.until(timeout, |e| {
            e["type"] == "assistant_message" && e["message"]["reply_to"] == message_id
        })
        .await
    }

    /// Reads until every message of `ids` has its `assistant_message`, in whatever order.
    pub async fn replies_to_all(&mut self, ids: &[i64], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let answered = |seen: &[Value], id: i64| {
            seen.iter()
                .any(|e| e["type"] == "assistant_message" && e["message"]["reply_to"] == id)
        };
        while !ids.iter().all(|id| answered(&self.seen, *id)) {
            let left = deadline.saturating_duration_since(Instant::now());
            self.next(left).await;
        }
    }

    /// Publishes a marker on the channel and reads up to it: afterwards `seen` holds every
    /// event published before this call.
    pub async fn drain(&mut self, env: &TestEnv, ai_chat_id: i64) {
        let mut conn = env.redis.clone();
        let marker = format!(
            "{{\"type\":\"test_marker\",\"id\":\"{}\"}}",
            uuid::Uuid::new_v4()
        );
        let _: usize = conn
            .publish(
                Namespace::new(env.ns.clone()).chat_channel(ai_chat_id),
                &marker,
            )
            .await
            .expect("publish marker");
        let marker: Value = serde_json::from_str(&marker).expect("marker");
        self.until(Duration::from_secs(10), |e| *e == marker).await;
        self.seen.pop();
    }

    pub fn of_type(&self, kind: &str) -> Vec<&Value> {
        self.seen.iter().filter(|e| e["type"] == kind).collect()
    }
}

/// Parses an event as the shared type, proving it matches the WebSocket contract.
pub fn chat_event(value: &Value) -> ChatEvent {
    serde_json::from_value(value.clone()).expect("a ChatEvent")
}

impl TestEnv {
    pub async fn start(fake: FakeConfig) -> TestEnv {
        Self::start_with_redis(fake, redis_url()).await
    }

    pub async fn start_with_redis(fake: FakeConfig, redis_url: String) -> TestEnv {
        init_logs();
        let test_db = TestDb::create("aichat_wtest").await;
        let (db_url, name) = (test_db.url, test_db.name);
        let db = PgPool::connect(&db_url).await.expect("connect test db");
        db::migrate(&db).await.expect("migrate");
        let ns = unique_name("aichat_wtest");
        let redis = aichat_shared::redis_conn::connect(&redis_url)
            .await
            .expect("connect to redis");
        let queue = JobQueue::new(redis.clone(), &Namespace::new(ns.clone()));
        let fake = FakeLlm::start(fake).await.expect("fake model starts");
        TestEnv {
            db,
            db_url,
            db_name: name,
            ns,
            redis_url,
            redis,
            queue,
            fake,
        }
    }

    /// Settings for a worker of this test: its database, namespace and fake model, fast polling
    /// and heartbeats, a free metrics port; `extra` (flag, value, flag, value, ...) overrides.
    pub fn worker_args(&self, extra: &[&str]) -> Vec<String> {
        let base_url = self.fake.base_url();
        let mut pairs: Vec<(String, String)> = [
            ("--database-url", self.db_url.as_str()),
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
            ("--worker-name-prefix", "test"),
        ]
        .iter()
        .map(|(flag, value)| (flag.to_string(), value.to_string()))
        .collect();
        for override_pair in extra.chunks(2) {
            let [flag, value] = override_pair else {
                panic!("extra worker args come in flag/value pairs: {extra:?}");
            };
            pairs.retain(|(existing, _)| existing != flag);
            pairs.push((flag.to_string(), value.to_string()));
        }
        std::iter::once("aichat-worker".to_owned())
            .chain(pairs.into_iter().flat_map(|(flag, value)| [flag, value]))
            .collect()
    }

    pub async fn spawn_worker(&self, extra: &[&str]) -> RunningWorker {
        let settings = Settings::try_parse_from(self.worker_args(extra)).expect("worker settings");
        let worker = Worker::build(settings).await.expect("worker builds");
        let port = worker.metrics_port();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run_until(async move {
            let _ = stopped.await;
        }));
        RunningWorker { port, stop, task }
    }

    /// Waits until the worker at `port` says it is taking jobs.
    pub async fn wait_ready(&self, port: u16) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = client
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "worker not ready in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the worker at `port` says it is not taking jobs (e.g. Redis is gone).
    pub async fn wait_unready(&self, port: u16) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status = client
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            if status == 503 {
                return;
            }
            assert!(Instant::now() < deadline, "worker still says it is ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn user(&self, username: &str) -> User {
        db::users::insert_user(&self.db, username, "", "not-a-hash", false)
            .await
            .expect("insert user")
    }

    /// A user-to-user chat with these participants and messages `(sender, content)`.
    pub async fn chat(&self, name: &str, participants: &[i64], messages: &[(i64, &str)]) -> i64 {
        let mut conn = self.db.acquire().await.expect("connection");
        let chat = db::chats::insert_chat(&mut conn, name, participants)
            .await
            .expect("insert chat");
        for (sender, content) in messages {
            db::chats::insert_chat_message(&mut conn, chat.id, *sender, content)
                .await
                .expect("insert chat message");
        }
        chat.id
    }

    pub async fn ai_chat(&self, owner: i64, system_prompt: &str, related: Option<i64>) -> i64 {
        db::ai_chats::insert_ai_chat(
            &self.db,
            &NewAiChat {
                user_id: owner,
                title: "test",
                system_prompt,
                related_chat: related,
                model: MODEL,
            },
        )
        .await
        .expect("insert ai chat")
    }

    /// Stores a queued user message and queues its job, as the API's `send_message` does.
    pub async fn send(
        &self,
        ai_chat_id: i64,
        content: &str,
        include_related_chat_context: bool,
        context_message_limit: i32,
    ) -> AiMessage {
        let options = ContextOptions {
            include_related_chat_context,
            context_message_limit,
        };
        let message = db::ai_messages::insert_user_message(&self.db, ai_chat_id, content, options)
            .await
            .expect("insert user message");
        let job = CompletionJob::new(message.id, ai_chat_id, options, Some("test".into()));
        // A ConnectionManager reports the first command after its server went away as an
        // error, then reconnects; the idempotency key makes the retry safe.
        let mut tries = 0;
        let queued = loop {
            tries += 1;
            match self
                .queue
                .enqueue_completion(&job, &self.queue.message_job_key(message.id))
                .await
            {
                Ok(queued) => break queued,
                Err(err) if tries < 3 => eprintln!("enqueue failed, retrying: {err}"),
                Err(err) => panic!("enqueue: {err}"),
            }
        };
        assert!(queued, "job queued");
        message
    }

    pub async fn events(&self, ai_chat_id: i64) -> Events {
        let client = redis::Client::open(self.redis_url.as_str()).expect("redis client");
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
        pubsub
            .subscribe(Namespace::new(self.ns.clone()).chat_channel(ai_chat_id))
            .await
            .expect("subscribe");
        let (sink, stream) = pubsub.split();
        Events {
            stream,
            _sink: sink,
            seen: Vec::new(),
        }
    }

    pub async fn messages(&self, ai_chat_id: i64) -> Vec<AiMessage> {
        db::ai_messages::list_chat_messages(&self.db, ai_chat_id, None, None)
            .await
            .expect("list messages")
    }

    pub async fn message(&self, ai_chat_id: i64, id: i64) -> AiMessage {
        self.messages(ai_chat_id)
            .await
            .into_iter()
            .find(|m| m.id == id)
            .expect("message exists")
    }

    pub fn queue_key(&self, suffix: &str) -> String {
        format!(
            "{}:{suffix}",
            Namespace::new(self.ns.clone()).completion_queue()
        )
    }

    /// Members of one of the queue's sets (`done`, `dead`, ...).
    pub async fn queue_set(&self, suffix: &str) -> Vec<String> {
        let mut conn = self.redis.clone();
        conn.smembers(self.queue_key(suffix))
            .await
            .expect("read queue set")
    }

    /// Waits until the queue's `suffix` set holds `n` members; returns them.
    pub async fn wait_queue_set(&self, suffix: &str, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let members = self.queue_set(suffix).await;
            if members.len() >= n {
                return members;
            }
            assert!(
                Instant::now() < deadline,
                "{suffix} set has {} of {n} jobs",
                members.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// apalis-redis' record of a finished job (status, attempts, ...).
    pub async fn job_meta(&self, task_id: &str) -> std::collections::HashMap<String, String> {
        let mut conn = self.redis.clone();
        conn.hgetall(format!("{}:{task_id}", self.queue_key("meta")))
            .await
            .expect("job meta")
    }

    /// Drops the database and every Redis key of the namespace.
    pub async fn cleanup(self) {
        delete_namespace(&self.redis_url, &self.ns).await;
        let _ = self.fake.shutdown().await;
        self.db.close().await;
        drop_database(&self.db_name).await;
    }
}
