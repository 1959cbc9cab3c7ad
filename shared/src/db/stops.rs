//! Stopping and retrying user messages: the API's requests (`request_stop`, `requeue`) and the
//! worker's end of a stopped message (`cancel`). The worker takes a message with
//! `claims::claim_jobs` (or alone, `completions::claim_job`), which is what moves it from
//! `queued` to `answering`: a stop finds it either still `queued` (nobody asked the model: it is
//! cancelled on the spot) or `answering` (only its worker can end it, so the stop is recorded
//! for it).
//!
//! Each statement changes one row, so none can close a lock cycle (`db/mod.rs`).
use chrono::NaiveDate;
use sqlx::PgExecutor;

use crate::domain::{AiMessage, ContextOptions, MessageStatus, Role};
use crate::error::Result;

/// A user message a stop request changed.
#[derive(Debug, Clone)]
pub struct Stopping {
    /// The message as the stop left it: `cancelled` (it was still `queued`) or `answering`
    /// (its worker has to stop it).
    pub message: AiMessage,
    /// What it holds of its user's budget (`budget::Reservation::of_message`).
    pub budget_day: Option<NaiveDate>,
    pub budget_tokens: Option<i32>,
}

/// Asks to stop `message_id`, a user message of one of `user_id`'s chats that waits for its
/// reply: a `queued` one becomes `cancelled`; an `answering` one keeps its status and gets
/// `stop_requested_at`, for its worker (told over pub/sub, or reading it when it takes the job
/// over). `None` when the message is not such a message (not the user's, not a user message,
/// or no longer waiting): the caller reads it again to say which.
#[tracing::instrument(skip(db))]
pub async fn request_stop(
    db: impl PgExecutor<'_>,
    message_id: i64,
    user_id: i64,
) -> Result<Option<Stopping>> {
    let row = sqlx::query!(
        r#"update ai_messages m
           set status = case when m.status = $4 then $5 else m.status end,
               stop_requested_at = coalesce(m.stop_requested_at, now())
           from ai_chats a
           where m.id = $1 and m.role = $3 and a.id = m.ai_chat_id and a.user_id = $2
             and m.status in ($4, $6)
           returning m.id, m.ai_chat_id as ai_chat, m.role as "role: Role", m.content,
                     m.timestamp, m.prompt_tokens, m.completion_tokens, m.total_tokens,
                     m.status as "status: MessageStatus", m.error, m.model, m.reply_to,
                     m.stopped, m.parent_id, m.version, m.active, m.cost::text as "cost?",
                     m.currency, m.budget_day, m.budget_tokens"#,
        message_id,
        user_id,
        Role::User.as_str(),
        MessageStatus::Queued.as_str(),
        MessageStatus::Cancelled.as_str(),
        MessageStatus::Answering.as_str(),
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(|row| Stopping {
        message: ai_message_of!(row),
        budget_day: row.budget_day,
        budget_tokens: row.budget_tokens,
    }))
}

