//! A database of one test: created empty under a unique name, dropped (connections and all)
//! at the end; and what its backends wait for.
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection, PgPool};

use crate::{eventually, pg_base, unique_name};

/// Backends of the database `pool` connects to that wait for a lock while running a statement
/// containing `fragment` (any statement for "").
pub async fn lock_waiters(pool: &PgPool, fragment: &str) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity
         where datname = current_database() and wait_event_type = 'Lock' and query like $1",
    )
    .bind(format!("%{fragment}%"))
    .fetch_one(pool)
    .await
    .expect("read pg_stat_activity")
}

/// Waits (at most 10 s) until such a backend is there: a statement held up by a lock the test
/// holds, the point a test puts a concurrent change at.
pub async fn wait_for_a_lock_waiter(pool: &PgPool, fragment: &str, what: &str) {
    eventually(Duration::from_secs(10), what, || async {
        (lock_waiters(pool, fragment).await > 0).then_some(())
    })
    .await
}

/// An empty, uniquely named database of one test.
pub struct TestDb {
    pub url: String,
    pub name: String,
}

impl TestDb {
    /// Creates `{prefix}_{uuid}` (each suite has its prefix, so a leftover says whose it is).
    pub async fn create(prefix: &str) -> TestDb {
        Self::try_create(prefix)
            .await
            .expect("create the test database")
    }

    /// [`TestDb::create`] for tools that report errors instead of panicking (the benchmark).
    pub async fn try_create(prefix: &str) -> Result<TestDb, sqlx::Error> {
        let name = unique_name(prefix);
        let mut conn = admin().await?;
        conn.execute(sqlx::AssertSqlSafe(format!(r#"create database "{name}""#)))
            .await?;
        let _ = conn.close().await;
        Ok(TestDb {
            url: format!("{}/{name}", pg_base()),
            name,
        })
    }

    /// Cuts every connection to this database except the caller's; returns how many.
    pub async fn terminate_connections(&self) -> i64 {
        let Ok(mut conn) = admin().await else {
            return 0;
        };
        let cut: Result<Vec<(bool,)>, _> = sqlx::query_as(
            "select pg_terminate_backend(pid) from pg_stat_activity
             where datname = $1 and pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_all(&mut conn)
        .await;
        let _ = conn.close().await;
        cut.map(|rows| rows.len() as i64).unwrap_or(0)
    }

    /// Drops the database, closing whatever is still connected to it.
    pub async fn drop_database(&self) {
        drop_database(&self.name).await;
    }
}

/// Drops database `name` if it exists, whoever is connected (best effort).
pub async fn drop_database(name: &str) {
    let _ = try_drop_database(name).await;
}

/// [`drop_database`], with its error.
pub async fn try_drop_database(name: &str) -> Result<(), sqlx::Error> {
    let mut conn = admin().await?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        r#"drop database if exists "{name}" with (force)"#
    )))
    .await?;
    let _ = conn.close().await;
    Ok(())
}

/// Creates the empty database `name` (e.g. again, after [`drop_database`]).
pub async fn create_database(name: &str) {
    let mut conn = admin().await.expect("connect to postgres");
    conn.execute(sqlx::AssertSqlSafe(format!(r#"create database "{name}""#)))
        .await
        .expect("create database");
}

/// A connection to the server's `postgres` database, to create and drop others.
async fn admin() -> Result<PgConnection, sqlx::Error> {
    PgConnection::connect(&format!("{}/postgres", pg_base())).await
}
