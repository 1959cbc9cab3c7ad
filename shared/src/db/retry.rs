//! Running again what PostgreSQL asks to run again. A deadlock (`40P01`) or a serialization
//! failure (`40001`) aborts one transaction so that the others can go on; the same statement
//! run a moment later normally succeeds. The lock order (`db/mod.rs`) makes deadlocks between
//! our own statements impossible; this covers what the order cannot see (a statement of an
//! operator's, a future path) so that it never reaches a user as an error.
use std::future::Future;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::error::{Error, Result};

/// Attempts in all, the first included, before the conflict is handed to the caller.
pub const ATTEMPTS: u32 = 5;

/// 5, 10, 20, 40 ms ceilings: a deadlock is found after `deadlock_timeout` (1 s by default)
/// and the winner usually commits within milliseconds of it.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(40));

/// Runs `op` until it succeeds, fails with anything but a conflict, or has failed with a
/// conflict [`ATTEMPTS`] times. Each retry is counted in `aichat_db_conflict_retries_total`
/// under `path` (a short fixed name of the request or job step).
pub async fn on_conflict<T, F, Fut>(path: &'static str, op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    run_again_while(path, Error::is_conflict, op).await
}

/// [`on_conflict`], and also when PostgreSQL ended the session instead of answering
/// ([`Error::is_session_ended`]: nothing was committed). For statements on connections that
/// are not checked before each use (the send writers', `SEND_BATCH_PING_AFTER_IDLE_MS`): a
/// connection PostgreSQL dropped since its last use is found by the statement itself, which
/// then runs on another.
pub async fn on_conflict_or_ended_session<T, F, Fut>(path: &'static str, op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    run_again_while(path, |err| err.is_conflict() || err.is_session_ended(), op).await
}

async fn run_again_while<T, F, Fut>(
    path: &'static str,
    again: impl Fn(&Error) -> bool,
    mut op: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut failures = 0;
    loop {
        match op().await {
            Err(err) if again(&err) && failures + 1 < ATTEMPTS => {
                failures += 1;
                metrics::counter!(RETRIES, "path" => path).increment(1);
                tracing::warn!(error = %err, path, failures, "statement not committed (a conflict, or its session ended); running it again");
                tokio::time::sleep(BACKOFF.delay(failures)).await;
            }
            other => return other,
        }
    }
}

/// The counter of retried conflicts, by path.
pub const RETRIES: &str = "aichat_db_conflict_retries_total";

/// Describes [`RETRIES`] and registers its series for `paths` at zero, so a scrape lists it
/// before the first conflict.
pub fn describe(paths: &[&'static str]) {
    metrics::describe_counter!(
        RETRIES,
        "Statements run again after PostgreSQL aborted them for a deadlock or a serialization failure, or ended their session before answering, by path"
    );
    for path in paths {
        metrics::counter!(RETRIES, "path" => *path).increment(0);
    }
}
