//! The test kit: the one place that creates a test database, a Redis namespace or a private
//! Redis server, and removes them again. The API, worker and fault suites build their
//! harnesses on it (`api/tests/common`, `worker/tests/common`, `faults/src/lib.rs`).
//!
//! Everything talks to loopback only, and every wait is bounded by a deadline.
pub mod postgres;
pub mod redis_server;

use std::future::Future;
use std::time::{Duration, Instant};

pub use postgres::TestDb;
pub use redis_server::{PrivateRedis, delete_namespace};

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
