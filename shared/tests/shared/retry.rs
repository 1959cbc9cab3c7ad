//! `db::retry::on_conflict` against a real PostgreSQL: the errors it is given are raised by
//! the server with the SQLSTATE PostgreSQL uses for a deadlock or a serialization failure.
use std::sync::atomic::{AtomicU32, Ordering};

use aichat_shared::db::retry::{ATTEMPTS, on_conflict};
use sqlx::PgPool;

/// One connection, so the temporary function below is seen by every statement.
async fn pool() -> PgPool {
    let base = std::env::var("TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{base}/postgres"))
        .await
        .expect("connect to postgres");
    sqlx::query(
        r#"create function pg_temp.raise_planned(code text) returns int
           language plpgsql as $$ begin raise exception 'planned' using errcode = code; end $$"#,
    )
    .execute(&pool)
    .await
    .expect("create the raising function");
    pool
}

/// Has the server raise `sqlstate` when `fail` is true; otherwise answers 1.
async fn statement(pool: &PgPool, sqlstate: &str, fail: bool) -> aichat_shared::error::Result<i32> {
    let query = if fail {
        "select pg_temp.raise_planned($1)"
    } else {
        "select 1 where $1::text is not null"
    };
    let value = sqlx::query_scalar::<_, i32>(query)
        .bind(sqlstate)
        .fetch_one(pool)
        .await?;
    Ok(value)
}

#[tokio::test]
async fn deadlocks_and_serialization_failures_are_run_again_until_they_pass() {
    let pool = pool().await;
    for sqlstate in ["40P01", "40001"] {
        let calls = AtomicU32::new(0);
        let value = on_conflict("test", || {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            statement(&pool, sqlstate, call < 2)
        })
        .await
        .expect("passes on the third try");
        assert_eq!(value, 1);
        assert_eq!(calls.load(Ordering::SeqCst), 3, "{sqlstate}");
    }

    // A conflict that never clears is handed back after ATTEMPTS tries, still a conflict.
    let calls = AtomicU32::new(0);
    let err = on_conflict("test", || {
        calls.fetch_add(1, Ordering::SeqCst);
        statement(&pool, "40P01", true)
    })
    .await
    .expect_err("never passes");
    assert!(err.is_conflict(), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), ATTEMPTS);

    // Anything else is not retried.
    let calls = AtomicU32::new(0);
    let err = on_conflict("test", || {
        calls.fetch_add(1, Ordering::SeqCst);
        statement(&pool, "23505", true)
    })
    .await
    .expect_err("a unique violation");
    assert!(!err.is_conflict(), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
