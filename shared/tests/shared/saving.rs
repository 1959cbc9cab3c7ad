//! Saving replies (`db::completions`): a second reply to one message is a no-op, a batch is
//! aligned with its input, costs are stored with their replies and add up exactly in the
//! usage (`db::usage`, `db::admin`).
use std::collections::BTreeMap;

use aichat_fake_llm::FakeConfig;
use aichat_shared::db;
use aichat_shared::db::completions::NewReply;
use aichat_shared::domain::{AiMessage, ContextOptions};
use aichat_testkit::{Env as TestEnv, MODEL, store_user_message};

const SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// A reply of `model` that cost `cost` (a decimal string) in `currency`, or nothing.
fn priced_reply(content: &str, model: &str, cost: Option<(&str, &str)>) -> NewReply {
    NewReply {
        model: model.to_owned(),
        cost: cost.map(|(cost, _)| cost.to_owned()),
        currency: cost.map(|(_, currency)| currency.to_owned()),
        ..reply_of(content, 1)
    }
}

/// A cost map as the usage gives it.
fn costs(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(currency, cost)| ((*currency).to_owned(), (*cost).to_owned()))
        .collect()
}

/// A reply's `(reply_to, cost, currency)`.
type ReplyCost = (i64, Option<String>, Option<String>);

/// [`ReplyCost`] of every assistant message, as stored, by question.
async fn stored_costs(env: &TestEnv) -> Vec<ReplyCost> {
    sqlx::query_as(
        "select reply_to, cost::text, currency from ai_messages where role = 'assistant'
         order by reply_to",
    )
    .fetch_all(&env.pool)
    .await
    .expect("stored costs")
}

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
        cost: None,
        currency: None,
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

