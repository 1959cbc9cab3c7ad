//! Replies are saved in batches (`aichat_shared::batch`). Whatever finished while the previous
//! batch was being written goes in together: one PostgreSQL statement and one commit for all of
//! them (`db::completions::save_replies`).
//!
//! Each reply keeps the single-save contract: the job learns whether its reply was stored
//! (`Some`), was not needed (`None`: answered by another run, or the message is gone), or
//! failed (the error, shared by the whole batch, for the job's own retry loop to judge).
//! PostgreSQL's conflicts are retried here first (`db::retry`), and a batch refused for any
//! other reason is saved reply by reply, so one reply never fails its neighbours.
use std::sync::Arc;

use aichat_shared::batch::{Batcher, all_or_each, each_answer};
use aichat_shared::db;
use aichat_shared::db::completions::NewReply;
use aichat_shared::domain::AiMessage;
use sqlx::PgPool;

/// Most replies in one statement.
const MAX_BATCH: usize = 64;
/// Replies waiting for a writer before new ones wait to be taken in.
const QUEUE: usize = 1024;

/// How one save ended.
pub type Saved = Result<Option<AiMessage>, Arc<aichat_shared::Error>>;

/// The way in to the writers, shared by every job of the process.
#[derive(Clone)]
pub struct ReplySaver {
    batcher: Batcher<(i64, NewReply), Saved>,
}

impl ReplySaver {
    /// Starts `writers` writers (`WORKER_BATCH_WRITERS`); they stop once every clone of the
    /// saver is dropped.
    pub fn start(db: PgPool, writers: usize) -> Self {
        let batcher = Batcher::start(writers, MAX_BATCH, QUEUE, move |batch| {
            let db = db.clone();
            async move { write(&db, batch).await }
        });
        ReplySaver { batcher }
    }

    /// Saves the reply to `message_id` and marks that message answered (see
    /// `db::completions::save_reply`).
    pub async fn save(&self, message_id: i64, reply: NewReply) -> Saved {
        self.batcher.answer((message_id, reply)).await
    }
}

async fn write(db: &PgPool, batch: Vec<(i64, NewReply)>) -> Vec<Saved> {
    crate::metrics::reply_batch(batch.len());
    let replies: Vec<(i64, &NewReply)> = batch.iter().map(|(id, reply)| (*id, reply)).collect();
    let saved = all_or_each(
        "replies",
        &batch,
        || {
            db::retry::on_conflict("reply_batch", || {
                db::completions::save_replies(db, &replies)
            })
        },
        |(message_id, reply)| {
            db::retry::on_conflict("reply", move || {
                db::completions::save_reply(db, *message_id, reply)
            })
        },
    )
    .await;
    each_answer(saved, batch.len())
}
