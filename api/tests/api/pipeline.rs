//! End to end: the real API, the real worker and the fake model over HTTP. A message sent over
//! REST to one API instance streams to a WebSocket on another; `?wait` answers with the reply.
use crate::common;

use std::time::{Duration, Instant};

use aichat_fake_llm::{FakeConfig, Outcome, Usage};
use aichat_testkit::{fake_always, fake_with_latency};
use common::{Stack, assert_error, event_of, id, next_event, start_worker};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn a_reply_streams_to_a_socket_on_another_instance_and_is_saved_with_its_usage() {
    let config = FakeConfig {
        chunk_delay_ms: 20,
        ..FakeConfig::default()
    };
    let flush_at_once = ["--delta-flush-ms", "1", "--delta-flush-chars", "1"];
    let a = Stack::start(config, &[], &flush_at_once).await;
    let b = a.another_instance(&[]).await;
    let alice = a.user("alice").await;
    let chat = id(&a
        .create_ai_chat(&alice, json!({"title": "t", "system_prompt": "Be kind."}))
        .await);
    let mut ws = b.ws(chat, &alice.token, None).await;

    let content = "tell me about the weather in Lisbon";
    let user_id = id(&a.send_ok(&alice, chat, content).await);

    let first = next_event(&mut ws, 10).await;
    assert_eq!(
        (first["type"].as_str(), first["message"]["id"].as_i64()),
        (Some("user_message"), Some(user_id))
    );
    let (reply, before) = event_of(&mut ws, "assistant_message", 30).await;
    let deltas: Vec<&Value> = before
        .iter()
        .filter(|e| e["type"] == "assistant_delta")
        .collect();
    assert!(
        deltas.len() >= 2,
        "the reply streamed in pieces: {before:?}"
    );
    assert!(deltas.iter().all(|d| d["message_id"] == user_id));
    let streamed: String = deltas
        .iter()
        .map(|d| d["delta"].as_str().unwrap())
        .collect();
    let expected = format!("Echo: {content}");
    assert_eq!(streamed, expected);
    assert_eq!(reply["message"]["content"], expected);
    assert_eq!(reply["message"]["role"], "assistant");

    let usage = Usage::for_exchange(["Be kind.", content], &expected);
    assert_eq!(
        reply["message"]["usage"],
        json!({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens,
               "cost": null, "currency": null}),
        "the test's model has no prices"
    );

    // Stored: the user message answered, the reply with its tokens and model.
    let messages = a.messages(&alice, chat).await;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["status"], "answered");
    assert_eq!(messages[1]["id"], reply["message"]["id"]);
    assert_eq!(messages[1]["status"], "complete");
    assert_eq!(messages[1]["reply_to"], user_id);
    assert_eq!(messages[1]["model"], "gpt-test");
    assert_eq!(messages[1]["total_tokens"], usage.total_tokens);

    // And counted in the usage report.
    let (_, report) = a.get("/api/ai/usage/", &alice.token).await;
    assert_eq!(report["total"]["total_tokens"], usage.total_tokens);
    assert_eq!(report["total"]["message_count"], 1);
    assert_eq!(
        report["total"]["cost"],
        json!({}),
        "nothing priced: {report}"
    );
    assert_eq!(report["by_model"][0]["model"], "gpt-test");
    assert_eq!(report["by_model"][0]["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(
        report["by_day"][0]["completion_tokens"],
        usage.completion_tokens
    );
    // `b` shares `a`'s database and namespace: its cleanup removes them.
    b.cleanup().await;
}

#[tokio::test]
async fn wait_true_answers_200_with_the_assistant_message() {
    let app = Stack::start(FakeConfig::default(), &[], &[]).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let (status, reply) = app.send_waiting(&alice, chat, "hi there", "true").await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["role"], "assistant");
    assert_eq!(reply["content"], "Echo: hi there");
    assert_eq!(reply["status"], "complete");
    assert_eq!(reply["ai_chat"], chat);
    assert!(reply["total_tokens"].as_i64().unwrap() > 0);
    let (_, stored) = app
        .get(&format!("/api/ai/messages/{}/", reply["id"]), &alice.token)
        .await;
    assert_eq!(stored, reply);
    app.cleanup().await;
}

