//! Token use, summed from assistant messages.
use sqlx::PgConnection;

use crate::domain::{DailyUsage, ModelUsage, TokenTotals, Usage};
use crate::error::Result;

const TOTALS: &str = "coalesce(sum(m.prompt_tokens), 0)::bigint as prompt_tokens, \
     coalesce(sum(m.completion_tokens), 0)::bigint as completion_tokens, \
     coalesce(sum(m.total_tokens), 0)::bigint as total_tokens, \
     count(*) as message_count";

const ASSISTANT_OF_USER: &str = "from ai_messages m join ai_chats a on a.id = m.ai_chat_id \
     where a.user_id = $1 and m.role = 'assistant'";

/// One user's totals: overall, per model and per UTC day (newest day first).
#[tracing::instrument(skip(conn))]
pub async fn usage_for_user(conn: &mut PgConnection, user_id: i64) -> Result<Usage> {
    let total = sqlx::query_as::<_, TokenTotals>(sql!("select {TOTALS} {ASSISTANT_OF_USER}"))
        .bind(user_id)
        .fetch_one(&mut *conn)
        .await?;
    let by_model = sqlx::query_as::<_, ModelUsage>(sql!(
        "select coalesce(m.model, 'unknown') as model, {TOTALS} {ASSISTANT_OF_USER}
         group by 1 order by 1"
    ))
    .bind(user_id)
    .fetch_all(&mut *conn)
    .await?;
    let by_day = sqlx::query_as::<_, DailyUsage>(sql!(
        "select (m.timestamp at time zone 'UTC')::date as day, {TOTALS} {ASSISTANT_OF_USER}
         group by 1 order by 1 desc"
    ))
    .bind(user_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Usage {
        total,
        by_model,
        by_day,
    })
}
