//! PostgreSQL access: the pool, the migrations, and every query, one module per aggregate.
//! Functions take `impl PgExecutor` (or a transaction) so the caller owns the transaction.
//!
//! # Lock order
//! Every statement that locks rows of `ai_chats` or `ai_messages` takes them in this order,
//! so no two statements can wait for each other in a cycle:
//! 1. `ai_chats` rows, in ascending id;
//! 2. then their `ai_chat_tips` rows, in ascending chat id;
//! 3. then `ai_messages` rows, in ascending id.
//!
//! A statement that holds a message row never asks for a chat row afterwards. The hot paths
//! take as little as they can:
//! - a send batch (`ai_messages::insert_owned_user_messages`) takes `for key share` on its
//!   chats, then their `ai_chat_tips` rows `for update`, and no message row: sends into one
//!   chat take turns on its tip (each new message follows the one before, `parent_id`), but
//!   never wait for a reply save, and key-share locks never conflict with an edit of a chat's
//!   fields (a chat's `updated_at` is derived from its messages, not written by the send);
//! - a branch change (`versions`: edit, regenerate, activate) takes its chat `for update`,
//!   which waits for the sends and reply saves of that chat in flight and holds new ones off
//!   until it commits, then the messages it changes;
//! - a claim batch (`claims::claim_jobs`) takes its messages `for no key update skip locked`
//!   in id order and nothing else: it never waits while it holds a row (a row it skipped is
//!   claimed afterwards on its own);
//! - a reply batch (`completions::save_replies`) takes `for key share` on the chats, then
//!   the question rows `for no key update`, both in id order, before it writes;
//! - single-row statements (`mark_failed`, `mark_dispatched`, the staff re-drive, a chat's
//!   edit or deletion) hold one row when they wait, so they can close no cycle; deleting a
//!   chat takes its row first and its messages after (the cascade), as the order says;
//! - removing unqueued messages (`delete_undispatched_messages`) locks them in id order.
//!
//! PostgreSQL's deadlock and serialization errors are still retried (`retry::on_conflict`) on
//! every path that writes, so a conflict the order cannot see never reaches a user.
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::DatabaseSettings;

/// The [`AiMessage`](crate::domain::AiMessage) in `$row`, a row of a `query!` that selected
/// the message's columns as `db/ai_messages.rs` lists them. Fields are moved out one by one, so
/// the row's other columns stay usable.
macro_rules! ai_message_of {
    ($row:ident) => {
        crate::domain::AiMessage {
            id: $row.id,
            ai_chat: $row.ai_chat,
            role: $row.role,
            content: $row.content,
            timestamp: $row.timestamp,
            prompt_tokens: $row.prompt_tokens,
            completion_tokens: $row.completion_tokens,
            total_tokens: $row.total_tokens,
            status: $row.status,
            error: $row.error,
            model: $row.model,
            reply_to: $row.reply_to,
            stopped: $row.stopped,
            parent_id: $row.parent_id,
            version: $row.version,
            active: $row.active,
            cost: $row.cost,
            currency: $row.currency,
        }
    };
}

pub mod admin;
pub mod ai_chats;
pub mod ai_messages;
pub mod budgets;
pub mod chats;
pub mod claims;
pub mod completions;
pub mod export;
pub mod retry;
pub mod sessions;
pub mod stale;
pub mod stops;
pub mod usage;
pub mod users;
pub mod versions;

pub use sqlx::PgPool as Pool;

