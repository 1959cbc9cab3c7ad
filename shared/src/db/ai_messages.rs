//! Messages of AI chats: the user's, waiting or answered, and the model's replies.
//!
//! Every statement that returns an [`AiMessage`] lists its columns the same way: `m.id,
//! m.ai_chat_id as ai_chat, m.role as "role: Role", m.content, m.timestamp, m.prompt_tokens,
//! m.completion_tokens, m.total_tokens, m.status as "status: MessageStatus", m.error,
//! m.model, m.reply_to, m.stopped, m.parent_id, m.version, m.active, m.cost::text as "cost?",
//! m.currency` (the cost as its exact decimal text: no decimal type on this side).
use chrono::NaiveDate;
use sqlx::{PgExecutor, PgPool};

use crate::domain::{AiMessage, ContextOptions, MessageStatus, Role};
use crate::error::Result;

/// A user message to store: the chat it goes to, who sends it, and what its job will need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUserMessage {
    pub ai_chat_id: i64,
    pub user_id: i64,
    pub content: String,
    pub options: ContextOptions,
    /// What the send reserved of its user's daily token budget (`budget::Reservation`): its
    /// UTC day and tokens.
    pub budget: Option<(NaiveDate, i32)>,
}

/// Stores user messages as `queued`, each in a chat its sender owns, in one statement (one
/// round trip, one commit however many messages). Answers one entry per input, in order: the
/// stored message, or `None` when the sender owns no such chat (nothing is stored for it).
///
/// The ids are drawn in input order once the chats are locked, so messages to one chat keep
/// the order they came in, and a chat's ids grow in the order its sends commit.
///
/// Each message follows (`parent_id`) the last question of its chat's active path, or the
/// message before it in the batch, and is on the active path itself (`version` 1: the last
/// question of an active path has no later question in any branch, since a branch switch
/// goes to the newest end of the branch and an edit adds a new last question).
///
/// Locks (the order of `db/mod.rs`): the chat rows `for key share`, then their `ai_chat_tips`
/// rows `for update`, both in id order, and no message row. Sends into one chat take turns on
/// its tip row, so each reads the chat's last question as the one before left it (the lock
/// returns the row's newest version) and moves it to its own last message; reply saves never
/// wait for a send, and a branch change (`db::versions`, `for update` on the chat) waits for
/// the sends in flight and holds new ones off.
/// A chat deleted meanwhile is skipped by the lock (its message is `None`) instead of failing
/// the foreign-key check at the end of the statement. The chat's row is not written: its
/// `updated_at` is read from its newest message (`db::ai_chats`).
#[tracing::instrument(skip_all, fields(messages = messages.len()))]
pub async fn insert_owned_user_messages(
    db: impl PgExecutor<'_>,
    messages: &[NewUserMessage],
) -> Result<Vec<Option<AiMessage>>> {
    let n = messages.len();
    let mut chats = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut contents = Vec::with_capacity(n);
    let mut related = Vec::with_capacity(n);
    let mut limits = Vec::with_capacity(n);
    let mut budget_days = Vec::with_capacity(n);
    let mut budget_tokens = Vec::with_capacity(n);
    for m in messages {
        chats.push(m.ai_chat_id);
        users.push(m.user_id);
        contents.push(m.content.as_str());
        related.push(m.options.include_related_chat_context);
        limits.push(m.options.context_message_limit);
        budget_days.push(m.budget.map(|(day, _)| day));
        budget_tokens.push(m.budget.map(|(_, tokens)| tokens));
    }
    let rows = sqlx::query!(
        r#"with input as materialized (
               select t.*
               from unnest($1::bigint[], $2::bigint[], $3::text[], $4::boolean[], $5::integer[],
                           $8::date[], $9::integer[])
                    with ordinality as t(ai_chat_id, user_id, content, related, context_limit,
                                         budget_day, budget_tokens, ord)
           ),
           owned as materialized (
               -- `id = any` (an index lookup per chat) whatever the planner guesses of the
               -- unnested input: as a join it scanned every chat for each batch
               select a.id, a.user_id from ai_chats a
               where a.id = any($1::bigint[])
                 and (a.id, a.user_id) in (select ai_chat_id, user_id from input)
               order by a.id
               for key share
           ),
           tips as materialized (
               select t.ai_chat_id, t.question_id from ai_chat_tips t
               where t.ai_chat_id = any($1::bigint[]) and t.ai_chat_id in (select id from owned)
               order by t.ai_chat_id
               for update
           ),
           numbered as materialized (
               -- The ids are drawn once every chat is locked (the sort reads the whole join
               -- first, and a volatile output is computed after the sort), in input order: in
               -- a chat, ids follow the order in which sends and edits took its lock.
               select i.*, t.question_id as tip,
                      nextval('ai_messages_id_seq'::regclass) as id
               from input i join owned c on c.id = i.ai_chat_id and c.user_id = i.user_id
               left join tips t on t.ai_chat_id = i.ai_chat_id
               order by i.ord
           ),
           moved as (
               update ai_chat_tips t set question_id = n.last
               from (select ai_chat_id, max(id) as last from numbered group by ai_chat_id) n
               where t.ai_chat_id = n.ai_chat_id
           ),
           m as (
               insert into ai_messages (id, ai_chat_id, role, content, status,
                   include_related_chat_context, context_message_limit, budget_day, budget_tokens,
                   parent_id)
               select i.id, i.ai_chat_id, $6, i.content, $7, i.related, i.context_limit,
                   i.budget_day, i.budget_tokens,
                   coalesce(lag(i.id) over (partition by i.ai_chat_id order by i.id), i.tip)
               from numbered i
               order by i.id
               returning *
           )
           select numbered.ord as "ord!", m.id, m.ai_chat_id as ai_chat, m.role as "role: Role", m.content,
                  m.timestamp, m.prompt_tokens, m.completion_tokens, m.total_tokens, m.status as "status: MessageStatus",
                  m.error, m.model, m.reply_to, m.stopped, m.parent_id, m.version, m.active,
                  m.cost::text as "cost?", m.currency
           from m join numbered on numbered.id = m.id"#,
        &chats,
        &users,
        // sqlx's check knows `text[]` only as `[String]`; borrowed strings encode the same.
        contents.as_slice() as &[&str],
        &related,
        &limits,
        Role::User.as_str(),
        MessageStatus::Queued.as_str(),
        budget_days.as_slice() as &[Option<NaiveDate>],
        budget_tokens.as_slice() as &[Option<i32>],
    )
    .fetch_all(db)
    .await?;
    let mut stored: Vec<Option<AiMessage>> = vec![None; n];
    for row in rows {
        if let Some(slot) = usize::try_from(row.ord)
            .ok()
            .and_then(|ord| ord.checked_sub(1))
            .and_then(|i| stored.get_mut(i))
        {
            *slot = Some(ai_message_of!(row));
        }
    }
    Ok(stored)
}