#[tokio::test]
async fn costs_are_stored_with_their_replies_and_add_up_exactly_in_the_usage() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let bob = env.user("bob").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let bobs = env.ai_chat(bob.id, SYSTEM_PROMPT, None).await;
    // Two replies of a model priced in USD (one of them yesterday), one of an unpriced model,
    // one priced in EUR; and bob's, which is not alice's usage.
    let replies = [
        (
            "q1",
            priced_reply("r1", "gpt-priced", Some(("0.00045", "USD"))),
        ),
        (
            "q2",
            priced_reply("r2", "gpt-priced", Some(("0.0003", "USD"))),
        ),
        ("q3", priced_reply("r3", "gpt-free", None)),
        ("q4", priced_reply("r4", "gpt-euro", Some(("0.25", "EUR")))),
    ];
    let mut saved = Vec::new();
    for (question, reply) in &replies {
        let sent = send(&env, chat, question).await;
        let reply = db::completions::save_reply(&env.pool, sent.id, reply)
            .await
            .expect("save")
            .expect("saved");
        saved.push(reply);
    }
    for cost in ["0.65", "0.35"] {
        let question = send(&env, bobs, "q").await;
        db::completions::save_reply(
            &env.pool,
            question.id,
            &priced_reply("r", "gpt-priced", Some((cost, "USD"))),
        )
        .await
        .expect("save")
        .expect("saved");
    }
    sqlx::query("update ai_messages set timestamp = timestamp - interval '1 day' where id = $1")
        .bind(saved[0].id)
        .execute(&env.pool)
        .await
        .expect("move the first reply to yesterday");

    // The saved message, and every read of it, carry its cost; questions carry none.
    let returned: Vec<(Option<&str>, Option<&str>)> = saved
        .iter()
        .map(|m| (m.cost.as_deref(), m.currency.as_deref()))
        .collect();
    assert_eq!(
        returned,
        [
            (Some("0.00045"), Some("USD")),
            (Some("0.0003"), Some("USD")),
            (None, None),
            (Some("0.25"), Some("EUR")),
        ]
    );
    let listed = env.messages(chat).await;
    assert_eq!(listed.len(), 8);
    for m in &listed {
        let expected = saved.iter().find(|s| s.id == m.id);
        assert_eq!(
            (m.cost.as_deref(), m.currency.as_deref()),
            expected.map_or((None, None), |s| (s.cost.as_deref(), s.currency.as_deref())),
            "{m:?}"
        );
    }
    let found = db::ai_messages::find_reply(&env.pool, saved[1].reply_to.expect("reply_to"))
        .await
        .expect("find")
        .expect("found");
    assert_eq!(found.cost.as_deref(), Some("0.0003"));
    assert_eq!(found.currency.as_deref(), Some("USD"));

    let mut conn = env.pool.acquire().await.expect("connection");
    let usage = db::usage::usage_for_user(&mut conn, alice.id)
        .await
        .expect("usage");
    let by_model: Vec<(&str, i64, BTreeMap<String, String>)> = usage
        .by_model
        .iter()
        .map(|m| {
            (
                m.model.as_str(),
                m.totals.message_count,
                m.totals.cost.clone(),
            )
        })
        .collect();
    assert_eq!(
        by_model,
        [
            ("gpt-euro", 1, costs(&[("EUR", "0.25")])),
            ("gpt-free", 1, costs(&[])),
            // 0.00045 + 0.0003, exactly
            ("gpt-priced", 2, costs(&[("USD", "0.00075")])),
        ]
    );
    // The UTC day the replies were saved on (the first one moved to the day before).
    let today = saved[1].timestamp.date_naive();
    let by_day: Vec<(chrono::NaiveDate, i64, BTreeMap<String, String>)> = usage
        .by_day
        .iter()
        .map(|d| (d.day, d.totals.message_count, d.totals.cost.clone()))
        .collect();
    assert_eq!(
        by_day,
        [
            (today, 3, costs(&[("EUR", "0.25"), ("USD", "0.0003")])),
            (
                today.pred_opt().expect("yesterday"),
                1,
                costs(&[("USD", "0.00045")])
            ),
        ]
    );
    assert_eq!(
        usage.total.cost,
        costs(&[("EUR", "0.25"), ("USD", "0.00075")])
    );
    assert_eq!(usage.total.message_count, 4);
    assert_eq!(usage.total.total_tokens, 4 * 12);
    // Someone with no replies: nothing spent.
    let carol = env.user("carol").await;
    let none = db::usage::usage_for_user(&mut conn, carol.id)
        .await
        .expect("usage");
    assert!(none.total.cost.is_empty() && none.by_model.is_empty());
    drop(conn);

    // The staff view: per user, model and day.
    let rows = db::admin::usage_by_user_model_day(&env.pool, 30)
        .await
        .expect("staff usage");
    let mut staff: Vec<(&str, &str, chrono::NaiveDate, BTreeMap<String, String>)> = rows
        .iter()
        .map(|r| (r.username.as_str(), r.model.as_str(), r.day, r.cost.clone()))
        .collect();
    staff.sort();
    let yesterday = today.pred_opt().expect("yesterday");
    assert_eq!(
        staff,
        [
            ("alice", "gpt-euro", today, costs(&[("EUR", "0.25")])),
            ("alice", "gpt-free", today, costs(&[])),
            (
                "alice",
                "gpt-priced",
                yesterday,
                costs(&[("USD", "0.00045")])
            ),
            ("alice", "gpt-priced", today, costs(&[("USD", "0.0003")])),
            // 0.65 + 0.35, without the trailing zeros of the sum's scale
            ("bob", "gpt-priced", today, costs(&[("USD", "1")])),
        ]
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_of_priced_and_unpriced_replies_stores_each_cost_with_its_own_reply() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let other = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let first = send(&env, chat, "first").await;
    let second = send(&env, other, "second").await;
    let third = send(&env, chat, "third").await;
    let (a, b, c) = (
        priced_reply("a", "gpt-priced", Some(("0.000018", "USD"))),
        priced_reply("b", "gpt-free", None),
        // The decimal as the worker wrote it, trailing zero included.
        priced_reply("c", "gpt-euro", Some(("18.50", "EUR"))),
    );
    // Not in id order: each cost must follow its own reply.
    let saved = db::completions::save_replies(
        &env.pool,
        &[(third.id, &c), (first.id, &a), (second.id, &b)],
    )
    .await
    .expect("save the batch");
    let returned: Vec<Option<ReplyCost>> = saved
        .iter()
        .map(|m| {
            m.as_ref()
                .map(|m| (m.reply_to.unwrap_or(0), m.cost.clone(), m.currency.clone()))
        })
        .collect();
    let row = |id: i64, cost: Option<(&str, &str)>| -> ReplyCost {
        (
            id,
            cost.map(|(cost, _)| cost.to_owned()),
            cost.map(|(_, currency)| currency.to_owned()),
        )
    };
    assert_eq!(
        returned,
        [
            Some(row(third.id, Some(("18.50", "EUR")))),
            Some(row(first.id, Some(("0.000018", "USD")))),
            Some(row(second.id, None)),
        ]
    );
    assert_eq!(
        stored_costs(&env).await,
        [
            row(first.id, Some(("0.000018", "USD"))),
            row(second.id, None),
            row(third.id, Some(("18.50", "EUR"))),
        ]
    );
    env.cleanup().await;
}
