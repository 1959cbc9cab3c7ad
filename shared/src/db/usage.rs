//! Token use, summed from assistant messages.
//!
//! The three statements sum the same columns over the same rows: the assistant messages of the
//! user's chats.
use sqlx::PgConnection;

use crate::domain::{DailyUsage, ModelUsage, TokenTotals, Usage};
use crate::error::Result;

/// One user's totals: overall, per model and per UTC day (newest day first).
#[tracing::instrument(skip(conn))]
pub async fn usage_for_user(conn: &mut PgConnection, user_id: i64) -> Result<Usage> {
    let by_model = sqlx::query!(
        r#"select coalesce(m.model, 'unknown') as "model!",
                  coalesce(sum(m.prompt_tokens), 0)::bigint as "prompt_tokens!",
                  coalesce(sum(m.completion_tokens), 0)::bigint as "completion_tokens!",
                  coalesce(sum(m.total_tokens), 0)::bigint as "total_tokens!",
                  count(*) as "message_count!"
           from ai_messages m join ai_chats a on a.id = m.ai_chat_id
           where a.user_id = $1 and m.role = 'assistant'
           group by 1 order by 1"#,
        user_id,
    )
    .map(|row| ModelUsage {
        model: row.model,
        totals: TokenTotals {
            prompt_tokens: row.prompt_tokens,
            completion_tokens: row.completion_tokens,
            total_tokens: row.total_tokens,
            message_count: row.message_count,
        },
    })
    .fetch_all(&mut *conn)
    .await?;
    let by_day = sqlx::query!(
        r#"select (m.timestamp at time zone 'UTC')::date as "day!",
                  coalesce(sum(m.prompt_tokens), 0)::bigint as "prompt_tokens!",
                  coalesce(sum(m.completion_tokens), 0)::bigint as "completion_tokens!",
                  coalesce(sum(m.total_tokens), 0)::bigint as "total_tokens!",
                  count(*) as "message_count!"
           from ai_messages m join ai_chats a on a.id = m.ai_chat_id
           where a.user_id = $1 and m.role = 'assistant'
           group by 1 order by 1 desc"#,
        user_id,
    )
    .map(|row| DailyUsage {
        day: row.day,
        totals: TokenTotals {
            prompt_tokens: row.prompt_tokens,
            completion_tokens: row.completion_tokens,
            total_tokens: row.total_tokens,
            message_count: row.message_count,
        },
    })
    .fetch_all(&mut *conn)
    .await?;
    // The overall totals are the sum of the per-model ones: no third pass over the rows.
    let total = by_model
        .iter()
        .fold(TokenTotals::default(), |sum, model| TokenTotals {
            prompt_tokens: sum.prompt_tokens + model.totals.prompt_tokens,
            completion_tokens: sum.completion_tokens + model.totals.completion_tokens,
            total_tokens: sum.total_tokens + model.totals.total_tokens,
            message_count: sum.message_count + model.totals.message_count,
        });
    Ok(Usage {
        total,
        by_model,
        by_day,
    })
}
