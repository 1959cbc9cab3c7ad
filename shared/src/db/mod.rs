//! PostgreSQL access: the pool, the migrations, and every query, one module per aggregate.
//! Functions take `impl PgExecutor` (or a transaction) so the caller owns the transaction.
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::Connection;
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::config::DatabaseSettings;

/// SQL assembled from this module's own constants, never from input: sqlx asks that such
/// strings be marked as audited.
macro_rules! sql {
    ($($t:tt)*) => {
        sqlx::AssertSqlSafe(format!($($t)*))
    };
}

pub mod admin;
pub mod ai_chats;
pub mod ai_messages;
pub mod chats;
pub mod completions;
pub mod sessions;
pub mod stale;
pub mod usage;
pub mod users;

pub use sqlx::PgPool as Pool;

/// The schema, embedded in the binaries.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// A connection idle for longer than this is pinged before it is handed out.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// A lazily connecting pool: the process starts even while PostgreSQL is down and requests
/// get 503 until it is back.
///
/// sqlx pings every connection it hands out by default: one more round trip (and a wake-up
/// of the server process) per query. Only a connection that sat idle for a while is pinged
/// now; one in steady use is known to be alive, and if the server dropped it since, that one
/// query fails (503) and the connection is discarded.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(settings.database_max_connections)
        .acquire_timeout(Duration::from_secs(settings.database_acquire_timeout_secs))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IF_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy(settings.database_url.expose_secret())
}

/// Applies every pending migration; a no-op when the schema is current.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// One round trip, for readiness checks.
pub async fn ping(pool: &PgPool) -> crate::error::Result<()> {
    sqlx::query("select 1").execute(pool).await?;
    Ok(())
}
