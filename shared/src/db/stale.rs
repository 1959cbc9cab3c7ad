//! Queued user messages that may have lost their job: what the worker's sweeper looks at.
use sqlx::PgExecutor;

use crate::domain::ContextOptions;
use crate::error::Result;

/// A user message still waiting (`queued`, or `answering`) after the sweep's grace period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleMessage {
    pub id: i64,
    pub ai_chat_id: i64,
    /// The chat's owner: the user the message is answered for.
    pub user_id: i64,
    pub options: ContextOptions,
}

/// User messages waiting (and not re-dispatched) for longer than `grace_secs`, with an id
/// above `after_id`, oldest first, at most `limit`.
#[tracing::instrument(skip(db))]
pub async fn list_stale_queued(
    db: impl PgExecutor<'_>,
    after_id: i64,
    grace_secs: f64,
    limit: i64,
) -> Result<Vec<StaleMessage>> {
    let rows = sqlx::query!(
        r"select m.id, m.ai_chat_id, a.user_id, m.include_related_chat_context,
                 m.context_message_limit
          from ai_messages m
          join ai_chats a on a.id = m.ai_chat_id
          where m.role = 'user' and m.status in ('queued', 'answering') and m.id > $1
            and coalesce(m.dispatched_at, m.timestamp) < now() - make_interval(secs => $2)
          order by m.id limit $3",
        after_id,
        grace_secs,
        limit,
    )
    .map(|row| StaleMessage {
        id: row.id,
        ai_chat_id: row.ai_chat_id,
        user_id: row.user_id,
        options: ContextOptions {
            include_related_chat_context: row.include_related_chat_context,
            context_message_limit: row.context_message_limit,
        },
    })
    .fetch_all(db)
    .await?;
    Ok(rows)
}
