//! Jobs take their messages in batches (`aichat_shared::batch`): the jobs that start while the
//! previous batch is being claimed go in together, one PostgreSQL statement and one commit for
//! all of them (`db::claims::claim_jobs`).
//!
//! Each claim keeps the single claim's contract (`db::completions::claim_job`): the job gets
//! its message with the rows of its prompt, `None` when the message is gone, or the error,
//! shared by the whole batch, for the job to run again. A batch refused by PostgreSQL is claimed
//! job by job, so one message never fails its neighbours.
use std::sync::Arc;

use aichat_shared::batch::{Batcher, all_or_each, each_answer};
use aichat_shared::db;
use aichat_shared::db::claims::ClaimRequest;
use aichat_shared::db::completions::ClaimedJob;
use sqlx::PgPool;

/// Most claims in one statement.
const MAX_BATCH: usize = 64;
/// Claims waiting for a writer before new ones wait to be taken in.
const QUEUE: usize = 1024;

/// How one claim ended.
pub type Claimed = Result<Option<ClaimedJob>, Arc<aichat_shared::Error>>;

/// The way in to the claimers, shared by every job of the process.
#[derive(Clone)]
pub struct JobClaimer {
    batcher: Batcher<ClaimRequest, Claimed>,
}

impl JobClaimer {
    /// Starts `writers` claimers (`WORKER_BATCH_WRITERS`); they stop once every clone is
    /// dropped.
    pub fn start(db: PgPool, writers: usize) -> Self {
        let batcher = Batcher::start(writers, MAX_BATCH, QUEUE, move |batch| {
            let db = db.clone();
            async move { claim(&db, batch).await }
        });
        JobClaimer { batcher }
    }

    /// Claims the message of `request` with what its prompt is built from (see
    /// `db::completions::claim_job`).
    pub async fn claim(&self, request: ClaimRequest) -> Claimed {
        self.batcher.answer(request).await
    }
}

async fn claim(db: &PgPool, batch: Vec<ClaimRequest>) -> Vec<Claimed> {
    crate::metrics::claim_batch(batch.len());
    let claimed = all_or_each(
        "claims",
        &batch,
        || async {
            let mut conn = db.acquire().await?;
            db::claims::claim_jobs(&mut conn, &batch).await
        },
        |request| {
            db::completions::claim_job(
                db,
                request.message_id,
                request.known,
                request.history_limit,
                request.related_limit,
            )
        },
    )
    .await;
    each_answer(claimed, batch.len())
}
