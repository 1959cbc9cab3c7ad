//! The daily token budgets staff set per user (`users.daily_token_budget`), and the users as
//! staff read them with it. The tokens spent against a budget live in Redis (`budget.rs`).
use sqlx::PgExecutor;

use crate::error::Result;

/// A user as the staff's budget views show them: `daily_token_budget` is staff's override
/// (`None`: the deployment's default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserBudget {
    pub id: i64,
    pub username: String,
    pub is_staff: bool,
    pub daily_token_budget: Option<i64>,
}

/// One user with their budget; `None` when there is no such user.
#[tracing::instrument(skip(db))]
pub async fn get_user_budget(db: impl PgExecutor<'_>, user_id: i64) -> Result<Option<UserBudget>> {
    let user = sqlx::query_as!(
        UserBudget,
        r#"select id, username, is_staff, daily_token_budget from users where id = $1"#,
        user_id,
    )
    .fetch_optional(db)
    .await?;
    Ok(user)
}

/// Users with their budgets in id order: at most `limit`, with an id above `after_id`.
#[tracing::instrument(skip(db))]
pub async fn list_user_budgets(
    db: impl PgExecutor<'_>,
    after_id: Option<i64>,
    limit: i64,
) -> Result<Vec<UserBudget>> {
    let users = sqlx::query_as!(
        UserBudget,
        r#"select id, username, is_staff, daily_token_budget from users
           where id > $1 order by id limit $2"#,
        after_id.unwrap_or(0),
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(users)
}

/// Sets (or with `None` clears) the user's own daily token budget; the user as it is now,
/// `None` when there is no such user.
#[tracing::instrument(skip(db))]
pub async fn set_daily_token_budget(
    db: impl PgExecutor<'_>,
    user_id: i64,
    daily_token_budget: Option<i64>,
) -> Result<Option<UserBudget>> {
    let user = sqlx::query_as!(
        UserBudget,
        r#"update users set daily_token_budget = $2 where id = $1
           returning id, username, is_staff, daily_token_budget"#,
        user_id,
        daily_token_budget,
    )
    .fetch_optional(db)
    .await?;
    Ok(user)
}
