//! AI chats: one user's conversations with the model.
//!
//! Every statement that returns an [`AiChat`] (here and `admin::search_ai_chats`) spells out
//! the same projection. A chat's `updated_at` is the later of its last edit and its newest user
//! message: it is read, not written by a send, so a send writes no chat row (the lock order in
//! `db/mod.rs`), and ordering by it reads one index entry per chat. `message_count` counts the
//! messages of the chat's active path. `related_chat_name` comes from a left join, and sqlx's inference does not always see that it can be null: the statements
//! say so (`as "related_chat_name?"`).
use chrono::NaiveDate;
use sqlx::{PgExecutor, PgPool};

use crate::domain::AiChat;
use crate::error::Result;

/// The fields of a new AI chat, validated by the caller.
#[derive(Debug, Clone)]
pub struct NewAiChat<'a> {
    pub user_id: i64,
    pub title: &'a str,
    pub system_prompt: &'a str,
    pub related_chat: Option<i64>,
    pub model: &'a str,
}

/// A change to an AI chat: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct AiChatChanges<'a> {
    pub title: Option<&'a str>,
    pub system_prompt: Option<&'a str>,
    /// `Some(None)` unlinks the related chat.
    pub related_chat: Option<Option<i64>>,
    pub model: Option<&'a str>,
}

/// A user's AI chats, most recently updated first (`updated_at` is the derived one of the
/// projection, not the table's): at most `limit`, and with `before_id`, those that come after
/// chat `before_id` in that order (the last of the previous page; a chat deleted since ends the
/// listing).
///
/// The order needs every chat's derived `updated_at` (one index probe each, for its newest
/// question); the page is cut from that, and only the page's chats are counted and joined, so
/// a page costs the user's number of chats, not their number of messages (counting every
/// chat's messages first made a one-chat page of 2,000 chats × 200 messages take 0.5–0.6 s;
/// 14–15 ms now).
#[tracing::instrument(skip(db))]
pub async fn list_ai_chats(
    db: impl PgExecutor<'_>,
    user_id: i64,
    before_id: Option<i64>,
    limit: i64,
) -> Result<Vec<AiChat>> {
    let chats = sqlx::query_as!(
        AiChat,
        r#"with keyed as materialized (
               select a.id,
                      greatest(a.updated_at, (select m.timestamp from ai_messages m
                                              where m.ai_chat_id = a.id and m.role = 'user'
                                              order by m.id desc limit 1)) as updated_at
               from ai_chats a
               where a.user_id = $1
           ), page as materialized (
               select k.id, k.updated_at from keyed k
               where $2::bigint is null
                  or (k.updated_at, k.id) < (select updated_at, id from keyed where id = $2)
               order by k.updated_at desc, k.id desc
               limit $3
           )
           select a.id, a.user_id as "user", u.username as user_username,
                  a.related_chat_id as related_chat, c.name as "related_chat_name?",
                  a.title, a.system_prompt, a.model, a.created_at,
                  p.updated_at as "updated_at!",
                  (select count(*) from ai_messages m
                   where m.ai_chat_id = a.id and m.active) as "message_count!"
           from page p
           join ai_chats a on a.id = p.id
           join users u on u.id = a.user_id
           left join chats c on c.id = a.related_chat_id
           order by p.updated_at desc, p.id desc"#,
        user_id,
        before_id,
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(chats)
}

/// One AI chat, only if `user_id` owns it.
#[tracing::instrument(skip(db))]
pub async fn get_ai_chat(db: impl PgExecutor<'_>, id: i64, user_id: i64) -> Result<Option<AiChat>> {
    let chat = sqlx::query_as!(
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
           where a.id = $1 and a.user_id = $2"#,
        id,
        user_id,
    )
    .fetch_optional(db)
    .await?;
    Ok(chat)
}

#[tracing::instrument(skip_all)]
pub async fn insert_ai_chat(db: impl PgExecutor<'_>, new: &NewAiChat<'_>) -> Result<i64> {
    let id = sqlx::query_scalar!(
        r#"with chat as (
               insert into ai_chats (user_id, title, system_prompt, related_chat_id, model)
               values ($1, $2, $3, $4, $5) returning id
           ), tip as (
               insert into ai_chat_tips (ai_chat_id) select id from chat
           )
           select id as "id!" from chat"#,
        new.user_id,
        new.title,
        new.system_prompt,
        new.related_chat,
        new.model,
    )
    .fetch_one(db)
    .await?;
    Ok(id)
}

/// Applies `changes` to a chat `user_id` owns; false when there is none.
#[tracing::instrument(skip(db, changes))]
pub async fn update_ai_chat(
    db: impl PgExecutor<'_>,
    id: i64,
    user_id: i64,
    changes: &AiChatChanges<'_>,
) -> Result<bool> {
    let done = sqlx::query!(
        r#"update ai_chats set
             title = coalesce($3, title),
             system_prompt = coalesce($4, system_prompt),
             related_chat_id = case when $5 then $6 else related_chat_id end,
             model = coalesce($7, model),
             updated_at = now()
           where id = $1 and user_id = $2"#,
        id,
        user_id,
        changes.title,
        changes.system_prompt,
        changes.related_chat.is_some(),
        changes.related_chat.flatten(),
        changes.model,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Deletes a chat `user_id` owns, with its messages; `None` when there is none, else the
/// budget reservations (day, tokens) its waiting questions held, for the caller to give back:
/// nothing else will (their jobs find the messages gone).
///
/// The chat's row is taken first, then the waiting questions' rows in id order (the lock order
/// of `db/mod.rs`), so the questions read are the ones deleted: a reply save (which takes the
/// chat's row `for key share` first) or a stop (which takes the question's row) that ended one
/// of them either committed before, and the question is no longer waiting, or waits for the
/// deletion and then finds nothing.
#[tracing::instrument(skip(db))]
pub async fn delete_ai_chat(
    db: &PgPool,
    id: i64,
    user_id: i64,
) -> Result<Option<Vec<(NaiveDate, i32)>>> {
    let mut tx = db.begin().await?;
    let owned = sqlx::query_scalar!(
        r#"select id from ai_chats where id = $1 and user_id = $2 for update"#,
        id,
        user_id,
    )
    .fetch_optional(&mut *tx)
    .await?;
    if owned.is_none() {
        return Ok(None);
    }
    let reservations = sqlx::query!(
        r#"select budget_day as "day!", budget_tokens as "tokens!"
           from ai_messages
           where ai_chat_id = $1 and role = 'user' and status in ('queued', 'answering')
             and budget_day is not null and budget_tokens is not null
           order by id
           for update"#,
        id,
    )
    .map(|row| (row.day, row.tokens))
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query!(r#"delete from ai_chats where id = $1"#, id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(reservations))
}

/// Whether `user_id` owns AI chat `id`: the cheap check for routes that need no chat fields.
#[tracing::instrument(skip(db))]
pub async fn is_owner(db: impl PgExecutor<'_>, id: i64, user_id: i64) -> Result<bool> {
    let owns = sqlx::query_scalar!(
        r#"select exists (select 1 from ai_chats where id = $1 and user_id = $2) as "exists!""#,
        id,
        user_id,
    )
    .fetch_one(db)
    .await?;
    Ok(owns)
}
