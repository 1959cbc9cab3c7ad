//! Checks many tests make, asserted the same way everywhere and naming the case in a failure:
//! an error answer, a refusal of each of many bodies or queries, a link to a chat the user is
//! not in; and a request held at a lock the test holds.
use std::future::Future;
use std::pin::Pin;

use aichat_testkit::postgres::wait_for_a_lock_waiter;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::{TestApp, TestUser};

/// The answer to `what` is an error: `expected`, with the `{"error": "..."}` body every error
/// of the API has; the error's text.
pub fn assert_error<'a>(
    what: &str,
    (status, body): (StatusCode, &'a Value),
    expected: StatusCode,
) -> &'a str {
    assert_eq!(status, expected, "{what}: {body}");
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error text in {body}"))
}

impl TestApp {
    /// Each `(body, field)` sent to `path` is refused with 400 and field errors for `field`.
    pub async fn assert_field_errors(
        &self,
        method: Method,
        path: &str,
        token: &str,
        cases: &[(Value, &str)],
    ) {
        for (body, field) in cases {
            let (status, errors) = self
                .call(method.clone(), path, Some(token), Some(body.clone()))
                .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path} {body}");
            assert!(
                errors[field].is_array(),
                "{method} {path} {body} -> {errors}"
            );
        }
    }

    /// `user` cannot link user-to-user chat `chat`, which they are not a participant of, to
    /// a new AI chat: 400, naming the rule.
    pub async fn assert_cannot_link(&self, user: &TestUser, chat: i64) {
        let body = json!({"title": "x", "related_chat": chat});
        let (status, errors) = self.post("/api/ai/chats/", &user.token, body).await;
        assert_eq!(
            (status, errors),
            (
                StatusCode::BAD_REQUEST,
                json!({"related_chat": ["You must be a participant in the related chat."]})
            )
        );
    }

    /// Every one of `paths`, read with `token`, is refused with 400 and an error object.
    pub async fn assert_bad_queries(
        &self,
        token: &str,
        paths: impl IntoIterator<Item = impl AsRef<str>>,
    ) {
        for path in paths {
            let path = path.as_ref();
            let (status, body) = self.get(path, token).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
            assert!(body.is_object(), "{path}: {body}");
        }
    }
}

impl TestApp {
    /// A transaction holding row `id` of `table` (`for update`), as a branch change or a
    /// deletion holds it: requests that take the row wait until it ends.
    pub async fn holding_row(
        &self,
        table: &str,
        id: i64,
    ) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut lock = self.db.begin().await.expect("begin");
        // `table` is the test's own literal.
        let sql = format!("select 1 from {table} where id = $1 for update");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .execute(&mut *lock)
            .await
            .expect("locking the row");
        lock
    }

    /// Drives `request` until a statement of the app's database waits for a lock (one the test
    /// holds, in `pg_stat_activity`), and leaves it there, unanswered; panics if it is answered
    /// first.
    pub async fn until_it_waits_for_a_lock<F>(&self, request: &mut Pin<Box<F>>)
    where
        F: Future<Output = (StatusCode, Value)>,
    {
        let waiting = wait_for_a_lock_waiter(&self.db, "", "a statement waiting for a lock");
        tokio::select! {
            (status, body) = request.as_mut() => {
                panic!("answered while the lock was held: {status} {body}")
            }
            () = waiting => {}
        }
    }
}
