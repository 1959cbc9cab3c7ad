//! Accounts.
use sqlx::PgExecutor;

use crate::domain::{User, UserCredentials, UserSummary};
use crate::error::Result;

/// The unique constraint a duplicate username violates.
pub const USERNAME_TAKEN: &str = "users_username_key";

#[tracing::instrument(skip(db, email, password_hash))]
pub async fn insert_user(
    db: impl PgExecutor<'_>,
    username: &str,
    email: &str,
    password_hash: &str,
    is_staff: bool,
) -> Result<User> {
    let user = sqlx::query_as!(
        User,
        r#"insert into users (username, email, password_hash, is_staff)
           values ($1, $2, $3, $4)
           returning id, username, email, is_staff"#,
        username,
        email,
        password_hash,
        is_staff,
    )
    .fetch_one(db)
    .await?;
    Ok(user)
}

#[tracing::instrument(skip(db))]
pub async fn find_credentials(
    db: impl PgExecutor<'_>,
    username: &str,
) -> Result<Option<UserCredentials>> {
    let row = sqlx::query_as!(
        UserCredentials,
        r#"select id, password_hash from users where username = $1"#,
        username,
    )
    .fetch_optional(db)
    .await?;
    Ok(row)
}

#[tracing::instrument(skip(db))]
pub async fn get_user(db: impl PgExecutor<'_>, id: i64) -> Result<Option<User>> {
    let user = sqlx::query_as!(
        User,
        r#"select id, username, email, is_staff from users where id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await?;
    Ok(user)
}

/// Accounts in id order: at most `limit`, with an id above `after_id`.
#[tracing::instrument(skip(db))]
pub async fn list_users(
    db: impl PgExecutor<'_>,
    after_id: Option<i64>,
    limit: i64,
) -> Result<Vec<UserSummary>> {
    let users = sqlx::query_as!(
        UserSummary,
        r#"select id, username from users where id > $1 order by id limit $2"#,
        after_id.unwrap_or(0),
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(users)
}

/// The ids among `ids` that belong to no account.
#[tracing::instrument(skip(db))]
pub async fn unknown_user_ids(db: impl PgExecutor<'_>, ids: &[i64]) -> Result<Vec<i64>> {
    let unknown = sqlx::query_scalar!(
        r#"select wanted.id as "id!" from unnest($1::bigint[]) as wanted(id)
           where not exists (select 1 from users u where u.id = wanted.id)
           order by wanted.id"#,
        ids,
    )
    .fetch_all(db)
    .await?;
    Ok(unknown)
}

/// The ids of the accounts named in `usernames`; unknown names are skipped.
#[tracing::instrument(skip(db))]
pub async fn ids_by_usernames(db: impl PgExecutor<'_>, usernames: &[String]) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar!(
        r#"select id from users where username = any($1)"#,
        usernames
    )
    .fetch_all(db)
    .await?;
    Ok(ids)
}

/// Whether `username` is staff; `None` when there is no such user.
#[tracing::instrument(skip(db))]
pub async fn staff_status(db: impl PgExecutor<'_>, username: &str) -> Result<Option<bool>> {
    let staff = sqlx::query_scalar!(
        r#"select is_staff from users where username = $1"#,
        username
    )
    .fetch_optional(db)
    .await?;
    Ok(staff)
}

/// Grants or revokes staff rights; false when no such user.
#[tracing::instrument(skip(db))]
pub async fn set_staff(db: impl PgExecutor<'_>, username: &str, is_staff: bool) -> Result<bool> {
    let done = sqlx::query!(
        r#"update users set is_staff = $2 where username = $1"#,
        username,
        is_staff,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
