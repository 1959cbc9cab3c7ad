//! Versions and branches of a conversation (`migrations/…_versions.sql`): a user's edit of a
//! question, and the switch of the active path to another branch. A regeneration is a requeue
//! of the question (`stops::requeue`) whose reply gets the next version.
//!
//! Each change runs in one transaction that first takes its chat `for update`
//! ([`lock_owned_chat`]): sends into the chat and reply saves (both `for key share`) in flight
//! end first and new ones wait, so the active path it computes is the one they see and extend.
//! Then it writes the chat's tip row and messages, in the order of `db/mod.rs`.
use chrono::NaiveDate;
use sqlx::PgConnection;

use crate::db::stops::Requeued;
use crate::domain::{ContextOptions, MessageStatus, Role};
use crate::error::Result;

/// Locks AI chat `ai_chat_id` for a branch change, if `user_id` owns it; false otherwise.
#[tracing::instrument(skip(db))]
pub async fn lock_owned_chat(db: &mut PgConnection, ai_chat_id: i64, user_id: i64) -> Result<bool> {
    let locked = sqlx::query_scalar!(
        r#"select id from ai_chats where id = $1 and user_id = $2 for update"#,
        ai_chat_id,
        user_id,
    )
    .fetch_optional(db)
    .await?;
    Ok(locked.is_some())
}

/// Whether message `message_id` is on its chat's active path; `None` when there is no such
/// message. Read under the chat's lock ([`lock_owned_chat`]), it is what every branch change
/// committed before says.
#[tracing::instrument(skip(db))]
pub async fn is_active(db: &mut PgConnection, message_id: i64) -> Result<Option<bool>> {
    let active = sqlx::query_scalar!(
        r#"select active from ai_messages where id = $1"#,
        message_id
    )
    .fetch_optional(db)
    .await?;
    Ok(active)
}

/// Stores `content` as a new version of user message `question_id` (of the locked chat
/// `ai_chat_id`): the same parent, the next version among that parent's user messages, the
/// same context options, `queued` with the send's `budget`. `None` when the question is not a
/// user message of that chat that has ended (answered, failed or cancelled). The caller makes
/// the new message's branch the active path ([`activate`]).
#[tracing::instrument(skip(db, content))]
pub async fn insert_edit(
    db: &mut PgConnection,
    ai_chat_id: i64,
    question_id: i64,
    content: &str,
    budget: Option<(NaiveDate, i32)>,
) -> Result<Option<Requeued>> {
    let row = sqlx::query!(
        r#"insert into ai_messages (ai_chat_id, role, content, status, include_related_chat_context,
               context_message_limit, budget_day, budget_tokens, parent_id, version)
           select o.ai_chat_id, o.role, $3, $4, o.include_related_chat_context,
                  o.context_message_limit, $5, $6, o.parent_id,
                  (select max(s.version) from ai_messages s
                   where s.ai_chat_id = o.ai_chat_id and s.role = o.role
                     and s.parent_id is not distinct from o.parent_id) + 1
           from ai_messages o
           where o.id = $1 and o.ai_chat_id = $2 and o.role = $7 and o.status in ($8, $9, $10)
           returning id, ai_chat_id as ai_chat, role as "role: Role", content, timestamp,
                     prompt_tokens, completion_tokens, total_tokens,
                     status as "status: MessageStatus", error, model, reply_to, stopped,
                     parent_id, version, active, cost::text as "cost?", currency,
                     include_related_chat_context,
                     context_message_limit"#,
        question_id,
        ai_chat_id,
        content,
        MessageStatus::Queued.as_str(),
        budget.map(|(day, _)| day),
        budget.map(|(_, tokens)| tokens),
        Role::User.as_str(),
        MessageStatus::Answered.as_str(),
        MessageStatus::Failed.as_str(),
        MessageStatus::Cancelled.as_str(),
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(|row| Requeued {
        options: ContextOptions {
            include_related_chat_context: row.include_related_chat_context,
            context_message_limit: row.context_message_limit,
        },
        message: ai_message_of!(row),
    }))
}

/// Makes the branch through message `message_id` (of the locked chat `ai_chat_id`) the active
/// path: the turns before it (its question's ancestors), its turn, and after it the newest
/// next turn at each step, to the end of that branch. Each of those questions shows one
/// reply: `message_id` itself when it is a reply (remembered as the one it shows,
/// `reply_version`, unless the question waits for a new one), else the one it showed last,
/// else its newest. Every other message of the chat leaves the path; only the messages that
/// change are written. The chat's next message follows the branch's last question
/// (`ai_chat_tips`). False when no such message is in the chat.
#[tracing::instrument(skip(db))]
pub async fn activate(db: &mut PgConnection, ai_chat_id: i64, message_id: i64) -> Result<bool> {
    let found = sqlx::query_scalar!(
        r#"with recursive target as materialized (
               select case when m.role = $3 then m.reply_to else m.id end as question,
                      case when m.role = $3 then m.id end as reply,
                      case when m.role = $3 then m.version end as reply_version
               from ai_messages m where m.id = $1 and m.ai_chat_id = $2
           ), up(id, parent_id) as (
               select q.id, q.parent_id from ai_messages q join target t on q.id = t.question
               union all
               select p.id, p.parent_id from up join ai_messages p on p.id = up.parent_id
           ), down(id, depth) as (
               select t.question, 0 from target t
               union all
               select c.id, down.depth + 1 from down cross join lateral (
                   select c.id from ai_messages c
                   where c.parent_id = down.id and c.role = $4
                   order by c.id desc limit 1
               ) c
           ), tip as (
               -- the end of the branch: what the chat's next message follows
               update ai_chat_tips t
               set question_id = (select id from down order by depth desc limit 1)
               where t.ai_chat_id = $2 and exists (select 1 from target)
           ), epoch as (
               -- the active path changes: the workers' context caches of the chat no longer
               -- hold its history (`ai_chats.history_epoch`)
               update ai_chats a set history_epoch = a.history_epoch + 1
               where a.id = $2 and exists (select 1 from target)
           ), questions as materialized (
               select id from up union select id from down
           ), path as materialized (
               select id from questions
               union all
               select coalesce(
                   (select t.reply from target t where t.question = q.id and t.reply is not null),
                   (select r.id from ai_messages r where r.reply_to = q.id
                    order by r.active desc, r.version = q.reply_version desc, r.version desc
                    limit 1))
               from questions qs join ai_messages q on q.id = qs.id
           ), remembered as materialized (
               -- the question whose reply was chosen, unless it waits for a new reply
               select t.question as id, t.reply_version from target t
               join ai_messages q on q.id = t.question
               where t.reply is not null and q.status not in ($5, $6)
           ), changed as (
               update ai_messages m
               set active = m.id in (select id from path where id is not null),
                   reply_version = coalesce((select r.reply_version from remembered r
                                             where r.id = m.id), m.reply_version)
               where m.ai_chat_id = $2 and exists (select 1 from target)
                 and (m.active <> (m.id in (select id from path where id is not null))
                      or m.id in (select id from remembered))
           )
           select count(*) as "found!" from target"#,
        message_id,
        ai_chat_id,
        Role::Assistant.as_str(),
        Role::User.as_str(),
        MessageStatus::Queued.as_str(),
        MessageStatus::Answering.as_str(),
    )
    .fetch_one(db)
    .await?;
    Ok(found > 0)
}
