//! Import of an AI chat's messages from an export (`GET /api/ai/chats/{id}/export/`), as a new
//! tree of the same shape. (An export reads the chat with `ai_chats::get_ai_chat` and
//! `ai_messages::list_chat_messages`: it needs no statement of its own.)
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::domain::{MessageStatus, Role};
use crate::error::Result;

/// One message to import, validated by the caller: what its tree, status and usage were.
#[derive(Debug, Clone)]
pub struct ImportedMessage<'a> {
    /// The message it follows, as its position in the import (0-based; always an earlier
    /// one). For an assistant message, the question it answers.
    pub parent: Option<usize>,
    pub role: Role,
    pub content: &'a str,
    /// `None`: the time of the import.
    pub timestamp: Option<DateTime<Utc>>,
    /// Never `queued` or `answering`: no job answers an imported message.
    pub status: MessageStatus,
    pub error: Option<&'a str>,
    pub model: Option<&'a str>,
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub total_tokens: Option<i32>,
    /// A reply's cost, a decimal string (checked by the caller) in `currency`.
    pub cost: Option<&'a str>,
    pub currency: Option<&'a str>,
    pub stopped: bool,
    pub version: i32,
    pub active: bool,
    /// On a user message, the version its next reply takes or its last reply took
    /// (`reply_version` of `migrations/…_versions.sql`); ignored on replies.
    pub reply_version: i32,
}

/// Stores `messages` in AI chat `ai_chat_id` (new, and the caller's transaction's) in one
/// statement, in input order: their ids are drawn in that order, so each message's parent (an
/// earlier one) gets a smaller id, and `parent_id` (and a reply's `reply_to`) is the id its
/// parent was given. Nothing is queued or dispatched. The number of messages stored.
///
/// The chat is new and no one else can see it before the commit, so the statement locks
/// nothing anyone waits for (the lock order of `db/mod.rs` does not come into it).
#[tracing::instrument(skip_all, fields(ai_chat_id, messages = messages.len()))]
pub async fn insert_imported_messages(
    db: &mut PgConnection,
    ai_chat_id: i64,
    messages: &[ImportedMessage<'_>],
) -> Result<u64> {
    let n = messages.len();
    let mut parents = Vec::with_capacity(n);
    let mut roles = Vec::with_capacity(n);
    let mut contents = Vec::with_capacity(n);
    let mut timestamps = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut prompt_tokens = Vec::with_capacity(n);
    let mut completion_tokens = Vec::with_capacity(n);
    let mut total_tokens = Vec::with_capacity(n);
    let mut stopped = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut active = Vec::with_capacity(n);
    let mut reply_versions = Vec::with_capacity(n);
    let mut costs = Vec::with_capacity(n);
    let mut currencies = Vec::with_capacity(n);
    for m in messages {
        // The ordinal `unnest … with ordinality` gives the parent: 1-based.
        parents.push(m.parent.and_then(|p| i64::try_from(p).ok()).map(|p| p + 1));
        roles.push(m.role.as_str());
        contents.push(m.content);
        timestamps.push(m.timestamp);
        statuses.push(m.status.as_str());
        errors.push(m.error);
        models.push(m.model);
        prompt_tokens.push(m.prompt_tokens);
        completion_tokens.push(m.completion_tokens);
        total_tokens.push(m.total_tokens);
        stopped.push(m.stopped);
        versions.push(m.version);
        active.push(m.active);
        reply_versions.push(m.reply_version);
        costs.push(m.cost);
        currencies.push(m.currency);
    }
    let done = sqlx::query!(
        r#"with input as materialized (
               select t.*, nextval('ai_messages_id_seq'::regclass) as id
               from unnest($2::bigint[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
                           $7::text[], $8::text[], $9::integer[], $10::integer[], $11::integer[],
                           $12::boolean[], $13::integer[], $14::boolean[], $15::integer[],
                           $18::text[], $19::text[])
                    with ordinality as t(parent_ord, role, content, timestamp, status, error,
                                         model, prompt_tokens, completion_tokens, total_tokens,
                                         stopped, version, active, reply_version, cost,
                                         currency, ord)
               order by t.ord
           )
           , tip as (
               -- the chat's next message follows the active path's last question
               update ai_chat_tips set question_id = (
                   select max(id) from input where role = $17 and active)
               where ai_chat_id = $1
           )
           insert into ai_messages (id, ai_chat_id, role, content, timestamp, status, error,
               model, prompt_tokens, completion_tokens, total_tokens, stopped, version, active,
               reply_version, parent_id, reply_to, cost, currency)
           select i.id, $1, i.role, i.content, coalesce(i.timestamp, now()), i.status, i.error,
                  i.model, i.prompt_tokens, i.completion_tokens, i.total_tokens, i.stopped,
                  i.version, i.active, i.reply_version, p.id,
                  case when i.role = $16 then p.id end, i.cost::numeric, i.currency
           from input i left join input p on p.ord = i.parent_ord
           order by i.id"#,
        ai_chat_id,
        parents.as_slice() as &[Option<i64>],
        roles.as_slice() as &[&str],
        // sqlx's check knows `text[]` only as `[String]`; borrowed strings encode the same.
        contents.as_slice() as &[&str],
        timestamps.as_slice() as &[Option<DateTime<Utc>>],
        statuses.as_slice() as &[&str],
        errors.as_slice() as &[Option<&str>],
        models.as_slice() as &[Option<&str>],
        prompt_tokens.as_slice() as &[Option<i32>],
        completion_tokens.as_slice() as &[Option<i32>],
        total_tokens.as_slice() as &[Option<i32>],
        stopped.as_slice() as &[bool],
        versions.as_slice() as &[i32],
        active.as_slice() as &[bool],
        reply_versions.as_slice() as &[i32],
        Role::Assistant.as_str(),
        Role::User.as_str(),
        costs.as_slice() as &[Option<&str>],
        currencies.as_slice() as &[Option<&str>],
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
