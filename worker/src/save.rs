//! Saving what a run produced (its reply, or the mark of its failure), retried while the
//! database cannot be reached: the model's answer is in hand, so a database outage is waited
//! out here (up to `WORKER_SAVE_RETRY_SECS`) rather than by running the job, and the model call,
//! again. Replies go through the batching writers (`reply_batch.rs`).
use std::time::Duration;

use aichat_shared::backoff::Backoff;
use aichat_shared::db;
use aichat_shared::db::completions::NewReply;
use aichat_shared::domain::AiMessage;

use crate::metrics;
use crate::state::JobContext;

/// Between attempts to reach the database while a reply waits to be saved: 100 ms doubling
/// up to 2 s, until `WORKER_SAVE_RETRY_SECS` runs out.
const SAVE_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// Saves the reply (with the other replies finishing at the same time: one statement, one
/// commit; `reply_batch.rs`), trying again while the database is unreachable or busy, up to
/// `save_retry_for`. When a save failed without saying whether it happened and the retry then
/// finds the message answered, the stored reply is returned as this run's: it is almost surely
/// the one just committed, and its event must still go out.
pub async fn save_reply(
    ctx: &JobContext,
    message_id: i64,
    reply: NewReply,
) -> anyhow::Result<Option<AiMessage>> {
    let deadline = tokio::time::Instant::now() + ctx.save_retry_for;
    let mut failures = 1u32;
    let mut commit_unknown = false;
    loop {
        // The error, and whether it came from the commit (outcome unknown).
        // One autocommitted statement: a connection lost while it ran may have committed it.
        let attempt = ctx
            .replies
            .save(message_id, reply.clone())
            .await
            .map_err(|e| {
                let unknown = e.is_unavailable();
                (e, unknown)
            });
        let err = match attempt {
            Ok(Some(saved)) => return Ok(Some(saved)),
            Ok(None) if commit_unknown => {
                return db_retry(ctx, "loading the saved reply", || {
                    db::ai_messages::find_reply(&ctx.db, message_id)
                })
                .await;
            }
            Ok(None) => return Ok(None),
            Err((err, during_commit)) => {
                commit_unknown |= during_commit;
                err
            }
        };
        let transient = err.is_unavailable() || err.is_conflict();
        let delay = SAVE_BACKOFF.ceiling(failures);
        if !transient || tokio::time::Instant::now() + delay > deadline {
            return Err(anyhow::Error::from(err).context("saving the reply"));
        }
        tracing::warn!(error = %err, "database unreachable or busy while saving the reply; retrying");
        metrics::save_retry();
        tokio::time::sleep(delay).await;
        failures = failures.saturating_add(1);
    }
}

/// Runs a database operation, retrying while the database cannot be reached, for at most
/// `save_retry_for`. Its error, like every error of this module, means the job must run again.
pub async fn db_retry<T, F, Fut>(
    ctx: &JobContext,
    what: &'static str,
    mut op: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, aichat_shared::Error>>,
{
    let deadline = tokio::time::Instant::now() + ctx.save_retry_for;
    let mut failures = 1u32;
    loop {
        let delay = SAVE_BACKOFF.ceiling(failures);
        match op().await {
            Ok(value) => return Ok(value),
            Err(err) if err.is_unavailable() && tokio::time::Instant::now() + delay <= deadline => {
                tracing::warn!(error = %err, "database unreachable ({what}); retrying");
                metrics::save_retry();
                tokio::time::sleep(delay).await;
                failures = failures.saturating_add(1);
            }
            Err(err) => return Err(anyhow::Error::from(err).context(what)),
        }
    }
}
