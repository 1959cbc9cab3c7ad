//! Sends are stored and queued in batches (`aichat_shared::batch`). Whatever arrived while the
//! previous batch was being written goes in together: one PostgreSQL statement (one commit) for
//! all its messages, and one Redis script run for all their jobs and then their `user_message`
//! events (one round trip, and no event of a message whose job was not pushed).
//!
//! Each message still follows the single-send rules: it is committed before its job is pushed
//! (a worker never takes a job whose message it cannot see), and if Redis refuses the push the
//! batch's messages are removed again and every sender gets 503.
use std::sync::Arc;

use aichat_shared::batch::{Batcher, all_or_each};
use aichat_shared::budget::Reservation;
use aichat_shared::db;
use aichat_shared::db::ai_messages::NewUserMessage;
use aichat_shared::domain::AiMessage;
use aichat_shared::events::{ChatEvent, EventMessage, encode_events};
use aichat_shared::jobs::{CompletionJob, JobQueue};
use aichat_shared::keys::Namespace;
use sqlx::PgPool;

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
}

/// What the writers write with.
struct Writer {
    db: PgPool,
    queue: JobQueue,
    ns: Namespace,
}

/// The way in to the writers; cloned into every request's state.
#[derive(Clone)]
pub struct SendBatcher {
    batcher: Batcher<Pending, ApiResult<AiMessage>>,
}

impl SendBatcher {
    /// Starts `writers` writers taking up to `max_batch` sends at a time; they stop once every
    /// clone of the batcher is dropped.
    pub fn start(
        db: PgPool,
        queue: JobQueue,
        ns: Namespace,
        writers: usize,
        max_batch: usize,
    ) -> Self {
        let writer = Arc::new(Writer { db, queue, ns });
        let batcher = Batcher::start(writers, max_batch, QUEUE, move |batch| {
            let writer = writer.clone();
            async move {
                metrics::histogram!("send_batch_size").record(batch.len() as f64);
                writer.write(batch).await
            }
        });
        SendBatcher { batcher }
    }

    /// Stores `message` as `queued`, queues its completion job and announces it; 404 unless
    /// its sender owns the chat.
    pub async fn submit(
        &self,
        message: NewUserMessage,
        request_id: Option<String>,
        reservation: Option<Reservation>,
    ) -> ApiResult<AiMessage> {
        let pending = Pending {
            message,
            request_id,
            reservation,
        };
        // The writers answer every send they take; no answer means they are gone (stopping).
        self.batcher
            .submit(pending)
            .await
            .unwrap_or(Err(ApiError::Unavailable(SERVICE_UNAVAILABLE)))
    }
}

/// How one send of a batch was stored: its message, `None` when its sender owns no such chat,
/// or why it could not be stored.
type Stored = ApiResult<Option<AiMessage>>;

impl Writer {
    /// Writes one batch; the answer of each send, in order.
    async fn write(&self, batch: Vec<Pending>) -> Vec<ApiResult<AiMessage>> {
        let mut messages = Vec::with_capacity(batch.len());
        let mut rest = Vec::with_capacity(batch.len());
        for pending in batch {
            messages.push(pending.message);
            rest.push((pending.request_id, pending.reservation));
        }

        let stored = self.store(&messages).await;

        let mut jobs = Vec::with_capacity(stored.len());
        let mut events = Vec::with_capacity(stored.len());
        for ((message, new), (request_id, reservation)) in
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
                    .for_user(new.user_id)
                };
                jobs.push((job, self.queue.message_job_key(message.id)));
                let event = ChatEvent::UserMessage {
                    message: EventMessage::user(message),
                };
                events.push((message.ai_chat, event));
            }
        }

        // The events are our own types: one that cannot be encoded is a bug to log, and its
        // batch's messages are still queued.
        let events = encode_events(&self.ns, &events).unwrap_or_else(|err| {
            tracing::error!(error = %err, "could not encode user_message events");
            Vec::new()
        });
        if !jobs.is_empty()
            && let Err(err) = self.queue.enqueue_completions(&jobs, &events).await
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
            return stored
                .into_iter()
                .map(|message| match message {
                    Ok(Some(_)) => Err(ApiError::Unavailable(QUEUE_DOWN)),
                    Ok(None) => Err(ApiError::NotFound),
                    Err(err) => Err(err),
                })
                .collect();
        }

        stored
            .into_iter()
            .map(|message| message.and_then(|m| m.ok_or(ApiError::NotFound)))
            .collect()
    }

    /// Stores the batch in one statement, run again while PostgreSQL reports a conflict or ends
    /// the connection's session instead of answering (the writers' connections are checked
    /// only after `SEND_BATCH_PING_AFTER_IDLE_MS` idle), or
    /// message by message when PostgreSQL refused the batch (`all_or_each`). A send that still
    /// cannot be stored gets 503 with `Retry-After` (nothing of it was kept; PostgreSQL's own
    /// words stay in the log).
    async fn store(&self, messages: &[NewUserMessage]) -> Vec<Stored> {
        let stored = all_or_each(
            "messages",
            messages,
            || {
                db::retry::on_conflict_or_ended_session("send_batch", || {
                    db::ai_messages::insert_owned_user_messages(&self.db, messages)
                })
            },
            |message| async move {
                let one = std::slice::from_ref(message);
                db::retry::on_conflict_or_ended_session("send", || {
                    db::ai_messages::insert_owned_user_messages(&self.db, one)
                })
                .await
                .map(|mut one| one.pop().flatten())
            },
        )
        .await;
        match stored {
            Ok(stored) => stored
                .into_iter()
                .zip(messages)
                .map(|(one, message)| {
                    one.map_err(|err| {
                        tracing::error!(error = %err, ai_chat_id = message.ai_chat_id, "could not store a message");
                        ApiError::Unavailable(SERVICE_UNAVAILABLE)
                    })
                })
                .collect(),
            Err(err) => {
                tracing::error!(error = %err, messages = messages.len(), "could not store a batch of messages");
                messages
                    .iter()
                    .map(|_| Err(ApiError::Unavailable(SERVICE_UNAVAILABLE)))
                    .collect()
            }
        }
    }
}
