//! Sends are stored and queued in batches. Whatever arrived while the previous batch was being
//! written goes in together: one PostgreSQL statement (one commit) for all its messages, one
//! Redis script run for all their jobs and one pipeline for their `user_message` events. A lone
//! send on an idle server is written at once, on its own: batching adds no wait, it only
//! gathers what is already waiting.
//!
//! Each message still follows the single-send rules: it is committed before its job is pushed
//! (a worker never takes a job whose message it cannot see), and if Redis refuses the push the
//! batch's messages are removed again and every sender gets 503.
use std::sync::Arc;

use aichat_shared::batch::next_batch;
use aichat_shared::budget::Reservation;
use aichat_shared::db;
use aichat_shared::db::ai_messages::NewUserMessage;
use aichat_shared::domain::AiMessage;
use aichat_shared::events::{ChatEvent, EventMessage, publish_events};
use aichat_shared::jobs::{CompletionJob, JobQueue};
use aichat_shared::keys::Namespace;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::{ApiError, ApiResult, SERVICE_UNAVAILABLE};

/// Sends waiting for a writer before new ones wait to be taken in.
const QUEUE: usize = 1024;

const QUEUE_DOWN: &str =
    "The message queue is unavailable, so the message was not accepted; please retry shortly";

/// A send waiting to be written.
struct Pending {
    message: NewUserMessage,
    request_id: Option<String>,
    reservation: Option<Reservation>,
    reply: oneshot::Sender<ApiResult<AiMessage>>,
}

/// What the writers write with.
struct Writer {
    db: PgPool,
    redis: ConnectionManager,
    queue: JobQueue,
    ns: Namespace,
}

/// The way in to the writers; cloned into every request's state.
#[derive(Clone)]
pub struct SendBatcher {
    tx: mpsc::Sender<Pending>,
}

impl SendBatcher {
    /// Starts `writers` writers taking up to `max_batch` sends at a time; they stop once every
    /// clone of the batcher is dropped.
    pub fn start(
        db: PgPool,
        redis: ConnectionManager,
        queue: JobQueue,
        ns: Namespace,
        writers: usize,
        max_batch: usize,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let writer = Arc::new(Writer {
            db,
            redis,
            queue,
            ns,
        });
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(rx.clone(), writer.clone(), max_batch));
        }
        SendBatcher { tx }
    }

    /// Stores `message` as `queued`, queues its completion job and announces it; 404 unless
    /// its sender owns the chat.
    pub async fn submit(
        &self,
        message: NewUserMessage,
        request_id: Option<String>,
        reservation: Option<Reservation>,
    ) -> ApiResult<AiMessage> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            message,
            request_id,
            reservation,
            reply,
        };
        if self.tx.send(pending).await.is_err() {
            return Err(ApiError::Unavailable(SERVICE_UNAVAILABLE));
        }
        // A writer answers every send it takes; no answer means it is gone (shutting down).
        answer
            .await
            .unwrap_or(Err(ApiError::Unavailable(SERVICE_UNAVAILABLE)))
    }
}

async fn write_batches(
    rx: Arc<Mutex<mpsc::Receiver<Pending>>>,
    writer: Arc<Writer>,
    max_batch: usize,
) {
    while let Some(batch) = next_batch(&rx, max_batch).await {
        metrics::histogram!("send_batch_size").record(batch.len() as f64);
        writer.write(batch).await;
    }
}

/// How one send of a batch was stored: its message, `None` when its sender owns no such chat,
/// or why it could not be stored.
type Stored = ApiResult<Option<AiMessage>>;

