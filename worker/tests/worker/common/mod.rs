//! What the worker's tests share, on top of the test kit (`testkit/`: the database, the
//! namespace, the fake model, the workers): users and chats stored directly, messages stored
//! and queued the way the API stores them, a pub/sub listener on a chat's channel, and the
//! queue's sets.
#![allow(dead_code)]

/// How long a test waits for a reply before it fails.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

use std::time::{Duration, Instant};

use aichat_fake_llm::FakeConfig;
use aichat_shared::domain::{AiMessage, ContextOptions};
use aichat_shared::events::ChatEvent;
use aichat_shared::jobs::JobQueue;
use aichat_shared::keys::Namespace;
use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde_json::Value;
use sqlx::PgPool;

use aichat_testkit::{
    DEFAULT_CONTEXT, Env, InProcessWorker, chat_owner, queue_completion, store_user_message,
};

pub use aichat_testkit::{fake_always, fake_with_latency, worker_metrics_text};

pub use aichat_testkit::MODEL;
pub const SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// A worker running in this process.
pub type RunningWorker = InProcessWorker;

pub struct TestEnv {
    pub db: PgPool,
    pub db_url: String,
    pub ns: String,
    pub redis_url: String,
    pub redis: ConnectionManager,
    pub queue: JobQueue,
    kit: Env,
}

/// The kit's environment under the worker's own helpers (`env.fake`, the queue, ...).
impl std::ops::Deref for TestEnv {
    type Target = Env;

    fn deref(&self) -> &Env {
        &self.kit
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

    /// The next `error` event.
    pub async fn next_error(&mut self, timeout: Duration) -> Value {
        self.until(timeout, |e| e["type"] == "error").await
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
        Self::start_with_redis(fake, aichat_testkit::redis_url()).await
    }

    pub async fn start_with_redis(fake: FakeConfig, redis_url: String) -> TestEnv {
        let kit = Env::start_with_redis(fake, redis_url).await;
        let redis = aichat_shared::redis_conn::connect(&kit.redis_url)
            .await
            .expect("connect to redis");
        let queue = JobQueue::new(redis.clone(), &Namespace::new(kit.ns.clone()));
        TestEnv {
            db: kit.pool.clone(),
            db_url: kit.db.url.clone(),
            ns: kit.ns.clone(),
            redis_url: kit.redis_url.clone(),
            redis,
            queue,
            kit,
        }
    }

    /// Settings for a worker of this test (the kit's: fast polling and heartbeats, a free
    /// metrics port); `extra` (flag, value, flag, value, ...) overrides.
    pub fn worker_args(&self, extra: &[&str]) -> Vec<String> {
        self.kit.worker_args(extra)
    }

    pub async fn spawn_worker(&self, extra: &[&str]) -> RunningWorker {
        self.kit.worker(extra).await
    }

    /// Waits until the worker at `port` says it is taking jobs.
    pub async fn wait_ready(&self, port: u16) {
        aichat_testkit::wait_worker_ready(port, Duration::from_secs(15)).await;
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
        self.send_with(ai_chat_id, content, options).await
    }

    /// [`TestEnv::send`] with the options as one value.
    pub async fn send_with(
        &self,
        ai_chat_id: i64,
        content: &str,
        options: ContextOptions,
    ) -> AiMessage {
        let message = store_user_message(&self.db, ai_chat_id, content, options).await;
        let owner = chat_owner(&self.db, ai_chat_id).await;
        assert!(
            queue_completion(&self.queue, &message, owner, options).await,
            "job queued"
        );
        message
    }

    /// [`TestEnv::send`] with the default options ([`DEFAULT_CONTEXT`]).
    pub async fn ask(&self, ai_chat_id: i64, content: &str) -> AiMessage {
        self.send_with(ai_chat_id, content, DEFAULT_CONTEXT).await
    }

    /// A new user's AI chat on [`SYSTEM_PROMPT`], and the events of its channel from now.
    pub async fn watched_chat(&self) -> (i64, Events) {
        let alice = self.user("alice").await;
        let chat = self.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
        (chat, self.events(chat).await)
    }

    /// The assistant messages of an AI chat, oldest first.
    pub async fn replies(&self, ai_chat_id: i64) -> Vec<AiMessage> {
        let messages = self.messages(ai_chat_id).await;
        messages
            .into_iter()
            .filter(|m| m.role == "assistant")
            .collect()
    }

    /// Asserts that `message` is `answered` and that the chat holds exactly one reply, to it.
    pub async fn assert_answered_once(&self, ai_chat_id: i64, message: i64) {
        let replies = self.replies(ai_chat_id).await;
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0].reply_to, Some(message));
        assert_eq!(self.message(ai_chat_id, message).await.status, "answered");
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

    pub fn queue_key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.kit.queue())
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
        conn.hgetall(format!("{}:{task_id}", self.queue_config().job_meta_hash()))
            .await
            .expect("job meta")
    }

    /// Drops the database and every Redis key of the namespace.
    pub async fn cleanup(self) {
        self.kit.cleanup().await;
    }

    /// The end of a test: stops `workers` (gracefully), then [`TestEnv::cleanup`].
    pub async fn finish(self, workers: impl IntoIterator<Item = RunningWorker>) {
        for worker in workers {
            worker.stop().await;
        }
        self.cleanup().await;
    }
}
