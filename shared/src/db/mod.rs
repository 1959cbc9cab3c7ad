//! PostgreSQL access: the pool, the migrations, and every query, one module per aggregate.
//! Functions take `impl PgExecutor` (or a transaction) so the caller owns the transaction.
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

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
/// Its connections keep one generic plan per prepared statement (`plan_cache_mode =
/// force_generic_plan`) instead of planning every execution afresh. Every query here is a
/// lookup, page or write by key whose best plan does not depend on the values; but for some,
/// PostgreSQL's custom plans look cheaper than the generic one (an `id > $2` looks selective
/// once the value is known; a batch over parameter arrays knows its length), so it never
/// switched and re-planned them on every run: planning was 60 % of the time of the message
/// page query under the reads benchmark, and as long as running the batched reply save
/// (BENCHMARKS.md, fourth session).
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let options = settings
        .database_url
        .expose_secret()
        .parse::<PgConnectOptions>()?
        .options([("plan_cache_mode", "force_generic_plan")]);
    Ok(PgPoolOptions::new()
        .max_connections(settings.database_max_connections)
        .acquire_timeout(Duration::from_secs(settings.database_acquire_timeout_secs))
        .connect_lazy_with(options))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool's connections plan each statement once (see [`pool`]).
    #[tokio::test]
    async fn pooled_connections_keep_generic_plans() {
        let server = std::env::var("TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let settings = DatabaseSettings {
            database_url: format!("{server}/postgres").into(),
            database_max_connections: 1,
            database_acquire_timeout_secs: 5,
        };
        let pool = pool(&settings).expect("pool");
        let mode: String = sqlx::query_scalar("select current_setting('plan_cache_mode')")
            .fetch_one(&pool)
            .await
            .expect("PostgreSQL on TEST_PG_URL");
        assert_eq!(mode, "force_generic_plan");
    }
}