/// The schema, embedded in the binaries.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// How the connections of a pool plan their statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planning {
    /// PostgreSQL's default: a custom plan for each run while custom plans look cheaper than
    /// the generic one. For a process whose statements read by ranges and pages (the API's
    /// lists), whose best plan depends on the values.
    Default,
    /// Each statement is planned once per connection (a generic plan) and never with a
    /// sequential scan. For connections whose statements all take their rows by key (the
    /// worker's: claims, reply saves, single-row updates; the API's send writers': send
    /// batches), so no plan depends on the values or on the statistics of the moment.
    ///
    /// The batched reply save was planned again on every run (its custom plan knows the
    /// batch's length, so the generic one, costed for a guessed length, never looked as cheap):
    /// nearly half of its PostgreSQL time was planning (BENCHMARKS.md, "Cost per answered message").
    /// A generic plan alone is made from the statistics of the moment and kept until the next
    /// ANALYZE: made on a young table it chose sequential scans, even for `id = any(...)`, and
    /// kept them as the table grew (the soak's PostgreSQL CPU doubled when the API's pool was
    /// planned so). Without sequential scans, every such plan is the index lookup it is on a
    /// large table, whatever the table's size when it was made. A custom plan is no safer:
    /// analyzed, a table of a few thousand chats looks cheaper to scan whole than to look up a
    /// batch's chats one by one, and the send batch read every tip row for each batch.
    KeyedGeneric,
}

/// A lazily connecting pool: the process starts even while PostgreSQL is down and requests
/// get 503 until it is back; at most `max_connections` connections, planning statements as
/// `planning` says.
///
/// A connection is checked (a ping, one round trip) before it is handed out when it has been
/// idle for `DATABASE_PING_AFTER_IDLE_MS`, by default always: with connections cut under load
/// (RELIABILITY.md, fault 4) checking only idle ones let 34 of 140 sends and 26 of 96 reads
/// fail with 503 on connections PostgreSQL had dropped, against 2 and 1 with the check, for a
/// cost under load within the noise of the bench (BENCHMARKS.md, "Cost per answered message").
/// A deployment whose connections are never cut may set it.
pub fn pool(
    settings: &DatabaseSettings,
    planning: Planning,
    max_connections: u32,
) -> Result<PgPool, sqlx::Error> {
    let ping_after = Duration::from_millis(settings.database_ping_after_idle_ms);
    let options: PgConnectOptions = settings.database_url.expose_secret().parse()?;
    let options = match planning {
        Planning::Default => options,
        // Startup parameters: set once per connection, no statement of their own.
        Planning::KeyedGeneric => options.options([
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
        ]),
    };
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(settings.database_acquire_timeout_secs))
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= ping_after {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// Applies every pending migration; a no-op when the schema is current.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// One round trip, for readiness checks.
pub async fn ping(pool: &PgPool) -> crate::error::Result<()> {
    sqlx::query_scalar!("select 1").fetch_one(pool).await?;
    Ok(())
}

/// The id of this database (`migrations/…_installation.sql`): new whenever the database is
/// created again, so Redis state of an earlier one in the same namespace is told apart.
pub async fn installation_id(pool: &PgPool) -> crate::error::Result<String> {
    let id = sqlx::query_scalar!(r#"select id::text as "id!" from installation"#)
        .fetch_one(pool)
        .await?;
    Ok(id)
}

/// What to do when `err` (or an error it wraps) is PostgreSQL saying that the database of
/// `DATABASE_URL` does not exist (`3D000`): the command that creates it.
pub fn missing_database_hint(
    settings: &DatabaseSettings,
    err: &(dyn std::error::Error + 'static),
) -> Option<String> {
    let mut next = Some(err);
    let mut missing = false;
    while let Some(cause) = next {
        let sqlx_error = cause.downcast_ref::<sqlx::Error>().or_else(|| {
            match cause.downcast_ref::<sqlx::migrate::MigrateError>() {
                Some(sqlx::migrate::MigrateError::Execute(inner)) => Some(inner),
                _ => None,
            }
        });
        if let Some(sqlx::Error::Database(db)) = sqlx_error
            && db.code().as_deref() == Some("3D000")
        {
            missing = true;
            break;
        }
        next = cause.source();
    }
    if !missing {
        return None;
    }
    let options: PgConnectOptions = settings.database_url.expose_secret().parse().ok()?;
    let name = options.get_database().unwrap_or("postgres");
    Some(format!(
        "The database \"{name}\" named by DATABASE_URL does not exist. Create it with:\n  \
         psql -h {host} -p {port} -U {user} -d postgres -c 'create database \"{name}\"'\n\
         (`scripts/run` creates it for you; the schema is applied when the API starts or by \
         `aichat-api migrate`.)",
        host = options.get_host(),
        port = options.get_port(),
        user = options.get_username(),
    ))
}
