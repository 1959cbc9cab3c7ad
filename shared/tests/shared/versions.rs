//! Versions (`migrations/…_versions.sql`): the migration on a database that holds conversations
//! from before it (every one becomes a single active path, with the same ids in the same
//! order), and the parent links of sends kept whole when an unqueued message is removed.
use aichat_shared::db;
use aichat_shared::db::ai_messages::{Branches, NewUserMessage};
use aichat_testkit::DEFAULT_CONTEXT;
use aichat_testkit::postgres::TestDb;
use sqlx::{Executor, PgPool};

use crate::reply;

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
    // The next send follows the chat's last question.
    let owner: i64 = sqlx::query_scalar("select user_id from ai_chats where id = $1")
        .bind(chat)
        .fetch_one(&pool)
        .await
        .expect("owner");
    let next = NewUserMessage {
        ai_chat_id: chat,
        user_id: owner,
        content: "q5".to_owned(),
        options: DEFAULT_CONTEXT,
        budget: None,
    };
    let sent = db::ai_messages::insert_owned_user_messages(&pool, &[next])
        .await
        .expect("send");
    let q5 = sent.into_iter().flatten().next().expect("stored");
    assert_eq!(q5.parent_id, Some(q4));
    pool.close().await;
    test_db.drop_database().await;
}

/// A message removed because its job could not be queued leaves no follower without its
/// place: what followed it follows what it followed.
#[tokio::test]
async fn a_removed_unqueued_message_hands_its_followers_to_its_parent() {
    use aichat_fake_llm::FakeConfig;
    use aichat_testkit::{Env as TestEnv, store_user_message};

    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let chat = env
        .ai_chat(alice.id, "You are a helpful assistant.", None)
        .await;
    let mut sent = Vec::new();
    for content in ["one", "two", "three", "four"] {
        sent.push(store_user_message(&env.pool, chat, content, DEFAULT_CONTEXT).await);
    }
    let parents: Vec<Option<i64>> = sent.iter().map(|m| m.parent_id).collect();
    assert_eq!(
        parents,
        vec![None, Some(sent[0].id), Some(sent[1].id), Some(sent[2].id)]
    );
    // "two" and "three" were never queued: "four" now follows "one".
    db::ai_messages::delete_undispatched_messages(&env.pool, &[sent[1].id, sent[2].id])
        .await
        .expect("delete");
    let left = db::ai_messages::list_chat_messages(&env.pool, chat, Branches::All, None, None)
        .await
        .expect("list");
    let left: Vec<(i64, Option<i64>)> = left.iter().map(|m| (m.id, m.parent_id)).collect();
    assert_eq!(
        left,
        vec![(sent[0].id, None), (sent[3].id, Some(sent[0].id))]
    );
    // "four" removed too: the next send follows "one".
    db::ai_messages::delete_undispatched_messages(&env.pool, &[sent[3].id])
        .await
        .expect("delete");
    let five = store_user_message(&env.pool, chat, "five", DEFAULT_CONTEXT).await;
    assert_eq!(five.parent_id, Some(sent[0].id));
    env.cleanup().await;
}

/// Alice's new chat with one turn: "q1" answered "a1". (alice, chat, q1)
async fn one_answered_turn(
    env: &aichat_testkit::Env,
) -> (
    aichat_shared::domain::User,
    i64,
    aichat_shared::domain::AiMessage,
) {
    let alice = env.user("alice").await;
    let chat = env
        .ai_chat(alice.id, "You are a helpful assistant.", None)
        .await;
    let q1 = aichat_testkit::store_user_message(&env.pool, chat, "q1", DEFAULT_CONTEXT).await;
    db::completions::save_reply(&env.pool, q1.id, &reply("a1"))
        .await
        .expect("save");
    (alice, chat, q1)
}

/// A question whose branch was left while it waited is answered with its own branch's turns;
/// the new branch's question with the active path's.
#[tokio::test]
async fn a_question_off_the_active_path_gets_its_own_branch_as_history() {
    use aichat_fake_llm::FakeConfig;
    use aichat_testkit::{Env as TestEnv, store_user_message};

    let env = TestEnv::start(FakeConfig::default()).await;
    let (alice, chat, q1) = one_answered_turn(&env).await;
    let q2 = store_user_message(&env.pool, chat, "q2", DEFAULT_CONTEXT).await;
    // q1 edited while q2 waits: q2's branch leaves the path.
    let edited = crate::edit(&env, chat, alice.id, q1.id, "q1 again").await;

    let contents = |history: Vec<db::completions::HistoryMessage>| -> Vec<String> {
        history.into_iter().map(|m| m.content).collect()
    };
    let off_path = db::completions::list_history(&env.pool, q2.id, 100)
        .await
        .expect("history");
    assert_eq!(contents(off_path), vec!["q1", "a1"]);
    let on_path = db::completions::list_history(&env.pool, edited.id, 100)
        .await
        .expect("history");
    assert!(contents(on_path).is_empty());
    // A send now follows the edited question, and its history is the new path.
    let q3 = store_user_message(&env.pool, chat, "q3", DEFAULT_CONTEXT).await;
    assert_eq!(q3.parent_id, Some(edited.id));
    let history = db::completions::list_history(&env.pool, q3.id, 100)
        .await
        .expect("history");
    assert_eq!(contents(history), vec!["q1 again"]);
    env.cleanup().await;
}

