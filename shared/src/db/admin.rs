//! Staff views across all users: search, filters, token totals and costs.
use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use sqlx::types::Json;
use utoipa::ToSchema;

use crate::domain::{AiChat, AiMessage, Costs, MessageStatus, Role};
use crate::error::Result;

/// AI chats whose title or owner's username contains `query` (case-insensitive), newest first.
#[tracing::instrument(skip(db, query))]
pub async fn search_ai_chats(
    db: impl PgExecutor<'_>,
    query: &str,
    limit: i64,
) -> Result<Vec<AiChat>> {
    let pattern = format!(
        "%{}%",
        query
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    );
    // The projection of every AI chat statement (`db::ai_chats`). sqlx's not-null marker is
    // part of an output column's name: `order by "updated_at!"` sorts by the derived
    // `updated_at`, not the table's.
    let chats = sqlx::query_as!(
        AiChat,
        r#"select a.id, a.user_id as "user", u.username as user_username,
                  a.related_chat_id as related_chat, c.name as "related_chat_name?",
                  a.title, a.system_prompt, a.model, a.created_at,
                  greatest(a.updated_at, (select m.timestamp from ai_messages m
                                          where m.ai_chat_id = a.id and m.role = 'user'
                                          order by m.id desc limit 1)) as "updated_at!",
                  (select count(*) from ai_messages m where m.ai_chat_id = a.id and m.active) as "message_count!"
           from ai_chats a
           join users u on u.id = a.user_id
           left join chats c on c.id = a.related_chat_id
           where a.title ilike $1 or u.username ilike $1
           order by "updated_at!" desc, a.id desc
           limit $2"#,
        pattern,
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(chats)
}

/// Messages filtered by role and time, newest first.
#[tracing::instrument(skip(db))]
pub async fn filter_messages(
    db: impl PgExecutor<'_>,
    role: Option<&str>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<AiMessage>> {
    let messages = sqlx::query_as!(
        AiMessage,
        r#"select m.id, m.ai_chat_id as ai_chat, m.role as "role: Role", m.content, m.timestamp,
                  m.prompt_tokens, m.completion_tokens, m.total_tokens, m.status as "status: MessageStatus", m.error,
                  m.model, m.reply_to, m.stopped, m.parent_id, m.version, m.active,
                  m.cost::text as "cost?", m.currency
           from ai_messages m
           where ($1::text is null or m.role = $1)
             and ($2::timestamptz is null or m.timestamp >= $2)
             and ($3::timestamptz is null or m.timestamp < $3)
           order by m.id desc limit $4"#,
        role,
        since,
        until,
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(messages)
}

/// Token totals and cost of one user, model and UTC day.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageRow {
    pub user_id: i64,
    pub username: String,
    pub model: String,
    pub day: NaiveDate,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub message_count: i64,
    /// What those messages cost, per currency (currency → exact decimal string); `{}` when
    /// none of them was priced.
    #[schema(example = json!({"USD": "0.00075"}))]
    pub cost: BTreeMap<String, String>,
}

/// Token totals and costs per user, model and day, newest day first.
#[tracing::instrument(skip(db))]
pub async fn usage_by_user_model_day(db: impl PgExecutor<'_>, days: i32) -> Result<Vec<UsageRow>> {
    // Grouped by currency too first, so each currency's cost is one exact `numeric` sum. sqlx's
    // not-null marker is part of an output column's name: `order by "day!"` and
    // `"total_tokens!"` sort by the output columns, each group's day and total.
    let rows = sqlx::query!(
        r#"with per_currency as (
               select a.user_id, coalesce(m.model, 'unknown') as model,
                      (m.timestamp at time zone 'UTC')::date as day, m.currency,
                      coalesce(sum(m.prompt_tokens), 0)::bigint as prompt_tokens,
                      coalesce(sum(m.completion_tokens), 0)::bigint as completion_tokens,
                      coalesce(sum(m.total_tokens), 0)::bigint as total_tokens,
                      count(*) as message_count,
                      sum(m.cost) as cost
               from ai_messages m
               join ai_chats a on a.id = m.ai_chat_id
               where m.role = 'assistant' and m.timestamp >= now() - make_interval(days => $1)
               group by 1, 2, 3, 4
           )
           select u.id as user_id, u.username, p.model as "model!", p.day as "day!",
                  sum(p.prompt_tokens)::bigint as "prompt_tokens!",
                  sum(p.completion_tokens)::bigint as "completion_tokens!",
                  sum(p.total_tokens)::bigint as "total_tokens!",
                  sum(p.message_count)::bigint as "message_count!",
                  coalesce(jsonb_object_agg(p.currency, trim_scale(p.cost)::text)
                               filter (where p.currency is not null and p.cost is not null),
                           '{}') as "cost!: Json<Costs>"
           from per_currency p
           join users u on u.id = p.user_id
           group by 1, 2, 3, 4
           order by "day!" desc, "total_tokens!" desc"#,
        days,
    )
    .map(|row| UsageRow {
        user_id: row.user_id,
        username: row.username,
        model: row.model,
        day: row.day,
        prompt_tokens: row.prompt_tokens,
        completion_tokens: row.completion_tokens,
        total_tokens: row.total_tokens,
        message_count: row.message_count,
        cost: row.cost.0,
    })
    .fetch_all(db)
    .await?;
    Ok(rows)
}

/// The status of each of these messages that still exists (a deleted chat takes its messages).
#[tracing::instrument(skip(db, ids), fields(messages = ids.len()))]
pub async fn message_statuses(
    db: impl PgExecutor<'_>,
    ids: &[i64],
) -> Result<Vec<(i64, MessageStatus)>> {
    let rows = sqlx::query!(
        r#"select id, status as "status: MessageStatus" from ai_messages where id = any($1)"#,
        ids,
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.status)).collect())
}

/// Puts a failed user message back in the queue's hands (its stop request cleared, its
/// dispatch time now: sweeps give the job pushed after this commits a full grace period before
/// they follow its chain, and an API that died before the push is caught after it); false if
/// it is not failed. Its budget
/// reservation was given back when it failed: it now holds none (0 tokens, today), so its reply
/// counts what it uses and gives nothing back a second time.
#[tracing::instrument(skip(db))]
pub async fn requeue_failed_message(db: impl PgExecutor<'_>, message_id: i64) -> Result<bool> {
    let done = sqlx::query!(
        r#"with chat as (
               -- the chat row first (the lock order); its context caches are invalid once the
               -- failed turn waits again (`ai_chats.history_epoch`)
               update ai_chats a set history_epoch = a.history_epoch + 1
               from ai_messages q
               where q.id = $1 and q.role = 'user' and q.status = $3 and a.id = q.ai_chat_id
               returning a.id
           )
           -- answered anew, as a retry is (`stops::requeue`): the reply the failed run was to
           -- give may be stored already (an older reply activated since), and the new one may
           -- not collide with it
           update ai_messages m set status = $2, error = null, stop_requested_at = null,
               dispatched_at = now(), budget_day = (now() at time zone 'utc')::date,
               budget_tokens = 0,
               reply_version = coalesce((select max(r.version) from ai_messages r
                                         where r.reply_to = m.id), 0) + 1
           from chat c
           where m.id = $1 and m.ai_chat_id = c.id and m.role = 'user' and m.status = $3"#,
        message_id,
        MessageStatus::Queued.as_str(),
        MessageStatus::Failed.as_str(),
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