/// Records that the sweeper queued the message again, so the next sweeps give its new job a
/// full grace period before looking at it (the first job is aged by the message's `timestamp`).
///
/// Committed with `synchronous_commit = off` (local to this statement's transaction, so in one
/// round trip and without waiting for a WAL flush): `dispatched_at` is bookkeeping, not state
/// anything waits on. Losing it in a crash only makes a sweep look at the message early, and a
/// sweep re-queues a message only when its job is no longer alive.
#[tracing::instrument(skip(db))]
pub async fn mark_dispatched(db: impl PgExecutor<'_>, message_id: i64) -> Result<()> {
    sqlx::query!(
        r#"with async_commit as (select set_config('synchronous_commit', 'off', true))
           update ai_messages set dispatched_at = now()
           from async_commit
           where id = $1"#,
        message_id,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Removes messages whose jobs could not be queued, so no message waits for a reply that
/// nothing will produce. Their chats, the chats' tip rows, then the messages are locked in id
/// order first (`db/mod.rs`), as a send and a chat's deletion take them. A message sent after
/// one of them, and the chat's last question if it was one of them, follow what it followed.
#[tracing::instrument(skip(db))]
pub async fn delete_undispatched_messages(db: impl PgExecutor<'_>, ids: &[i64]) -> Result<()> {
    sqlx::query!(
        r#"with recursive chats as materialized (
               select a.id from ai_chats a
               where a.id in (select ai_chat_id from ai_messages where id = any($1))
               order by a.id for key share
           ), tip_rows as materialized (
               -- held before the messages, as a send holds them, so no send follows a
               -- doomed message while it goes (`doomed` counts them: a CTE nothing reads is
               -- never run, and the count runs in full before its first row is locked)
               select t.ai_chat_id from ai_chat_tips t
               where t.ai_chat_id in (select id from chats)
               order by t.ai_chat_id for update
           ), doomed as materialized (
               select m.id, m.parent_id from ai_messages m join chats c on c.id = m.ai_chat_id
               where m.id = any($1) and m.dispatched_at is null
                 and (select count(*) from tip_rows) >= 0
               order by m.id for update of m
           ), up(id, ancestor) as (
               select d.id, d.parent_id from doomed d
               union all
               select up.id, d.parent_id from up join doomed d on d.id = up.ancestor
           ), heirs as materialized (
               -- each doomed message's nearest ancestor that stays (null: none)
               select id, ancestor from up
               where ancestor is null or ancestor not in (select id from doomed)
           ), moved as (
               update ai_messages f set parent_id = h.ancestor
               from heirs h
               where f.parent_id = h.id and f.id not in (select id from doomed)
           ), tips as (
               update ai_chat_tips t set question_id = h.ancestor
               from heirs h
               where t.question_id = h.id and t.ai_chat_id in (select id from chats)
           )
           delete from ai_messages m using doomed where m.id = doomed.id"#,
        ids,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Messages of one chat, oldest first; `after_id` and `limit` page through them.
#[tracing::instrument(skip(db))]
pub async fn list_chat_messages(
    db: impl PgExecutor<'_>,
    ai_chat_id: i64,
    branches: Branches,
    after_id: Option<i64>,
    limit: Option<i64>,
) -> Result<Vec<AiMessage>> {
    chat_page(db, ai_chat_id, None, branches, after_id, limit).await
}

/// A page of a chat's messages; with `owner`, empty unless that user owns the chat. With
/// custom plans (what PostgreSQL runs here) `$5 is null` folds away, and the ownership check is
/// an `exists` run once before the scan (an init plan).
async fn chat_page(
    db: impl PgExecutor<'_>,
    ai_chat_id: i64,
    owner: Option<i64>,
    branches: Branches,
    after_id: Option<i64>,
    limit: Option<i64>,
) -> Result<Vec<AiMessage>> {
    let messages = sqlx::query_as!(
        AiMessage,
        r#"select m.id, m.ai_chat_id as ai_chat, m.role as "role: Role", m.content, m.timestamp,
                  m.prompt_tokens, m.completion_tokens, m.total_tokens, m.status as "status: MessageStatus", m.error,
                  m.model, m.reply_to, m.stopped, m.parent_id, m.version, m.active,
                  m.cost::text as "cost?", m.currency
           from ai_messages m
           where m.ai_chat_id = $1 and m.id > $2 and (m.active or $4)
             and ($5::bigint is null
                  or exists (select 1 from ai_chats a where a.id = $1 and a.user_id = $5))
           order by m.id limit $3"#,
        ai_chat_id,
        after_id.unwrap_or(0),
        limit,
        branches == Branches::All,
        owner,
    )
    .fetch_all(db)
    .await?;
    Ok(messages)
}

/// The user messages of one chat whose reply is streaming or about to (`answering`), oldest
/// first, at most `limit`: whose replies in progress a catching-up socket gets.
#[tracing::instrument(skip(db))]
pub async fn answering_in_chat(
    db: impl PgExecutor<'_>,
    ai_chat_id: i64,
    limit: i64,
) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar!(
        r#"select id from ai_messages
           where ai_chat_id = $1 and status = $2 and role = $3
           order by id limit $4"#,
        ai_chat_id,
        MessageStatus::Answering.as_str(),
        Role::User.as_str(),
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(ids)
}

/// Which messages of a chat a list holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branches {
    /// The active path: what the user sees.
    Active,
    /// Every version of every turn.
    All,
}

/// Messages of one chat `user_id` owns, oldest first, with the ownership check in the page's
/// query; `None` when the user owns no such chat (an owned chat with no messages gives
/// `Some([])`). Only an empty page takes a second query, to tell the two apart.
///
/// The check is an `exists` the planner runs once before the scan (an init plan), not a join:
/// PostgreSQL plans this statement on every run (a custom plan, since `id > $3` makes the
/// generic one look dearer), and planning a lateral join with the chat made a read cost 2.5
/// times the bare page query (BENCHMARKS.md, reads).
#[tracing::instrument(skip(db))]
pub async fn list_owned_chat_messages(
    db: &PgPool,
    ai_chat_id: i64,
    user_id: i64,
    branches: Branches,
    after_id: Option<i64>,
    limit: Option<i64>,
) -> Result<Option<Vec<AiMessage>>> {
    let messages = chat_page(db, ai_chat_id, Some(user_id), branches, after_id, limit).await?;
    if messages.is_empty() && !super::ai_chats::is_owner(db, ai_chat_id, user_id).await? {
        return Ok(None);
    }
    Ok(Some(messages))
}

/// AI messages of a user, oldest first: at most `limit`, with an id above `after_id`.
#[tracing::instrument(skip(db))]
pub async fn list_user_messages(
    db: impl PgExecutor<'_>,
    user_id: i64,
    after_id: Option<i64>,
    limit: i64,
) -> Result<Vec<AiMessage>> {
    let messages = sqlx::query_as!(
        AiMessage,
        r#"select m.id, m.ai_chat_id as ai_chat, m.role as "role: Role", m.content, m.timestamp,
                  m.prompt_tokens, m.completion_tokens, m.total_tokens, m.status as "status: MessageStatus", m.error,
                  m.model, m.reply_to, m.stopped, m.parent_id, m.version, m.active,
                  m.cost::text as "cost?", m.currency
           from ai_messages m join ai_chats a on a.id = m.ai_chat_id
           where a.user_id = $1 and m.id > $2 order by m.id limit $3"#,
        user_id,
        after_id.unwrap_or(0),
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(messages)
}

/// One AI message, only if it belongs to one of `user_id`'s chats.
#[tracing::instrument(skip(db))]
pub async fn get_user_message(
    db: impl PgExecutor<'_>,
    id: i64,
    user_id: i64,
) -> Result<Option<AiMessage>> {
    let message = sqlx::query_as!(
        AiMessage,
        r#"select m.id, m.ai_chat_id as ai_chat, m.role as "role: Role", m.content, m.timestamp,
                  m.prompt_tokens, m.completion_tokens, m.total_tokens, m.status as "status: MessageStatus", m.error,
                  m.model, m.reply_to, m.stopped, m.parent_id, m.version, m.active,
                  m.cost::text as "cost?", m.currency
           from ai_messages m join ai_chats a on a.id = m.ai_chat_id
           where m.id = $1 and a.user_id = $2"#,
        id,
        user_id,
    )
    .fetch_optional(db)
    .await?;
    Ok(message)
}

/// The assistant message answering `user_message_id` in its latest regeneration, once saved:
/// only while the question is `answered`. A regeneration that failed or was stopped points
/// the question back at the reply it showed, which is not that regeneration's answer.
#[tracing::instrument(skip(db))]
pub async fn find_reply(
    db: impl PgExecutor<'_>,
    user_message_id: i64,
) -> Result<Option<AiMessage>> {
    let message = sqlx::query_as!(
        AiMessage,
        r#"select m.id, m.ai_chat_id as ai_chat, m.role as "role: Role", m.content, m.timestamp,
                  m.prompt_tokens, m.completion_tokens, m.total_tokens, m.status as "status: MessageStatus", m.error,
                  m.model, m.reply_to, m.stopped, m.parent_id, m.version, m.active,
                  m.cost::text as "cost?", m.currency
           from ai_messages m join ai_messages q on q.id = m.reply_to
           where m.reply_to = $1 and m.version = q.reply_version and q.status = $2"#,
        user_message_id,
        MessageStatus::Answered.as_str(),
    )
    .fetch_optional(db)
    .await?;
    Ok(message)
}

/// One message by id, whoever owns it.
#[tracing::instrument(skip(db))]
pub async fn find_message(db: impl PgExecutor<'_>, id: i64) -> Result<Option<AiMessage>> {
    let message = sqlx::query_as!(
        AiMessage,
        r#"select m.id, m.ai_chat_id as ai_chat, m.role as "role: Role", m.content, m.timestamp,
                  m.prompt_tokens, m.completion_tokens, m.total_tokens, m.status as "status: MessageStatus", m.error,
                  m.model, m.reply_to, m.stopped, m.parent_id, m.version, m.active,
                  m.cost::text as "cost?", m.currency
           from ai_messages m where m.id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await?;
    Ok(message)
}
