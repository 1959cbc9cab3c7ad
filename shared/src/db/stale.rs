//! Queued user messages that may have lost their job: what the worker's sweeper looks at.
use sqlx::PgExecutor;

use crate::domain::ContextOptions;
use crate::error::Result;

/// A user message still waiting (`queued`, or `answering`) after the sweep's grace period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleMessage {
    pub id: i64,
    pub ai_chat_id: i64,
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
        r"select id, ai_chat_id, include_related_chat_context, context_message_limit
          from ai_messages
          where role = 'user' and status in ('queued', 'answering') and id > $1
            and coalesce(dispatched_at, timestamp) < now() - make_interval(secs => $2)
          order by id limit $3",
        after_id,
        grace_secs,
        limit,
    )
    .map(|row| StaleMessage {
        id: row.id,
        ai_chat_id: row.ai_chat_id,
        options: ContextOptions {
            include_related_chat_context: row.include_related_chat_context,
            context_message_limit: row.context_message_limit,
        },
    })
    .fetch_all(db)
    .await?;
    Ok(rows)
}
