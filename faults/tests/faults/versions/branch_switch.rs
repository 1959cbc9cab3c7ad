//! A regenerated reply saved while a branch switch holds the chat: the interleaving the race
//! in `races.rs` finds now and then, made to happen every time.
use std::time::Duration;

use aichat_fake_llm::{FakeConfig, Outcome};
use aichat_faults::{Client, Env, HEAVY, report};
use aichat_testkit::postgres::wait_for_a_lock_waiter;
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::{active_path, all_messages, answered_with_version, chain_problems, regenerate, tree};

/// The interleaving the race of `races.rs` finds now and then, made to happen every time: a
/// regenerated reply is saved while a branch switch that brings its question back onto the
/// active path holds the chat. The save (`completions::save_replies`) takes its statement's
/// snapshot, waits for the chat, then marks its reply active and the question's other active
/// replies inactive: the question must end with exactly one active reply, the new one.
///
/// How: Q1 → Q2 (reply R2), Q2 edited into Q2' (reply R2'). Q2 is regenerated (its branch
/// becomes the active one) and the model holds that call for 5 s; meanwhile Q2' is activated
/// (Q2 and R2 leave the path), then Q2 is activated again while the test holds R2''s row, so
/// that switch stops after taking the chat, with R2 made active but not committed. The model
/// answers, the save waits for the chat; the test lets the switch commit, then the save runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reply_saved_while_a_branch_switch_holds_the_chat_is_the_one_active_reply() {
    let _heavy = HEAVY.lock().await;
    let env = Env::start(FakeConfig::default()).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let worker = env.ready_worker(&[]).await;
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "switching").await;
    let q1 = client.send_ok(&alice, chat, "first question").await;
    answered_with_version(&client, &alice, chat, q1, 1).await;
    let q2 = client.send_ok(&alice, chat, "second question").await;
    let r2 = answered_with_version(&client, &alice, chat, q2, 1).await[0].clone();
    let edited = client
        .post(
            &format!("/api/ai/messages/{q2}/edit/"),
            &alice.token,
            json!({"content": "second question, edited"}),
        )
        .await;
    assert_eq!(edited.status, StatusCode::ACCEPTED, "{}", edited.body);
    let q2e = edited.body["message"]["id"].as_i64().expect("edit id");
    let r2e = answered_with_version(&client, &alice, chat, q2e, 1).await[0]["id"]
        .as_i64()
        .expect("reply id");

    let calls_before = env.fake.requests().len();
    env.fake.push_script([Outcome::Slow { latency_ms: 5000 }]);
    let answer = regenerate(&client, &alice, q2, None)
        .await
        .expect("regenerate");
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    env.fake
        .wait_for_requests(calls_before + 1, Duration::from_secs(10))
        .await;
    let activate = |id: i64| format!("/api/ai/messages/{id}/activate/");
    let away = client.post(&activate(q2e), &alice.token, json!({})).await;
    assert_eq!(away.status, StatusCode::OK, "{}", away.body);

    let mut hold = env.pool.begin().await.expect("begin");
    sqlx::query("select id from ai_messages where id = $1 for update")
        .bind(r2e)
        .execute(&mut *hold)
        .await
        .expect("lock R2'");
    let back = {
        let (base, token, path) = (api.base.clone(), alice.token.clone(), activate(q2));
        tokio::spawn(async move {
            let client = Client::for_base(&base, Duration::from_secs(30));
            client.post(&path, &token, json!({})).await
        })
    };
    wait_for_a_lock_waiter(
        &env.pool,
        "with recursive target",
        "the switch back holds the chat",
    )
    .await;
    let call = env.fake.requests().pop().expect("the regeneration's call");
    assert!(
        !call.stream_ended,
        "the set-up took longer than the model's 5 s: {call:?}"
    );
    wait_for_a_lock_waiter(
        &env.pool,
        // PostgreSQL shows a statement's first 1 kB: the opening of `save_replies`'s.
        "select distinct on (t.question_id)",
        "the new reply's save waits for the chat",
    )
    .await;
    hold.rollback().await.expect("release R2'");
    let back = back.await.expect("switch task");
    assert_eq!(back.status, StatusCode::OK, "{}", back.body);
    let replies = answered_with_version(&client, &alice, chat, q2, 2).await;

    let path = active_path(&client, &alice, chat).await;
    let all = all_messages(&client, &alice, chat).await;
    let shown: Vec<&Value> = path.iter().filter(|m| m["reply_to"] == q2).collect();
    report(
        "versions_save_during_switch",
        &[
            ("replies", replies.len().to_string()),
            ("shown_on_the_path", shown.len().to_string()),
        ],
    );
    assert_eq!(
        shown.iter().map(|m| &m["id"]).collect::<Vec<_>>(),
        vec![&replies[1]["id"]],
        "question {q2} shows other than its one new reply (R2 = {}); the chat:\n{}",
        r2["id"],
        tree(&all)
    );
    assert!(
        chain_problems(&path).is_empty(),
        "{:?}",
        chain_problems(&path)
    );
    env.finish(api, [worker]).await;
}
