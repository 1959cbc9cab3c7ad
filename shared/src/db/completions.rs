//! The completion worker's queries: what a job reads to build its prompt, and how it records
//! the reply or the failure.
use sqlx::PgExecutor;

use super::ai_messages::MESSAGE_COLUMNS;
use crate::domain::{AiMessage, role, status};
use crate::error::Result;

/// A user message waiting for its reply, with what its chat contributes to the prompt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CompletionSubject {
    pub message_id: i64,
    pub ai_chat_id: i64,
    pub content: String,
    pub status: String,
    /// An assistant message already answers it: an earlier run of the job saved the reply.
    pub answered: bool,
    pub system_prompt: String,
    pub model: String,
    pub owner_id: i64,
    /// The linked related chat, only while the owner still takes part in it.
    pub related_chat_id: Option<i64>,
}

/// One earlier message of the conversation, as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct HistoryMessage {
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
}

/// The reply to store for a user message.
#[derive(Debug, Clone)]
pub struct NewReply<'a> {
    pub content: &'a str,
    /// Token counts as the provider reported them; `None` when it did not.
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub total_tokens: Option<i32>,
    pub model: &'a str,
    pub latency_ms: i32,
}

/// The user message `message_id` with its chat; `None` when it no longer exists (deleted with
/// its chat) or is not a user message.
#[tracing::instrument(skip(db))]
pub async fn find_completion_subject(
    db: impl PgExecutor<'_>,
    message_id: i64,
) -> Result<Option<CompletionSubject>> {
    let subject = sqlx::query_as::<_, CompletionSubject>(
        r#"select m.id as message_id, m.ai_chat_id, m.content, m.status,
                  exists (select 1 from ai_messages r where r.reply_to = m.id) as answered,
                  a.system_prompt, a.model, a.user_id as owner_id,
                  case when exists (select 1 from chat_participants p
                                    where p.chat_id = a.related_chat_id and p.user_id = a.user_id)
                       then a.related_chat_id end as related_chat_id
           from ai_messages m
           join ai_chats a on a.id = m.ai_chat_id
           where m.id = $1 and m.role = $2"#,
    )
    .bind(message_id)
    .bind(role::USER)
    .fetch_optional(db)
    .await?;
    Ok(subject)
}

/// The conversation before user message `before_id`: the latest `limit` user and assistant
/// messages, oldest first.
///
/// Earlier user messages count whatever their status except `failed` (they got no answer and
/// the user saw an error, so the model should not answer them now); queued ones stay, they are
/// part of what the user said. Assistant messages are placed right after the message they
/// answer (`reply_to`), not by their own id, so a reply saved late still follows its question.
///
/// The index `ai_messages_ai_chat_id_turn_idx` is `(ai_chat_id, coalesce(reply_to, id) desc,
/// id desc)`: the scan starts at the newest turn before `before_id` and stops after `limit`
/// rows, whatever the length of the chat. The range condition on the turn is what lets it
/// start there; for user messages (which answer nothing) it is the same as `id < before_id`.
#[tracing::instrument(skip(db))]
pub async fn list_history(
    db: impl PgExecutor<'_>,
    ai_chat_id: i64,
    before_id: i64,
    limit: i64,
) -> Result<Vec<HistoryMessage>> {
    let messages = sqlx::query_as::<_, HistoryMessage>(
        r#"select role, content from (
             select m.id, m.role, m.content, coalesce(m.reply_to, m.id) as turn
             from ai_messages m
             where m.ai_chat_id = $1
               and coalesce(m.reply_to, m.id) < $2
               and ((m.role = $3 and m.id < $2 and m.status <> $5) or m.role = $4)
             order by turn desc, m.id desc
             limit $6
           ) latest
           order by turn, id"#,
    )
    .bind(ai_chat_id)
    .bind(before_id)
    .bind(role::USER)
    .bind(role::ASSISTANT)
    .bind(status::FAILED)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(messages)
}

/// Stores the assistant reply to `user_message_id` and marks the user message `answered`, in
/// one statement (so one round trip and one commit, both writes or neither).
///
/// Returns the new message, or `None` when there is nothing to do: another run of the job
/// already saved a reply (the unique `reply_to` index keeps exactly one), or the user message
/// is gone.
#[tracing::instrument(skip(db, reply), fields(model = reply.model))]
pub async fn save_reply(
    db: impl PgExecutor<'_>,
    user_message_id: i64,
    reply: &NewReply<'_>,
) -> Result<Option<AiMessage>> {
    let saved = sqlx::query_as::<_, AiMessage>(sql!(
        "with m as (
             insert into ai_messages as m (ai_chat_id, role, content, status, prompt_tokens,
                 completion_tokens, total_tokens, model, latency_ms, reply_to)
             select u.ai_chat_id, $2, $3, $4, $5, $6, $7, $8, $9, u.id
             from ai_messages u where u.id = $1
             on conflict (reply_to) where reply_to is not null do nothing
             returning {MESSAGE_COLUMNS}
         ), answered as (
             update ai_messages set status = $10, error = null
             where id = $1 and exists (select 1 from m)
         )
         select * from m"
    ))
    .bind(user_message_id)
    .bind(role::ASSISTANT)
    .bind(reply.content)
    .bind(status::COMPLETE)
    .bind(reply.prompt_tokens)
    .bind(reply.completion_tokens)
    .bind(reply.total_tokens)
    .bind(reply.model)
    .bind(reply.latency_ms)
    .bind(status::ANSWERED)
    .fetch_optional(db)
    .await?;
    Ok(saved)
}

/// Marks a user message `failed` with a user-safe `error`, unless it has been answered in the
/// meantime. Returns whether it changed.
#[tracing::instrument(skip(db))]
pub async fn mark_failed(db: impl PgExecutor<'_>, message_id: i64, error: &str) -> Result<bool> {
    let done = sqlx::query(
        r#"update ai_messages set status = $3, error = $2
           where id = $1 and role = $4 and status <> $5"#,
    )
    .bind(message_id)
    .bind(error)
    .bind(status::FAILED)
    .bind(role::USER)
    .bind(status::ANSWERED)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
