//! User-to-user chats, their participants and their messages.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::domain::{Chat, ChatMessage, ContextMessage, UserSummary};
use crate::error::Result;

struct ChatRow {
    id: i64,
    name: String,
    created_at: DateTime<Utc>,
}

/// A message with its sender: every statement that reads one lists the same columns, `m.id,
/// m.chat_id, m.content, m.timestamp, u.id as sender_id, u.username as sender_username`.
struct MessageRow {
    id: i64,
    chat_id: i64,
    content: String,
    timestamp: DateTime<Utc>,
    sender_id: i64,
    sender_username: String,
}

impl From<MessageRow> for ChatMessage {
    fn from(row: MessageRow) -> Self {
        ChatMessage {
            id: row.id,
            chat: row.chat_id,
            sender: UserSummary {
                id: row.sender_id,
                username: row.sender_username,
            },
            content: row.content,
            timestamp: row.timestamp,
        }
    }
}

/// Attaches participants to chat rows, in two queries whatever the number of chats.
async fn with_participants(conn: &mut PgConnection, rows: Vec<ChatRow>) -> Result<Vec<Chat>> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let participants = sqlx::query!(
        r#"select p.chat_id, u.id, u.username
           from chat_participants p join users u on u.id = p.user_id
           where p.chat_id = any($1)
           order by p.chat_id, u.id"#,
        &ids,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut by_chat: BTreeMap<i64, Vec<UserSummary>> = BTreeMap::new();
    for p in participants {
        by_chat.entry(p.chat_id).or_default().push(UserSummary {
            id: p.id,
            username: p.username,
        });
    }
    Ok(rows
        .into_iter()
        .map(|r| Chat {
            participants: by_chat.remove(&r.id).unwrap_or_default(),
            id: r.id,
            name: r.name,
            created_at: r.created_at,
        })
        .collect())
}

/// The chats `user_id` takes part in, newest first: at most `limit`, with an id below
/// `before_id`.
#[tracing::instrument(skip(conn))]
pub async fn list_chats(
    conn: &mut PgConnection,
    user_id: i64,
    before_id: Option<i64>,
    limit: i64,
) -> Result<Vec<Chat>> {
    let rows = sqlx::query_as!(
        ChatRow,
        r#"select c.id, c.name, c.created_at
           from chats c join chat_participants p on p.chat_id = c.id
           where p.user_id = $1 and c.id < $2
           order by c.id desc limit $3"#,
        user_id,
        before_id.unwrap_or(i64::MAX),
        limit,
    )
    .fetch_all(&mut *conn)
    .await?;
    with_participants(conn, rows).await
}

/// One chat, if `user_id` takes part in it.
#[tracing::instrument(skip(conn))]
pub async fn get_chat(conn: &mut PgConnection, chat_id: i64, user_id: i64) -> Result<Option<Chat>> {
    let row = sqlx::query_as!(
        ChatRow,
        r#"select c.id, c.name, c.created_at
           from chats c join chat_participants p on p.chat_id = c.id
           where c.id = $1 and p.user_id = $2"#,
        chat_id,
        user_id,
    )
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => Ok(with_participants(conn, vec![row]).await?.pop()),
        None => Ok(None),
    }
}

/// Creates a chat with these participants (duplicates ignored). Run it in a transaction.
#[tracing::instrument(skip(conn))]
pub async fn insert_chat(
    conn: &mut PgConnection,
    name: &str,
    participant_ids: &[i64],
) -> Result<Chat> {
    let row = sqlx::query_as!(
        ChatRow,
        r#"insert into chats (name) values ($1) returning id, name, created_at"#,
        name,
    )
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query!(
        r#"insert into chat_participants (chat_id, user_id)
           select $1, unnest($2::bigint[]) on conflict do nothing"#,
        row.id,
        participant_ids,
    )
    .execute(&mut *conn)
    .await?;
    let chat = with_participants(conn, vec![row]).await?.pop();
    Ok(chat.ok_or(sqlx::Error::RowNotFound)?)
}

#[tracing::instrument(skip(db))]
pub async fn is_participant(db: impl PgExecutor<'_>, chat_id: i64, user_id: i64) -> Result<bool> {
    let found = sqlx::query_scalar!(
        r#"select exists (select 1 from chat_participants where chat_id = $1 and user_id = $2)
               as "exists!""#,
        chat_id,
        user_id,
    )
    .fetch_one(db)
    .await?;
    Ok(found)
}

/// Deletes a chat `user_id` takes part in; false when there is none.
#[tracing::instrument(skip(db))]
pub async fn delete_chat(db: impl PgExecutor<'_>, chat_id: i64, user_id: i64) -> Result<bool> {
    let done = sqlx::query!(
        r#"delete from chats c
           where c.id = $1
             and exists (select 1 from chat_participants p where p.chat_id = c.id and p.user_id = $2)"#,
        chat_id,
        user_id,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[tracing::instrument(skip(conn, content))]
pub async fn insert_chat_message(
    conn: &mut PgConnection,
    chat_id: i64,
    sender_id: i64,
    content: &str,
) -> Result<Option<ChatMessage>> {
    let id = sqlx::query_scalar!(
        r#"insert into chat_messages (chat_id, sender_id, content) values ($1, $2, $3) returning id"#,
        chat_id,
        sender_id,
        content,
    )
    .fetch_one(&mut *conn)
    .await?;
    let row = sqlx::query_as!(
        MessageRow,
        r#"select m.id, m.chat_id, m.content, m.timestamp,
                  u.id as sender_id, u.username as sender_username
           from chat_messages m join users u on u.id = m.sender_id
           where m.id = $1"#,
        id,
    )
    .fetch_optional(&mut *conn)
    .await?;
    // `None`: gone between the two statements, its chat deleted meanwhile (the cascade).
    Ok(row.map(ChatMessage::from))
}

/// Messages of a chat, oldest first: at most `limit`, with an id above `after_id`.
#[tracing::instrument(skip(db))]
pub async fn list_chat_messages(
    db: impl PgExecutor<'_>,
    chat_id: i64,
    after_id: Option<i64>,
    limit: i64,
) -> Result<Vec<ChatMessage>> {
    let rows = sqlx::query_as!(
        MessageRow,
        r#"select m.id, m.chat_id, m.content, m.timestamp,
                  u.id as sender_id, u.username as sender_username
           from chat_messages m join users u on u.id = m.sender_id
           where m.chat_id = $1 and m.id > $2 order by m.id limit $3"#,
        chat_id,
        after_id.unwrap_or(0),
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// The latest `limit` messages of a chat as context lines, oldest first.
#[tracing::instrument(skip(db))]
pub async fn latest_context_messages(
    db: impl PgExecutor<'_>,
    chat_id: i64,
    limit: i64,
) -> Result<Vec<ContextMessage>> {
    let rows = sqlx::query_as!(
        ContextMessage,
        r#"select sender, content, timestamp from (
             select m.id, u.username as sender, m.content, m.timestamp
             from chat_messages m join users u on u.id = m.sender_id
             where m.chat_id = $1 order by m.id desc limit $2
           ) latest order by id"#,
        chat_id,
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(rows)
}
