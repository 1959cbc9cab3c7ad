//! The checks every fault test ends with: [`Audit`] (every user message answered exactly once,
//! read from the database) and [`EventCounter`] (every reply announced at most once, read from
//! pub/sub).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aichat_shared::keys::Namespace;
use aichat_shared::lock::lock;
use futures::StreamExt;
use redis::AsyncCommands;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use std::time::Instant;

use crate::eventually;
use crate::stack::Env;

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

    /// Messages still waiting for their reply (`queued`, or `answering`).
    pub fn queued(&self) -> Vec<i64> {
        self.messages
            .iter()
            .filter(|m| m.status == "queued" || m.status == "answering")
            .map(|m| m.id)
            .collect()
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
            .psubscribe(Namespace::new(ns).all_chat_channels())
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
                let mut counts = lock(&sink);
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
            channel: Namespace::new(ns).chat_channel(0),
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

    /// Asserts that no reply was announced twice and that every message of `ids` was announced.
    pub fn assert_announced_once(&self, ids: &[i64]) {
        let twice = self.announced_twice();
        assert!(twice.is_empty(), "replies announced twice: {twice:?}");
        let never = self.never_announced(ids);
        assert!(never.is_empty(), "replies never announced: {never:?}");
    }

    /// Messages of `ids` never announced.
    pub fn never_announced(&self, ids: &[i64]) -> Vec<i64> {
        ids.iter()
            .copied()
            .filter(|id| !self.replies.contains_key(id))
            .collect()
    }
}

impl Env {
    /// An [`EventCounter`] of this test's namespace, counting from now.
    pub async fn event_counter(&self) -> EventCounter {
        EventCounter::start(&self.redis_url, &self.ns).await
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
}