#[tokio::test]
async fn wait_answers_202_when_the_reply_takes_longer_than_the_wait() {
    let app = Stack::start(fake_with_latency(3000), &[], &[]).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let started = Instant::now();
    let (status, body) = app.send_waiting(&alice, chat, "slow one", "1").await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "queued");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(2900),
        "{took:?}"
    );
    let (status, _) = app.send_waiting(&alice, chat, "x", "forever").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    app.cleanup().await;
}

#[tokio::test]
async fn wait_answers_502_when_the_model_cannot_answer() {
    let retries = ["--llm-max-attempts", "2", "--llm-backoff-base-ms", "10"];
    let app = Stack::start(fake_always(Outcome::ServerError), &[], &retries).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let mut ws = app.ws(chat, &alice.token, None).await;
    let (status, body) = app.send_waiting(&alice, chat, "hello?", "true").await;
    let error = assert_error("wait", (status, &body), StatusCode::BAD_GATEWAY);
    assert!(
        error.starts_with("Failed to get response from ChatGPT: "),
        "{error}"
    );
    let (event, _) = event_of(&mut ws, "error", 10).await;
    assert!(event["message"].is_string());
    let messages = app.messages(&alice, chat).await;
    assert_eq!(messages[0]["status"], "failed");
    assert!(messages[0]["error"].is_string());
    assert_eq!(messages.len(), 1, "no assistant message");
    app.cleanup().await;
}

/// The tokens `user_id` has reserved or used today, as the budget in Redis counts them.
async fn budget_used(app: &common::TestApp, user_id: i64) -> i64 {
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let used: Option<i64> =
        redis::AsyncCommands::get(&mut app.redis().await, app.keys.budget(user_id, &day))
            .await
            .expect("the budget");
    used.unwrap_or(0)
}

#[tokio::test]
async fn the_worker_settles_a_budget_reservation_to_the_real_usage_or_releases_it() {
    let app = Stack::start(
        FakeConfig::default(),
        &["--daily-token-budget", "100000"],
        &["--llm-max-attempts", "1"],
    )
    .await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let (status, reply) = app.send_waiting(&alice, chat, "count me", "true").await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(
        budget_used(&app, alice.id).await,
        reply["total_tokens"].as_i64().unwrap(),
        "settled to the real use"
    );

    app.fake.set_config(fake_always(Outcome::ServerError));
    let (status, _) = app
        .send_waiting(&alice, chat, "this one fails", "true")
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        budget_used(&app, alice.id).await,
        reply["total_tokens"].as_i64().unwrap(),
        "the failure released its reservation"
    );
    app.cleanup().await;
}

/// The reset trap: a database dropped and created again under the same Redis namespace starts
/// its ids at 1 again, and must not find the earlier database's job de-duplication key (the
/// new message would sit queued until the sweeper, here turned off, rescued it) nor its
/// idempotency key (the send would be answered with the earlier database's message).
#[tokio::test]
async fn a_database_created_again_under_the_same_namespace_gets_its_replies_at_once() {
    let flags = ["--max-wait-secs", "10"];
    let no_sweeper = ["--worker-sweep-interval-secs", "0"];
    let Stack {
        app: mut first,
        fake,
        worker,
    } = Stack::start(FakeConfig::default(), &flags, &no_sweeper).await;
    // Both databases' sends wait for their reply and carry the same `Idempotency-Key`.
    let send = async |app: &common::TestApp, token: &str, chat: i64, content: &str| {
        let path = format!("{}?wait=true", common::send_path(chat));
        app.post_with_key(&path, token, "the-same-key", content)
            .await
    };
    let alice = first.user("alice").await;
    let chat = first.ai_chat_id(&alice).await;
    let (status, before) = send(&first, &alice.token, chat, "first life").await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert_eq!(before["content"], "Echo: first life");

    drop(worker);
    first.shut_down();
    common::drop_database(&first.db_name).await;
    aichat_testkit::postgres::create_database(&first.db_name).await;

    let second = first.another_instance(&flags).await;
    let _worker = start_worker(&second, &fake, &no_sweeper).await;
    let alice = second.user("alice").await;
    let again = second.ai_chat_id(&alice).await;
    assert_eq!(again, chat, "the new database gives out the same ids");
    let started = Instant::now();
    let (status, after) = send(&second, &alice.token, again, "second life").await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["content"], "Echo: second life");
    assert_eq!(
        after["reply_to"], before["reply_to"],
        "the same message id as in the first database"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    second.cleanup().await;
}