impl Writer {
    async fn write(&self, batch: Vec<Pending>) {
        let mut messages = Vec::with_capacity(batch.len());
        let mut rest = Vec::with_capacity(batch.len());
        for pending in batch {
            messages.push(pending.message);
            rest.push((pending.request_id, pending.reservation, pending.reply));
        }

        let stored = self.store(&messages).await;

        let mut jobs = Vec::with_capacity(stored.len());
        let mut events = Vec::with_capacity(stored.len());
        for ((message, new), (request_id, reservation, _)) in
            stored.iter().zip(&messages).zip(&mut rest)
        {
            if let Ok(Some(message)) = message {
                let job = CompletionJob {
                    budget: reservation.take(),
                    ..CompletionJob::new(
                        message.id,
                        message.ai_chat,
                        new.options,
                        request_id.take(),
                    )
                };
                jobs.push((job, self.queue.message_job_key(message.id)));
                let event = ChatEvent::UserMessage {
                    message: EventMessage::user(message),
                };
                events.push((message.ai_chat, event));
            }
        }

        if !jobs.is_empty()
            && let Err(err) = self.queue.enqueue_completions(&jobs).await
        {
            tracing::error!(error = %err, jobs = jobs.len(), "could not queue completion jobs");
            let ids: Vec<i64> = stored
                .iter()
                .filter_map(|m| m.as_ref().ok().and_then(Option::as_ref))
                .map(|m| m.id)
                .collect();
            if let Err(cleanup) = db::retry::on_conflict("send_cleanup", || {
                db::ai_messages::delete_undispatched_messages(&self.db, &ids)
            })
            .await
            {
                tracing::error!(error = %cleanup, ?ids, "could not remove the unqueued messages");
            }
            for (message, (_, _, reply)) in stored.into_iter().zip(rest) {
                let answer = match message {
                    Ok(Some(_)) => Err(ApiError::Unavailable(QUEUE_DOWN)),
                    Ok(None) => Err(ApiError::NotFound),
                    Err(err) => Err(err),
                };
                let _ = reply.send(answer);
            }
            return;
        }

        if !events.is_empty() {
            let mut redis = self.redis.clone();
            if let Err(err) = publish_events(&mut redis, &self.ns, &events).await {
                tracing::warn!(error = %err, events = events.len(), "could not publish user_message events");
            }
        }
        for (message, (_, _, reply)) in stored.into_iter().zip(rest) {
            let _ = reply.send(message.and_then(|m| m.ok_or(ApiError::NotFound)));
        }
    }

    /// Stores the batch in one statement, run again while PostgreSQL reports a conflict. A
    /// batch it refuses for another reason may be one message's fault, so each message is
    /// then stored on its own: one send that cannot be stored never fails its neighbours. A
    /// send that still cannot be stored gets 503 with `Retry-After` (nothing of it was kept;
    /// PostgreSQL's own words stay in the log).
    async fn store(&self, messages: &[NewUserMessage]) -> Vec<Stored> {
        let batch = db::retry::on_conflict("send_batch", || {
            db::ai_messages::insert_owned_user_messages(&self.db, messages)
        })
        .await;
        let err = match batch {
            Ok(stored) => return stored.into_iter().map(Ok).collect(),
            Err(err) => err,
        };
        // Only a statement PostgreSQL refused was rolled back; after any other failure the
        // batch may be stored, and storing it message by message would store it twice.
        if messages.len() == 1 || !err.is_refused_by_database() {
            tracing::error!(error = %err, messages = messages.len(), "could not store a batch of messages");
            return messages
                .iter()
                .map(|_| Err(ApiError::Unavailable(SERVICE_UNAVAILABLE)))
                .collect();
        }
        tracing::warn!(error = %err, messages = messages.len(), "a batch of messages was refused; storing them one by one");
        let mut stored = Vec::with_capacity(messages.len());
        for message in messages {
            let one = std::slice::from_ref(message);
            let result = db::retry::on_conflict("send", || {
                db::ai_messages::insert_owned_user_messages(&self.db, one)
            })
            .await;
            stored.push(match result {
                Ok(mut one) => Ok(one.pop().flatten()),
                Err(err) => {
                    tracing::error!(error = %err, ai_chat_id = message.ai_chat_id, "could not store a message");
                    Err(ApiError::Unavailable(SERVICE_UNAVAILABLE))
                }
            });
        }
        stored
    }
}
