//! The versions migration (`migrations/…_versions.sql`) on a database that holds conversations
//! from before it: every one becomes a single active path, with the same ids in the same order.
use aichat_shared::db;
use aichat_shared::db::ai_messages::Branches;
use aichat_testkit::postgres::TestDb;
use sqlx::{Executor, PgPool};

const VERSIONS: i64 = 20261205000001;

/// Applies the migrations older than `VERSIONS` (`true`) or the rest (`false`), each as
/// written, in order.
async fn apply(pool: &PgPool, before: bool) {
    for migration in db::MIGRATOR.iter() {
        if (migration.version < VERSIONS) == before {
            pool.execute(sqlx::AssertSqlSafe(migration.sql.as_str().to_owned()))
                .await
                .unwrap_or_else(|err| panic!("migration {}: {err}", migration.version));
        }
    }
}

#[tokio::test]
async fn existing_conversations_become_one_active_path_with_the_same_ids() {
    let test_db = TestDb::create("aichat_migration").await;
    let pool = PgPool::connect(&test_db.url).await.expect("connect");
    apply(&pool, true).await;
    // Two chats written the old way: in the first, a question sent before the reply to the
    // one before it came, a failed question, a reply saved late; the second has no message.
    let ids: Vec<i64> = sqlx::query_scalar(
        r#"with u as (insert into users (username, password_hash) values ('alice', 'x') returning id),
                c as (insert into ai_chats (user_id, title, system_prompt, model)
                      select id, t, 's', 'm' from u, unnest(array['one', 'two']) t returning id)
           select id from c order by id"#,
    )
    .fetch_all(&pool)
    .await
    .expect("chats");
    let (chat, empty) = (ids[0], ids[1]);
    let insert = async |role: &str, content: &str, status: &str, reply_to: Option<i64>| -> i64 {
        sqlx::query_scalar(
            "insert into ai_messages (ai_chat_id, role, content, status, reply_to)
             values ($1, $2, $3, $4, $5) returning id",
        )
        .bind(chat)
        .bind(role)
        .bind(content)
        .bind(status)
        .bind(reply_to)
        .fetch_one(&pool)
        .await
        .expect("message")
    };
    let q1 = insert("user", "q1", "answered", None).await;
    let q2 = insert("user", "q2", "answered", None).await;
    let a1 = insert("assistant", "a1", "complete", Some(q1)).await;
    let q3 = insert("user", "q3", "failed", None).await;
    let a2 = insert("assistant", "a2", "complete", Some(q2)).await;
    let q4 = insert("user", "q4", "queued", None).await;

    apply(&pool, false).await;

    let rows: Vec<(i64, Option<i64>, i32, bool)> =
        sqlx::query_as("select id, parent_id, version, active from ai_messages order by id")
            .fetch_all(&pool)
            .await
            .expect("messages");
    assert_eq!(
        rows,
        vec![
            (q1, None, 1, true),
            (q2, Some(q1), 1, true),
            (a1, Some(q1), 1, true),
            (q3, Some(q2), 1, true),
            (a2, Some(q2), 1, true),
            (q4, Some(q3), 1, true),
        ]
    );
    // What a client reads: the same messages in the same order, all of them on the path.
    let listed = db::ai_messages::list_chat_messages(&pool, chat, Branches::Active, None, None)
        .await
        .expect("list");
    let listed: Vec<i64> = listed.iter().map(|m| m.id).collect();
    assert_eq!(listed, vec![q1, q2, a1, q3, a2, q4]);
    let none = db::ai_messages::list_chat_messages(&pool, empty, Branches::All, None, None)
        .await
        .expect("list");
    assert!(none.is_empty());
    // The model's history of q4: every earlier turn but the failed one, replies after their
    // questions.
    let history = db::completions::list_history(&pool, q4, 100)
        .await
        .expect("history");
    let history: Vec<&str> = history.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(history, vec!["q1", "a1", "q2", "a2"]);
    pool.close().await;
    test_db.drop_database().await;
}
