//! `db::Planning::KeyedGeneric`, the planning of the worker's connections and of the API's send
//! writers': a send batch, a claim and a reply save take their rows by key on a young table,
//! where a planner left to the statistics scans it whole (it looks cheaper while it is small,
//! and a generic plan made then is kept as the table grows).
use aichat_fake_llm::FakeConfig;
use aichat_shared::config::DatabaseSettings;
use aichat_shared::db;
use aichat_shared::db::ai_messages::NewUserMessage;
use aichat_shared::db::claims::ClaimRequest;
use aichat_shared::db::completions::NewReply;
use aichat_testkit::{DEFAULT_CONTEXT, Env as TestEnv, store_user_message};

use crate::{reply, request};

/// Tables the hot statements read, whose sequential scans the test counts.
const HOT_TABLES: [&str; 3] = ["ai_chats", "ai_chat_tips", "ai_messages"];

/// A pool of one keyed connection to the test's database.
fn keyed_pool(env: &TestEnv) -> sqlx::PgPool {
    let settings = DatabaseSettings {
        database_url: env.db.url.clone().into(),
        database_max_connections: 1,
        database_acquire_timeout_secs: 5,
        database_ping_after_idle_ms: 0,
    };
    db::pool(
        &settings,
        db::Planning::KeyedGeneric,
        settings.database_max_connections,
    )
    .expect("pool")
}

#[tokio::test]
async fn keyed_connections_take_a_young_tables_rows_by_key() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let mut chats = Vec::new();
    for _ in 0..20 {
        chats.push(env.ai_chat(alice.id, "system", None).await);
    }
    // The statistics of young tables: twenty chats, one page of `ai_chats` and `ai_chat_tips`.
    sqlx::query("analyze")
        .execute(&env.pool)
        .await
        .expect("analyze");

    let keyed = keyed_pool(&env);
    // One transaction, so `pg_stat_xact_user_tables` counts exactly what these statements did.
    let mut tx = keyed.begin().await.expect("begin");
    for round in 0..3 {
        let sends: Vec<NewUserMessage> = chats[..4]
            .iter()
            .map(|&chat| NewUserMessage {
                ai_chat_id: chat,
                user_id: alice.id,
                content: format!("question {round}"),
                options: DEFAULT_CONTEXT,
                budget: None,
            })
            .collect();
        let stored = db::ai_messages::insert_owned_user_messages(&mut *tx, &sends)
            .await
            .expect("send batch");
        let ids: Vec<i64> = stored.iter().flatten().map(|m| m.id).collect();
        assert_eq!(ids.len(), 4, "every send is stored");
        // The batch a worker's jobs claim with, then each alone (as a claim whose row was
        // held is taken).
        let claims: Vec<ClaimRequest> = ids.iter().map(|&id| request(id, None, None)).collect();
        let batch = db::claims::claim_jobs(&mut tx, &claims)
            .await
            .expect("claim batch");
        assert!(batch.iter().flatten().all(|job| job.subject.claimed));
        for &id in &ids {
            let claimed = db::completions::claim_job(&mut *tx, id, None, 20, None)
                .await
                .expect("claim")
                .expect("the message exists");
            assert!(claimed.subject.claimed);
        }
        let replies: Vec<NewReply> = ids.iter().map(|id| reply(&format!("to {id}"))).collect();
        let batch: Vec<(i64, &NewReply)> = ids.iter().copied().zip(replies.iter()).collect();
        let saved = db::completions::save_replies(&mut *tx, &batch)
            .await
            .expect("reply batch");
        assert!(saved.iter().all(Option::is_some), "every reply is saved");
    }
    let (seq_scans, index_scans): (i64, i64) = sqlx::query_as(
        "select coalesce(sum(seq_scan), 0)::bigint, coalesce(sum(idx_scan), 0)::bigint
         from pg_stat_xact_user_tables where relname = any($1)",
    )
    .bind(HOT_TABLES)
    .fetch_one(&mut *tx)
    .await
    .expect("this transaction's scans");
    tx.rollback().await.expect("rollback");
    assert!(index_scans > 0, "the statements ran in this transaction");
    assert_eq!(
        seq_scans, 0,
        "sends, claims and saves on keyed connections never scan a table"
    );
    keyed.close().await;
    env.cleanup().await;
}

/// A failed question in a job's history counts only if it has an active reply: that reply is
/// looked up by the question's key, never by hashing every active message of the table (what
/// a generic plan made on an empty table chose, and kept as the table grew).
#[tokio::test]
async fn a_failed_turn_in_the_history_is_looked_up_by_its_key() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let mut chats = Vec::new();
    for _ in 0..8 {
        chats.push(env.ai_chat(alice.id, "system", None).await);
    }
    // The claims are planned on the keyed connection while the table is empty, as a worker
    // started with a new deployment plans them, and the plans are kept as it grows.
    let keyed = keyed_pool(&env);
    let nothing = request(i64::MAX, None, None);
    let mut conn = keyed.acquire().await.expect("connection");
    db::claims::claim_jobs(&mut conn, &[nothing])
        .await
        .expect("claim batch");
    db::completions::claim_job(&mut *conn, i64::MAX, None, 20, None)
        .await
        .expect("claim");
    drop(conn);
    // Other chats' messages: what hashing every active message would read.
    let others: Vec<NewUserMessage> = (0..400)
        .map(|i| NewUserMessage {
            ai_chat_id: chats[1 + i % 7],
            user_id: alice.id,
            content: format!("other {i}"),
            options: DEFAULT_CONTEXT,
            budget: None,
        })
        .collect();
    db::ai_messages::insert_owned_user_messages(&env.pool, &others)
        .await
        .expect("other chats' messages");
    let failed = store_user_message(&env.pool, chats[0], "failed", DEFAULT_CONTEXT).await;
    db::completions::mark_failed(&env.pool, failed.id, "no")
        .await
        .expect("fail");
    let question = store_user_message(&env.pool, chats[0], "question", DEFAULT_CONTEXT).await;

    let mut tx = keyed.begin().await.expect("begin");
    let claim = request(question.id, None, None);
    let batch = db::claims::claim_jobs(&mut tx, &[claim])
        .await
        .expect("claim batch");
    let alone = db::completions::claim_job(&mut *tx, question.id, None, 20, None)
        .await
        .expect("claim")
        .expect("the message");
    for job in batch.iter().flatten().chain([&alone]) {
        assert!(job.subject.claimed);
        assert!(
            job.history.rows.is_empty(),
            "a failed turn without a reply counts for nothing"
        );
    }
    let fetched: i64 = sqlx::query_scalar(
        "select coalesce(sum(idx_tup_fetch), 0)::bigint from pg_stat_xact_user_tables
         where relname = 'ai_messages'",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("this transaction's rows");
    tx.rollback().await.expect("rollback");
    assert!(
        fetched < 40,
        "two claims read {fetched} messages: the failed turn's reply was not looked up by key"
    );
    keyed.close().await;
    env.cleanup().await;
}