/// The turns a job reads past what its caller knew (`claim_job`'s `KnownHistory`): only the
/// newer ones while the chat's ended turns stay as they were; all of them again after anything
/// that changes an ended turn (a regeneration, a retry, a staff re-drive, a branch switch).
#[tokio::test]
async fn a_job_reads_only_newer_turns_until_an_ended_turn_changes() {
    use aichat_fake_llm::FakeConfig;
    use aichat_shared::db::completions::KnownHistory;
    use aichat_shared::db::stops::Requeue;
    use aichat_testkit::{Env as TestEnv, store_user_message};

    let env = TestEnv::start(FakeConfig::default()).await;
    let (alice, chat, q1) = one_answered_turn(&env).await;
    let q2 = store_user_message(&env.pool, chat, "q2", DEFAULT_CONTEXT).await;
    db::completions::mark_failed(&env.pool, q2.id, "no")
        .await
        .expect("fail");
    let pool = env.pool.clone();
    // Reads the history of a new question as a job would, knowing `known`; (epoch, the turn
    // the rows start after, the rows' contents).
    let read = async |known: Option<KnownHistory>| {
        let q = store_user_message(&pool, chat, "next", DEFAULT_CONTEXT).await;
        let job = db::completions::claim_job(&pool, q.id, known, 100, None)
            .await
            .expect("claim")
            .expect("the message");
        assert!(job.subject.claimed);
        db::completions::mark_failed(&pool, q.id, "done")
            .await
            .expect("end it");
        let contents: Vec<String> = job
            .history
            .rows
            .iter()
            .map(|r| r.message.content.clone())
            .collect();
        (job.history.epoch, job.history.after_turn, contents)
    };
    let (epoch, after, rows) = read(None).await;
    assert_eq!((after, rows), (0, vec!["q1".to_owned(), "a1".to_owned()]));
    let known = KnownHistory {
        epoch,
        through_turn: q1.id,
    };
    assert_eq!(read(Some(known)).await, (epoch, q1.id, vec![]));

    let regenerate = db::stops::requeue(&env.pool, q1.id, alice.id, None, Requeue::Regenerate)
        .await
        .expect("requeue");
    assert!(regenerate.is_some());
    let (after_regenerate, after, rows) = read(Some(known)).await;
    assert!(after_regenerate > epoch);
    assert_eq!(
        (after, rows.len()),
        (0, 2),
        "the whole history again: {rows:?}"
    );
    db::completions::save_reply(&env.pool, q1.id, &reply("a1 again"))
        .await
        .expect("save");

    let known = KnownHistory {
        epoch: after_regenerate,
        through_turn: q1.id,
    };
    assert_eq!(read(Some(known)).await.1, q1.id, "nothing changed since");
    let retry = db::stops::requeue(&env.pool, q2.id, alice.id, None, Requeue::Retry)
        .await
        .expect("retry");
    assert!(retry.is_some());
    let (after_retry, after, rows) = read(Some(known)).await;
    assert!(after_retry > after_regenerate);
    assert_eq!(after, 0);
    assert_eq!(rows, vec!["q1", "a1 again", "q2"]);
    db::completions::mark_failed(&env.pool, q2.id, "again")
        .await
        .expect("fail");

    let known = KnownHistory {
        epoch: after_retry,
        through_turn: q1.id,
    };
    assert!(
        db::admin::requeue_failed_message(&env.pool, q2.id)
            .await
            .expect("re-drive")
    );
    let (after_redrive, after, _) = read(Some(known)).await;
    assert!(after_redrive > after_retry);
    assert_eq!(after, 0);

    let known = KnownHistory {
        epoch: after_redrive,
        through_turn: q1.id,
    };
    let mut tx = env.pool.begin().await.expect("tx");
    assert!(
        db::versions::lock_owned_chat(&mut tx, chat, alice.id)
            .await
            .expect("lock")
    );
    assert!(
        db::versions::activate(&mut tx, chat, q1.id)
            .await
            .expect("activate")
    );
    tx.commit().await.expect("commit");
    let (after_switch, after, _) = read(Some(known)).await;
    assert!(after_switch > after_redrive);
    assert_eq!(after, 0);
    env.cleanup().await;
}
