//! What the completion queue of a test's namespace holds: by state, by worker, by process.
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::Value;
use tokio::task::JoinHandle;

use aichat_shared::keys::Namespace;

use crate::stack::Env;

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

impl Env {
    /// The queue's key names, as the API and the workers use them.
    pub fn queue_config(&self) -> apalis_redis::Config {
        aichat_shared::jobs::queue_config(&Namespace::new(self.ns.clone()))
    }

    /// The completion queue's name (the prefix of its keys).
    pub fn queue(&self) -> String {
        self.queue_config().queue.as_ref().to_owned()
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
        let q = self.queue_config();
        let waiting: u64 = conn.llen(q.active_jobs_list()).await.unwrap_or(0);
        let scheduled: u64 = conn.zcard(q.scheduled_jobs_set()).await.unwrap_or(0);
        let done: u64 = conn.scard(q.done_jobs_set()).await.unwrap_or(0);
        let dead: u64 = conn.scard(q.dead_jobs_set()).await.unwrap_or(0);
        let workers: Vec<String> = conn
            .zrange(q.workers_set(), 0, -1)
            .await
            .unwrap_or_default();
        let mut in_flight = Vec::new();
        for worker in workers {
            let n: u64 = conn
                .scard(format!("{}:{worker}", q.inflight_jobs_set()))
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
        let q = self.queue_config();
        let workers: Vec<String> = conn
            .zrange(q.workers_set(), 0, -1)
            .await
            .unwrap_or_default();
        let mut messages = Vec::new();
        for worker in workers.iter().filter(|w| w.contains(&format!("-{pid}-"))) {
            let tasks: Vec<String> = conn
                .smembers(format!("{}:{worker}", q.inflight_jobs_set()))
                .await
                .unwrap_or_default();
            for task in tasks {
                let args: Option<Vec<u8>> =
                    conn.hget(q.job_data_hash(), &task).await.unwrap_or(None);
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
        let workers_set = self.queue_config().workers_set();
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
}
