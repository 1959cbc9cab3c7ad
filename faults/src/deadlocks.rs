//! The deadlocks PostgreSQL counts in a test's database (`pg_stat_database.deadlocks`), read
//! through the server's maintenance database once every connection to the test database has
//! closed, since a backend reports its counts when it goes idle or exits.
use std::time::Duration;

use aichat_testkit::{Api, Env, InProcessWorker, eventually, pg_base};
use sqlx::{Connection, PgConnection};

/// A connection to the server's maintenance database, for what the test database's own
/// connections must not see or hold.
pub async fn maintenance() -> PgConnection {
    PgConnection::connect(&format!("{}/postgres", pg_base()))
        .await
        .expect("connect to postgres")
}

/// Deadlocks PostgreSQL counted in `database`.
pub async fn deadlocks_in(database: &str) -> i64 {
    let mut conn = maintenance().await;
    sqlx::query_scalar("select deadlocks from pg_stat_database where datname = $1")
        .bind(database)
        .fetch_one(&mut conn)
        .await
        .expect("read pg_stat_database")
}

/// Stops the test's APIs and workers, closes every pool to the test database, and answers the
/// deadlocks PostgreSQL counted in it once nothing is connected any more (a backend reports its
/// counts when it exits).
pub async fn stop_and_count_deadlocks(
    env: &Env,
    apis: Vec<Api>,
    workers: Vec<InProcessWorker>,
) -> i64 {
    for api in apis {
        let db = api.state.db.clone();
        api.stop().await;
        db.close().await;
    }
    for worker in workers {
        worker.stop().await;
    }
    env.pool.close().await;
    let database = env.db.name.as_str();
    eventually(
        Duration::from_secs(30),
        "every connection to the test database closed",
        || async move {
            let mut conn = maintenance().await;
            let open: i64 =
                sqlx::query_scalar("select count(*) from pg_stat_activity where datname = $1")
                    .bind(database)
                    .fetch_one(&mut conn)
                    .await
                    .expect("read pg_stat_activity");
            (open == 0).then_some(())
        },
    )
    .await;
    deadlocks_in(database).await
}
