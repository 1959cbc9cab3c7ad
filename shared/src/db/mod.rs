//! PostgreSQL access: the pool, the migrations, and every query, one module per aggregate.
//! Functions take `impl PgExecutor` (or a transaction) so the caller owns the transaction.
use std::time::Duration;

use secrecy::ExposeSecret;
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

/// A lazily connecting pool: the process starts even while PostgreSQL is down and requests
/// get 503 until it is back.
///
/// Statements keep PostgreSQL's default plan caching (custom plans while they look cheaper).
/// Forcing generic plans removed the planning time of the message page and of the batched
/// reply save, but a generic plan is made from the statistics of the moment and kept until
/// the next ANALYZE: made on a young table it scanned and sorted whole chats, and the soak's
/// PostgreSQL CPU doubled (BENCHMARKS.md, fourth session).
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(settings.database_max_connections)
        .acquire_timeout(Duration::from_secs(settings.database_acquire_timeout_secs))
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
