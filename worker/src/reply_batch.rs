//! Replies are saved in batches. Whatever finished while the previous batch was being written
//! goes in together: one PostgreSQL statement and one commit for all of them
//! (`db::completions::save_replies`). A lone reply on an idle worker is written at once:
//! batching adds no wait, it only gathers what is already waiting.
//!
//! Each reply keeps the single-save contract: the job learns whether its reply was stored
//! (`Some`), was not needed (`None`: answered by another run, or the message is gone), or
//! failed (the error, shared by the whole batch, for the job's own retry loop to judge).
//! PostgreSQL's conflicts are retried here first (`db::retry`), and a batch refused for any
//! other reason is saved reply by reply, so one reply never fails its neighbours.
use std::sync::Arc;

use aichat_shared::batch::next_batch;
use aichat_shared::db;
use aichat_shared::db::completions::NewReply;
use aichat_shared::domain::AiMessage;
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};

/// Batches written at the same time.
const WRITERS: usize = 2;
/// Most replies in one statement.
const MAX_BATCH: usize = 64;
/// Replies waiting for a writer before new ones wait to be taken in.
const QUEUE: usize = 1024;

/// How one save ended.
pub type Saved = Result<Option<AiMessage>, Arc<aichat_shared::Error>>;

struct Pending {
    message_id: i64,
    reply: NewReply,
    answer: oneshot::Sender<Saved>,
}

/// The way in to the writers, shared by every job of the process.
#[derive(Clone)]
pub struct ReplySaver {
    tx: mpsc::Sender<Pending>,
}

impl ReplySaver {
    /// Starts the writers; they stop once every clone of the saver is dropped.
    pub fn start(db: PgPool) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..WRITERS {
            tokio::spawn(write_batches(rx.clone(), db.clone()));
        }
        ReplySaver { tx }
    }

    /// Saves the reply to `message_id` and marks that message answered (see
    /// `db::completions::save_reply`).
    pub async fn save(&self, message_id: i64, reply: NewReply) -> Saved {
        let (answer, answered) = oneshot::channel();
        let pending = Pending {
            message_id,
            reply,
            answer,
        };
        if self.tx.send(pending).await.is_err() {
            return Err(Arc::new(gone()));
        }
        answered.await.unwrap_or_else(|_| Err(Arc::new(gone())))
    }
}

/// What a job hears when the writers are gone (the process is stopping): the database could
/// not be reached, so the job is run again rather than lost.
fn gone() -> aichat_shared::Error {
    aichat_shared::Error::Database(sqlx::Error::PoolClosed)
}

async fn write_batches(rx: Arc<Mutex<mpsc::Receiver<Pending>>>, db: PgPool) {
    while let Some(batch) = next_batch(&rx, MAX_BATCH).await {
        crate::metrics::reply_batch(batch.len());
        let replies: Vec<(i64, &NewReply)> =
            batch.iter().map(|p| (p.message_id, &p.reply)).collect();
        let saved = db::retry::on_conflict("reply_batch", || {
            db::completions::save_replies(&db, &replies)
        })
        .await;
        match saved {
            Ok(saved) => {
                for (pending, saved) in batch.into_iter().zip(saved) {
                    let _ = pending.answer.send(Ok(saved));
                }
            }
            // A statement PostgreSQL refused may be one reply's fault: each is tried alone, so
            // the others are not held back by it. Only such a statement was rolled back; after
            // any other failure the replies may be saved, and the job's own loop finds them.
            Err(err) if batch.len() > 1 && err.is_refused_by_database() => {
                tracing::warn!(error = %err, replies = batch.len(), "a batch of replies was refused; saving them one by one");
                for pending in batch {
                    let saved = db::retry::on_conflict("reply", || {
                        db::completions::save_reply(&db, pending.message_id, &pending.reply)
                    })
                    .await
                    .map_err(Arc::new);
                    let _ = pending.answer.send(saved);
                }
            }
            Err(err) => {
                let err = Arc::new(err);
                for pending in batch {
                    let _ = pending.answer.send(Err(err.clone()));
                }
            }
        }
    }
}
