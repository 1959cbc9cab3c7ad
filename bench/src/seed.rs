//! Test data written straight to the database (no argon2 per user): users with a live
//! session token each, their AI chats, and bulk message history.
use aichat_shared::db;
use aichat_shared::db::ai_chats::NewAiChat;
use anyhow::Context;
use chrono::{Duration, Utc};
use futures::{StreamExt, TryStreamExt};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// A seeded user: the bearer token the API accepts, and its AI chats.
#[derive(Debug, Clone)]
pub struct Account {
    pub token: String,
    pub chats: Vec<i64>,
}

/// `users` users named `{prefix}-{i}`, each with a session and `chats_per_user` AI chats
/// (seeded eight at a time, returned in order), then refreshes the planner's statistics.
///
/// A deployment's tables have statistics that match them; a bench's grow from nothing in a
/// minute, and a statement planned once (a cached generic plan) while a table was a few pages
/// keeps the scan of that table it chose then until the table is analyzed: the send batch
/// scanned every chat for each batch until the end of the pipeline. ANALYZE also makes the
/// cached plans of the stack's open connections planned again.
pub async fn accounts(
    db: &PgPool,
    prefix: &str,
    users: usize,
    chats_per_user: usize,
) -> anyhow::Result<Vec<Account>> {
    let accounts = futures::stream::iter(0..users)
        .map(|i| account(db, format!("{prefix}-{i}"), chats_per_user))
        .buffered(8)
        .try_collect()
        .await?;
    sqlx::query("analyze users, sessions, ai_chats, ai_chat_tips")
        .execute(db)
        .await
        .context("analyzing the seeded tables")?;
    Ok(accounts)
}

async fn account(db: &PgPool, name: String, chats_per_user: usize) -> anyhow::Result<Account> {
    // Not a valid argon2 hash: these users cannot log in, only use their session.
    let user = db::users::insert_user(db, &name, "", "!bench", false)
        .await
        .with_context(|| format!("inserting user {name}"))?;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let hash = Sha256::digest(token.as_bytes()).to_vec();
    db::sessions::insert_session(db, user.id, &hash, Utc::now() + Duration::days(1)).await?;
    let mut chats = Vec::with_capacity(chats_per_user);
    for c in 0..chats_per_user {
        let title = format!("bench chat {c}");
        let new = NewAiChat {
            user_id: user.id,
            title: &title,
            system_prompt: "You are a benchmark.",
            related_chat: None,
            model: "gpt-3.5-turbo",
        };
        chats.push(db::ai_chats::insert_ai_chat(db, &new).await?);
    }
    Ok(Account { token, chats })
}

/// Adds `n` answered messages (alternating user / assistant) to a chat in one statement, then
/// refreshes the planner's statistics.
pub async fn history(db: &PgPool, ai_chat_id: i64, n: i64) -> anyhow::Result<()> {
    sqlx::query(
        "insert into ai_messages (ai_chat_id, role, content, status, timestamp, dispatched_at)
         select $1,
                case when g % 2 = 1 then 'user' else 'assistant' end,
                'seeded message ' || g || ': lorem ipsum dolor sit amet, consectetur adipiscing elit',
                case when g % 2 = 1 then 'answered' else 'complete' end,
                now() - make_interval(secs => ($2 - g)::double precision),
                now()
         from generate_series(1, $2) g",
    )
    .bind(ai_chat_id)
    .bind(n)
    .execute(db)
    .await
    .context("seeding messages")?;
    sqlx::query("analyze ai_messages").execute(db).await?;
    Ok(())
}

/// Id such that `after_id=<it>&limit=50` returns a chat's latest 50 messages.
pub async fn latest_50_after(db: &PgPool, ai_chat_id: i64) -> anyhow::Result<i64> {
    let id: Option<i64> = sqlx::query_scalar(
        "select id from ai_messages where ai_chat_id = $1 order by id desc offset 50 limit 1",
    )
    .bind(ai_chat_id)
    .fetch_optional(db)
    .await?;
    Ok(id.unwrap_or(0))
}