/// Ends a user message that waits for its reply as `cancelled` (its worker was told to stop
/// before the model was asked). False when it no longer waits.
#[tracing::instrument(skip(db))]
pub async fn cancel(db: impl PgExecutor<'_>, message_id: i64) -> Result<bool> {
    let done = sqlx::query!(
        r#"update ai_messages m set status = $3,
               -- a regeneration stopped before any text: the question shows again the reply
               -- it showed (`completions::mark_failed` does the same)
               reply_version = coalesce((select r.version from ai_messages r
                                         where r.reply_to = m.id and r.active),
                                        m.reply_version)
           where m.id = $1 and m.role = $2 and m.status in ($4, $5)"#,
        message_id,
        Role::User.as_str(),
        MessageStatus::Cancelled.as_str(),
        MessageStatus::Queued.as_str(),
        MessageStatus::Answering.as_str(),
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A user message queued again by its user, or stored as an edit of one (`versions`).
#[derive(Debug, Clone)]
pub struct Requeued {
    pub message: AiMessage,
    /// What its new job asks (as its first send did).
    pub options: ContextOptions,
}

/// What a requeue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// A message that got no reply (`failed`, `cancelled`): answered as it was sent.
    Retry,
    /// Also an `answered` one, whose next reply is a new version (`reply_version` moves on).
    Regenerate,
}

/// Puts `message_id`, a `failed` or `cancelled` user message of one of `user_id`'s chats (or,
/// to regenerate, an `answered` one), back to `queued`: its error and stop request cleared,
/// its new budget reservation recorded, the version after its replies' for the reply to come,
/// and `dispatched_at` now: its job is pushed after this commits, and sweeps give it a full
/// grace period before they follow the message's chain (a sweep in between would push a job
/// of its own that a regeneration's walk, which goes past live jobs, then goes past too). `None` when it is not such a message; concurrent requeues
/// of one message change it once.
#[tracing::instrument(skip(db))]
pub async fn requeue(
    db: impl PgExecutor<'_>,
    message_id: i64,
    user_id: i64,
    budget: Option<(NaiveDate, i32)>,
    purpose: Requeue,
) -> Result<Option<Requeued>> {
    let row = sqlx::query!(
        r#"with chat as (
               -- a turn that had ended changes: the workers' context caches of the chat no
               -- longer hold its history (`ai_chats.history_epoch`); the chat row is taken
               -- before the message, as the lock order says
               update ai_chats a set history_epoch = a.history_epoch + 1
               from ai_messages q
               where q.id = $1 and q.role = $3 and a.id = q.ai_chat_id and a.user_id = $2
                 and (q.status in ($5, $6) or ($10 and q.status = $9))
               returning a.id
           )
           update ai_messages m
           set status = $4, error = null, stop_requested_at = null, dispatched_at = now(),
               budget_day = $7, budget_tokens = $8,
               reply_version = coalesce((select max(r.version) from ai_messages r
                                         where r.reply_to = m.id), 0) + 1
           from chat a
           where m.id = $1 and m.role = $3 and a.id = m.ai_chat_id
             and (m.status in ($5, $6) or ($10 and m.status = $9))
           returning m.id, m.ai_chat_id as ai_chat, m.role as "role: Role", m.content,
                     m.timestamp, m.prompt_tokens, m.completion_tokens, m.total_tokens,
                     m.status as "status: MessageStatus", m.error, m.model, m.reply_to,
                     m.stopped, m.parent_id, m.version, m.active, m.cost::text as "cost?",
                     m.currency, m.include_related_chat_context, m.context_message_limit"#,
        message_id,
        user_id,
        Role::User.as_str(),
        MessageStatus::Queued.as_str(),
        MessageStatus::Failed.as_str(),
        MessageStatus::Cancelled.as_str(),
        budget.map(|(day, _)| day),
        budget.map(|(_, tokens)| tokens),
        MessageStatus::Answered.as_str(),
        purpose == Requeue::Regenerate,
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(|row| Requeued {
        message: ai_message_of!(row),
        options: ContextOptions {
            include_related_chat_context: row.include_related_chat_context,
            context_message_limit: row.context_message_limit,
        },
    }))
}

/// Undoes [`requeue`] when the message's job could not be pushed: back to `status` with
/// `error`, showing the reply it showed, no budget held; unless a worker has taken it
/// meanwhile. Whether it changed.
#[tracing::instrument(skip(db, error))]
pub async fn unrequeue(
    db: impl PgExecutor<'_>,
    message_id: i64,
    status: MessageStatus,
    error: Option<&str>,
) -> Result<bool> {
    let done = sqlx::query!(
        r#"update ai_messages set status = $2, error = $3, budget_day = null, budget_tokens = null,
               reply_version = coalesce((select r.version from ai_messages r
                                         where r.reply_to = ai_messages.id
                                         order by r.active desc, r.version desc limit 1),
                                        reply_version)
           where id = $1 and status = $4"#,
        message_id,
        status.as_str(),
        error,
        MessageStatus::Queued.as_str(),
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Of `message_ids`, those whose user asked to stop them while they were answered: what a
/// worker checks for its running jobs when its pub/sub connection (re)subscribes, having
/// possibly missed a request meanwhile.
#[tracing::instrument(skip(db))]
pub async fn stop_requested(db: impl PgExecutor<'_>, message_ids: &[i64]) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar!(
        r#"select id from ai_messages
           where id = any($1) and stop_requested_at is not null and status = $2"#,
        message_ids,
        MessageStatus::Answering.as_str(),
    )
    .fetch_all(db)
    .await?;
    Ok(ids)
}
