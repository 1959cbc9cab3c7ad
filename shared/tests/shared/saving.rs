//! Saving replies (`db::completions`): a second reply to one message is a no-op, a batch is
//! aligned with its input.
use aichat_fake_llm::FakeConfig;
use aichat_shared::db;
use aichat_shared::db::completions::NewReply;
use aichat_shared::domain::{AiMessage, ContextOptions};
use aichat_testkit::{Env as TestEnv, MODEL, store_user_message};

const SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// A queued user message of the chat's owner, stored as the API stores it.
async fn send(env: &TestEnv, chat: i64, content: &str) -> AiMessage {
    let options = ContextOptions {
        include_related_chat_context: false,
        context_message_limit: 20,
    };
    store_user_message(&env.pool, chat, content, options).await
}

/// A reply as a job would save it; its question is said to count `tokens + 100`.
fn reply_of(content: &str, tokens: i32) -> NewReply {
    NewReply {
        content: content.to_owned(),
        prompt_tokens: Some(10),
        completion_tokens: Some(2),
        total_tokens: Some(12),
        model: MODEL.to_owned(),
        latency_ms: 5,
        content_tokens: Some(tokens),
        question_tokens: Some(tokens + 100),
        stopped: false,
    }
}

#[tokio::test]
async fn saving_a_second_reply_to_the_same_message_is_a_no_op() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let sent = send(&env, chat, "hi").await;
    let reply = |content: &str| reply_of(content, 1);
    let mut tx = env.pool.begin().await.expect("tx");
    let first = db::completions::save_reply(&mut *tx, sent.id, &reply("one"))
        .await
        .expect("save");
    tx.commit().await.expect("commit");
    let mut tx = env.pool.begin().await.expect("tx");
    let second = db::completions::save_reply(&mut *tx, sent.id, &reply("two"))
        .await
        .expect("save again");
    tx.commit().await.expect("commit");
    assert!(first.is_some());
    assert!(second.is_none());
    // A failure reported after the answer does not overwrite it.
    assert!(
        !db::completions::mark_failed(&env.pool, sent.id, "late failure")
            .await
            .expect("mark failed")
    );
    let stored = env.messages(chat).await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].status, "answered");
    assert_eq!(stored[1].content, "one");
    // A deleted message: nothing to save, no error.
    sqlx::query("delete from ai_messages where ai_chat_id = $1")
        .bind(chat)
        .execute(&env.pool)
        .await
        .expect("delete");
    let mut tx = env.pool.begin().await.expect("tx");
    let gone = db::completions::save_reply(&mut *tx, sent.id, &reply("three"))
        .await
        .expect("save for a deleted message");
    assert!(gone.is_none());
    tx.rollback().await.expect("rollback");
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_of_replies_is_saved_in_one_statement_aligned_with_its_input() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let other = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let first = send(&env, chat, "first").await;
    let second = send(&env, other, "second").await;
    let (a, b, dup, missing) = (
        reply_of("a", 1),
        reply_of("b", 2),
        reply_of("dup", 3),
        reply_of("x", 4),
    );
    // Input order is not id order; a message asked twice and one that does not exist.
    let saved = db::completions::save_replies(
        &env.pool,
        &[
            (second.id, &b),
            (first.id, &a),
            (second.id, &dup),
            (i64::MAX, &missing),
        ],
    )
    .await
    .expect("save the batch");
    let got: Vec<Option<(i64, String)>> = saved
        .iter()
        .map(|m| {
            m.as_ref()
                .map(|m| (m.reply_to.unwrap_or(0), m.content.clone()))
        })
        .collect();
    assert_eq!(
        got,
        [
            Some((second.id, "b".to_owned())),
            Some((first.id, "a".to_owned())),
            None,
            None
        ]
    );
    let rows: Vec<(i64, String, String, Option<i32>)> = sqlx::query_as(
        "select ai_chat_id, content, status, content_tokens from ai_messages order by id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("rows");
    assert_eq!(
        rows,
        [
            (chat, "first".to_owned(), "answered".to_owned(), Some(101)),
            (other, "second".to_owned(), "answered".to_owned(), Some(102)),
            // Written in the order of the messages they answer.
            (chat, "a".to_owned(), "complete".to_owned(), Some(1)),
            (other, "b".to_owned(), "complete".to_owned(), Some(2)),
        ]
    );
    // Saving again stores nothing and changes nothing.
    let again = db::completions::save_replies(&env.pool, &[(first.id, &dup)])
        .await
        .expect("save again");
    assert!(again[0].is_none());
    assert_eq!(env.messages(chat).await.len(), 2);
    env.cleanup().await;
}
