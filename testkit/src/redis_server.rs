//! Redis for tests: the keys of one test's namespace removed at its end, and a server of a
//! test's own to stop and start again.
use std::process::Stdio;
use std::time::Duration;

use redis::AsyncCommands;

use crate::{eventually, free_port};

/// apalis-redis lists every queue's worker set in this one global key (its own name, not
/// ours); a test takes its queue out again.
const APALIS_QUEUES: &str = "core:apalis:queues:list";

/// Deletes every key of namespace `ns` (and its queue's entry in apalis's global list).
/// Best effort, at most 5 s to connect: a test's cleanup never hangs on a Redis it stopped.
pub async fn delete_namespace(redis_url: &str, ns: &str) {
    let prefix = format!("{ns}:");
    let _ = delete_keys_starting_with(redis_url, &prefix).await;
    let _ = forget_queues_starting_with(redis_url, &prefix).await;
}

/// Takes every queue whose name starts with `prefix` out of apalis's global list (a worker
/// registers its queue there, outside any namespace, and nothing takes it out); how many.
pub async fn forget_queues_starting_with(
    redis_url: &str,
    prefix: &str,
) -> redis::RedisResult<usize> {
    let mut conn = connect(redis_url).await?;
    let queues: Vec<String> = conn.zrange(APALIS_QUEUES, 0, -1).await?;
    let ours: Vec<&String> = queues.iter().filter(|q| q.starts_with(prefix)).collect();
    if ours.is_empty() {
        return Ok(0);
    }
    conn.zrem(APALIS_QUEUES, ours).await
}

/// Deletes every key whose name starts with `prefix` (SCAN and UNLINK, at most 10,000 rounds);
/// how many were deleted.
pub async fn delete_keys_starting_with(redis_url: &str, prefix: &str) -> redis::RedisResult<usize> {
    let mut conn = connect(redis_url).await?;
    let pattern = format!("{prefix}*");
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    for _ in 0..10_000 {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let n: usize = conn.unlink(&keys).await?;
            deleted += n;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(deleted)
}

/// A connection to `redis_url`, within 5 s.
async fn connect(redis_url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(redis_url)?;
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .unwrap_or_else(|_| {
        Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "connecting to Redis timed out",
        )))
    })
}

/// A Redis server of the test's own on a free port, to stop and start again on the same port
/// (no persistence: a restart comes back empty, as a cache-mode Redis or a failed-over replica
/// that missed the latest writes would). Killed when dropped.
pub struct PrivateRedis {
    child: Option<std::process::Child>,
    pub port: u16,
}

impl PrivateRedis {
    /// Starts a server and waits until it answers PING.
    pub async fn start() -> PrivateRedis {
        let mut redis = PrivateRedis {
            child: None,
            port: free_port(),
        };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port and waits until it answers PING.
    pub async fn restart(&mut self) {
        self.stop();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        let url = self.url();
        eventually(Duration::from_secs(10), "private redis answers", || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url.as_str()).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
    }

    /// Kills the server (SIGKILL: no goodbye to the clients) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use redis::AsyncCommands;
    use redis::aio::MultiplexedConnection;

    use super::{APALIS_QUEUES, connect, delete_namespace, forget_queues_starting_with};
    use crate::{redis_url, unique_name};

    fn queue(ns: &str) -> String {
        format!("{ns}:jobs:completion:workers")
    }

    async fn listed(conn: &mut MultiplexedConnection, ns: &str) -> bool {
        let score: Option<f64> = conn.zscore(APALIS_QUEUES, queue(ns)).await.expect("zscore");
        score.is_some()
    }

    #[tokio::test]
    async fn a_cleanup_takes_its_own_queues_out_of_apalis_list_and_no_other() {
        let url = redis_url();
        let base = unique_name("testkit_queues");
        let (ns_a, ns_b) = (format!("{base}_a"), format!("{base}_b"));
        let other = unique_name("testkit_other");
        let mut conn = connect(&url).await.expect("redis");
        for ns in [&ns_a, &ns_b, &other] {
            let _: () = conn.zadd(APALIS_QUEUES, queue(ns), 1).await.expect("zadd");
        }

        delete_namespace(&url, &ns_a).await;
        let a_after_its_namespace = listed(&mut conn, &ns_a).await;
        let b_after_a = listed(&mut conn, &ns_b).await;
        let forgotten = forget_queues_starting_with(&url, &base).await;
        let b_after_the_prefix = listed(&mut conn, &ns_b).await;
        let other_after_the_prefix = listed(&mut conn, &other).await;
        // Every entry goes before the checks, so a failing run leaves nothing in the list.
        let _: () = conn
            .zrem(
                APALIS_QUEUES,
                vec![queue(&ns_a), queue(&ns_b), queue(&other)],
            )
            .await
            .expect("zrem");

        assert!(!a_after_its_namespace);
        assert!(b_after_a, "another namespace's queue stays");
        assert_eq!(forgotten.expect("zrem"), 1);
        assert!(!b_after_the_prefix);
        assert!(other_after_the_prefix, "a queue outside the prefix stays");
    }
}
