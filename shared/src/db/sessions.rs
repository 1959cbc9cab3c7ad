//! Server-side login sessions, stored by the hash of their token.
use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::domain::User;
use crate::error::Result;

#[tracing::instrument(skip(db, token_hash))]
pub async fn insert_session(
    db: impl PgExecutor<'_>,
    user_id: i64,
    token_hash: &[u8],
    expires_at: DateTime<Utc>,
) -> Result<()> {
    sqlx::query!(
        r#"insert into sessions (user_id, token_hash, expires_at) values ($1, $2, $3)"#,
        user_id,
        token_hash,
        expires_at,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// A live session: its user, and when it stops being valid.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LiveSession {
    #[sqlx(flatten)]
    pub user: User,
    pub expires_at: DateTime<Utc>,
    /// The daily token budget staff set for the user (`users.daily_token_budget`); `None`:
    /// the deployment's default. Read with the session so a send needs no query of its own.
    pub daily_token_budget: Option<i64>,
}

/// The user a live (unexpired) session belongs to, with the session's expiry and the user's
/// own daily token budget.
#[tracing::instrument(skip_all)]
pub async fn find_live_session(
    db: impl PgExecutor<'_>,
    token_hash: &[u8],
) -> Result<Option<LiveSession>> {
    let session = sqlx::query!(
        r#"select u.id, u.username, u.email, u.is_staff, s.expires_at, u.daily_token_budget
           from sessions s join users u on u.id = s.user_id
           where s.token_hash = $1 and s.expires_at > now()"#,
        token_hash,
    )
    .map(|row| LiveSession {
        user: User {
            id: row.id,
            username: row.username,
            email: row.email,
            is_staff: row.is_staff,
        },
        expires_at: row.expires_at,
        daily_token_budget: row.daily_token_budget,
    })
    .fetch_optional(db)
    .await?;
    Ok(session)
}

#[tracing::instrument(skip_all)]
pub async fn delete_session(db: impl PgExecutor<'_>, token_hash: &[u8]) -> Result<()> {
    sqlx::query!(r#"delete from sessions where token_hash = $1"#, token_hash)
        .execute(db)
        .await?;
    Ok(())
}

/// Ends every session of one user; returns how many there were.
#[tracing::instrument(skip(db))]
pub async fn delete_user_sessions(db: impl PgExecutor<'_>, user_id: i64) -> Result<u64> {
    let done = sqlx::query!(r#"delete from sessions where user_id = $1"#, user_id)
        .execute(db)
        .await?;
    Ok(done.rows_affected())
}

/// Drops expired sessions of one user, so the table does not grow with every login.
#[tracing::instrument(skip(db))]
pub async fn delete_expired_sessions(db: impl PgExecutor<'_>, user_id: i64) -> Result<u64> {
    let done = sqlx::query!(
        r#"delete from sessions where user_id = $1 and expires_at <= now()"#,
        user_id,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
