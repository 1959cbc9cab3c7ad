//! Token use and cost, summed from assistant messages.
//!
//! The two statements sum the same columns over the same rows: the assistant messages of the
//! user's chats. Costs are summed per currency by PostgreSQL (`numeric`, exact) and come back as
//! decimal text without trailing zeros (`trim_scale`: a sum takes the finest scale of its
//! parts), so a total is never the sum of rounded parts.
use sqlx::PgConnection;
use sqlx::types::Json;

use crate::domain::{Costs, DailyUsage, ModelUsage, TokenTotals, Usage};
use crate::error::Result;

/// One user's totals: overall, per model and per UTC day (newest day first).
#[tracing::instrument(skip(conn))]
pub async fn usage_for_user(conn: &mut PgConnection, user_id: i64) -> Result<Usage> {
    // Grouped by model and currency first, so each currency's cost is one `numeric` sum; the
    // overall cost per currency is summed from those groups in the same statement (every row
    // carries it), with no further pass over the messages.
    let rows = sqlx::query!(
        r#"with per_currency as materialized (
               select coalesce(m.model, 'unknown') as model, m.currency,
                      coalesce(sum(m.prompt_tokens), 0)::bigint as prompt_tokens,
                      coalesce(sum(m.completion_tokens), 0)::bigint as completion_tokens,
                      coalesce(sum(m.total_tokens), 0)::bigint as total_tokens,
                      count(*) as message_count,
                      sum(m.cost) as cost
               from ai_messages m join ai_chats a on a.id = m.ai_chat_id
               where a.user_id = $1 and m.role = 'assistant'
               group by 1, 2
           )
           select p.model as "model!",
                  sum(p.prompt_tokens)::bigint as "prompt_tokens!",
                  sum(p.completion_tokens)::bigint as "completion_tokens!",
                  sum(p.total_tokens)::bigint as "total_tokens!",
                  sum(p.message_count)::bigint as "message_count!",
                  coalesce(jsonb_object_agg(p.currency, trim_scale(p.cost)::text)
                               filter (where p.currency is not null and p.cost is not null),
                           '{}') as "cost!: Json<Costs>",
                  coalesce((select jsonb_object_agg(t.currency, trim_scale(t.cost)::text)
                            from (select currency, sum(cost) as cost from per_currency
                                  where currency is not null and cost is not null
                                  group by currency) t),
                           '{}') as "total_cost!: Json<Costs>"
           from per_currency p
           group by p.model order by p.model"#,
        user_id,
    )
    .fetch_all(&mut *conn)
    .await?;
    // The same on every row; none when nothing was used.
    let total_cost = rows
        .first()
        .map(|row| row.total_cost.0.clone())
        .unwrap_or_default();
    let by_model: Vec<ModelUsage> = rows
        .into_iter()
        .map(|row| ModelUsage {
            model: row.model,
            totals: TokenTotals {
                prompt_tokens: row.prompt_tokens,
                completion_tokens: row.completion_tokens,
                total_tokens: row.total_tokens,
                message_count: row.message_count,
                cost: row.cost.0,
            },
        })
        .collect();
    let by_day = sqlx::query!(
        r#"with per_currency as (
               select (m.timestamp at time zone 'UTC')::date as day, m.currency,
                      coalesce(sum(m.prompt_tokens), 0)::bigint as prompt_tokens,
                      coalesce(sum(m.completion_tokens), 0)::bigint as completion_tokens,
                      coalesce(sum(m.total_tokens), 0)::bigint as total_tokens,
                      count(*) as message_count,
                      sum(m.cost) as cost
               from ai_messages m join ai_chats a on a.id = m.ai_chat_id
               where a.user_id = $1 and m.role = 'assistant'
               group by 1, 2
           )
           select p.day as "day!",
                  sum(p.prompt_tokens)::bigint as "prompt_tokens!",
                  sum(p.completion_tokens)::bigint as "completion_tokens!",
                  sum(p.total_tokens)::bigint as "total_tokens!",
                  sum(p.message_count)::bigint as "message_count!",
                  coalesce(jsonb_object_agg(p.currency, trim_scale(p.cost)::text)
                               filter (where p.currency is not null and p.cost is not null),
                           '{}') as "cost!: Json<Costs>"
           from per_currency p
           group by p.day order by p.day desc"#,
        user_id,
    )
    .map(|row| DailyUsage {
        day: row.day,
        totals: TokenTotals {
            prompt_tokens: row.prompt_tokens,
            completion_tokens: row.completion_tokens,
            total_tokens: row.total_tokens,
            message_count: row.message_count,
            cost: row.cost.0,
        },
    })
    .fetch_all(&mut *conn)
    .await?;
    // The overall token totals are the sum of the per-model ones (integers, exact): no third
    // pass over the rows.
    let total = by_model
        .iter()
        .fold(TokenTotals::default(), |sum, model| TokenTotals {
            prompt_tokens: sum.prompt_tokens + model.totals.prompt_tokens,
            completion_tokens: sum.completion_tokens + model.totals.completion_tokens,
            total_tokens: sum.total_tokens + model.totals.total_tokens,
            message_count: sum.message_count + model.totals.message_count,
            cost: Costs::new(),
        });
    Ok(Usage {
        total: TokenTotals {
            cost: total_cost,
            ..total
        },
        by_model,
        by_day,
    })
}
