//! Stopping a reply from any API instance, and a user's retry of a message that got none:
//! the real API (two instances where it matters), the real worker and the fake model.
use crate::common;

use std::time::Duration;

use aichat_fake_llm::{FakeConfig, FakeLlm};
use aichat_shared::db;
use aichat_testkit::eventually;
use common::{
    Stack, TestApp, TestUser, event_of, id, next_event, spawn_app_with_flags, start_worker,
};
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A long reply streamed slowly: 400 words, one every 50 ms (20 s in all).
fn slow_long_reply() -> FakeConfig {
    FakeConfig {
        reply_words: Some(400),
        chunk_delay_ms: 50,
        ..FakeConfig::default()
    }
}

/// Every chunk its own delta, at once.
const FLUSH_AT_ONCE: [&str; 4] = ["--delta-flush-ms", "1", "--delta-flush-chars", "1"];

fn stop_path(message: i64) -> String {
    format!("/api/ai/messages/{message}/stop/")
}

fn retry_path(message: i64) -> String {
    format!("/api/ai/messages/{message}/retry/")
}

/// The deltas of `message` among `events`, concatenated.
fn streamed(events: &[Value], message: i64) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "assistant_delta" && e["message_id"] == message)
        .map(|e| e["delta"].as_str().unwrap_or_default())
        .collect()
}

/// The assistant messages of `chat` answering `message`.
async fn replies_to(app: &TestApp, user: &TestUser, chat: i64, message: i64) -> Vec<Value> {
    app.messages(user, chat)
        .await
        .into_iter()
        .filter(|m| m["reply_to"] == message)
        .collect()
}

/// The user's budget counter for today (what sends reserved and replies settled).
async fn budget_used(app: &TestApp, user_id: i64) -> i64 {
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let used: Option<i64> = app
        .redis()
        .await
        .get(app.keys.budget(user_id, &day))
        .await
        .expect("budget counter");
    used.unwrap_or(0)
}

/// Asserts the worker closed the model's stream of [`slow_long_reply`] before its end.
async fn model_stream_cut(fake: &FakeLlm) {
    let hung_up = fake
        .wait_for_hang_up(Duration::from_secs(5))
        .await
        .expect("the worker closed the model's stream");
    assert!(hung_up.chunks_sent < 400, "{hung_up:?}");
}

/// Jobs the queue has finished (acknowledged done).
async fn done_jobs(app: &TestApp) -> usize {
    let done: usize = app
        .redis()
        .await
        .scard(aichat_shared::jobs::queue_config(&app.keys).done_jobs_set())
        .await
        .expect("done set");
    done
}

#[tokio::test]
async fn a_stop_through_another_instance_cuts_the_stream_and_keeps_what_was_streamed() {
    let a = Stack::start(slow_long_reply(), &[], &FLUSH_AT_ONCE).await;
    // Two workers: the stop reaches whichever holds the job.
    let _second = start_worker(&a, &a.fake, &FLUSH_AT_ONCE).await;
    let b = a.another_instance(&[]).await;
    let alice = a.user("alice").await;
    let chat = a.ai_chat_id(&alice).await;
    let mut ws = a.ws(chat, &alice.token, None).await;
    let question = id(&a.send_ok(&alice, chat, "tell me a long story").await);

    // At least three deltas on instance A's socket, then the stop through instance B.
    let mut seen = Vec::new();
    while seen
        .iter()
        .filter(|e: &&Value| e["type"] == "assistant_delta")
        .count()
        < 3
    {
        seen.push(next_event(&mut ws, 10).await);
    }
    let (status, stop) = b.post(&stop_path(question), &alice.token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{stop}");

    // Within 2 s of the stop, the stopped reply: what the socket streamed, nothing more.
    let (reply, rest) = event_of(&mut ws, "assistant_message", 2).await;
    seen.extend(rest);
    let content = reply["message"]["content"].as_str().unwrap_or_default();
    assert_eq!(reply["message"]["stopped"], true, "{reply}");
    assert_eq!(reply["message"]["reply_to"], question);
    assert_eq!(content, streamed(&seen, question));
    assert!(!content.is_empty());
    assert_eq!(stop["message"]["status"], "answered");
    assert_eq!(stop["reply"]["id"], reply["message"]["id"]);
    assert_eq!(stop["reply"]["content"], content);
    assert_eq!(stop["reply"]["stopped"], true);

    // The model's stream was closed by the worker, not finished.
    model_stream_cut(&a.fake).await;

    // Usage: the prompt and the tokens generated until the stop, fewer than the whole reply's.
    let usage = &reply["message"]["usage"];
    let completion = usage["completion_tokens"].as_i64().unwrap_or_default();
    assert!(completion > 0 && completion < 400, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_i64(),
        Some(usage["prompt_tokens"].as_i64().unwrap_or_default() + completion)
    );

    // No delta of the stopped message after its reply: the next message's own user_message
    // comes first, with nothing of the first one in between.
    let next = id(&a.send_ok(&alice, chat, "and now?").await);
    let (_, between) = event_of(&mut ws, "user_message", 10).await;
    assert!(
        between.iter().all(|e| e["message_id"] != question),
        "{between:?}"
    );
    let stored = replies_to(&a, &alice, chat, question).await;
    assert_eq!(stored.len(), 1, "exactly one reply: {stored:?}");
    assert_eq!(stored[0]["content"], content);
    assert_eq!(stored[0]["stopped"], true);

    // A repeated stop answers the same; stopping the next message works as well.
    let (status, again) = a.post(&stop_path(question), &alice.token, json!({})).await;
    assert_eq!((status, &again["reply"]), (StatusCode::OK, &stop["reply"]));
    let (status, _) = a.post(&stop_path(next), &alice.token, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    b.cleanup().await;
    a.cleanup().await;
}

#[tokio::test]
async fn a_stop_recorded_but_never_published_still_stops_the_run() {
    let a = Stack::start(slow_long_reply(), &[], &FLUSH_AT_ONCE).await;
    let alice = a.user("alice").await;
    let chat = a.ai_chat_id(&alice).await;
    let mut ws = a.ws(chat, &alice.token, None).await;
    let question = id(&a.send_ok(&alice, chat, "tell me a long story").await);
    event_of(&mut ws, "assistant_delta", 10).await;

    // What the API records for a stop, without the publish that tells the workers at once
    // (as when that publish failed or no subscription carried it).
    let recorded = db::stops::request_stop(&a.db, question, alice.id)
        .await
        .expect("recording the stop");
    assert!(recorded.is_some(), "the message was being answered");

    // The worker's periodic check finds it: the stopped reply comes within its period (5 s),
    // long before the 20 s reply would end.
    let (reply, _) = event_of(&mut ws, "assistant_message", 8).await;
    assert_eq!(reply["message"]["stopped"], true, "{reply}");
    assert_eq!(reply["message"]["reply_to"], question);
    model_stream_cut(&a.fake).await;
    a.cleanup().await;
}

#[tokio::test]
async fn ten_concurrent_stops_of_one_message_answer_one_result() {
    let a = Stack::start(slow_long_reply(), &[], &FLUSH_AT_ONCE).await;
    let b = a.another_instance(&[]).await;
    let alice = a.user("alice").await;
    let chat = a.ai_chat_id(&alice).await;
    let mut ws = a.ws(chat, &alice.token, None).await;
    let question = id(&a.send_ok(&alice, chat, "go on and on").await);
    event_of(&mut ws, "assistant_delta", 10).await;

    let path = stop_path(question);
    let stops = (0..10).map(|i| {
        let app: &TestApp = if i % 2 == 0 { &a } else { &b };
        app.post(&path, &alice.token, json!({}))
    });
    let answers = futures::future::join_all(stops).await;
    let first = &answers[0].1;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body, first);
    }
    assert_eq!(first["reply"]["stopped"], true);
    assert_eq!(replies_to(&a, &alice, chat, question).await.len(), 1);
    b.cleanup().await;
    a.cleanup().await;
}

/// An app with a daily budget and no worker: its messages wait in the queue.
async fn app_without_worker() -> (TestApp, TestUser, i64) {
    let app = spawn_app_with_flags(&["--daily-token-budget", "1000000"]).await;
    let alice = app.user("alice").await;
    let chat = app.ai_chat_id(&alice).await;
    (app, alice, chat)
}

#[tokio::test]
async fn a_message_stopped_before_a_worker_took_it_is_cancelled_and_never_reaches_the_model() {
    let (app, alice, chat) = app_without_worker().await;
    let mut ws = app.ws(chat, &alice.token, None).await;
    let question = id(&app.send_ok(&alice, chat, "never mind").await);
    assert!(
        budget_used(&app, alice.id).await > 0,
        "the send reserved budget"
    );

    let (status, stop) = app
        .post(&stop_path(question), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{stop}");
    assert_eq!(stop["message"]["status"], "cancelled");
    assert_eq!(stop["reply"], Value::Null);
    let (cancelled, _) = event_of(&mut ws, "message_cancelled", 5).await;
    assert_eq!(cancelled["message_id"], question);
    assert_eq!(
        budget_used(&app, alice.id).await,
        0,
        "the reservation is given back"
    );

    // A worker that takes the job ends it without asking the model.
    let fake = FakeLlm::start(FakeConfig::default())
        .await
        .expect("fake model");
    let _worker = start_worker(&app, &fake, &[]).await;
    eventually(Duration::from_secs(10), "the job finished", || async {
        (done_jobs(&app).await == 1).then_some(())
    })
    .await;
    assert!(fake.requests().is_empty(), "the model was not asked");
    let (_, message) = app
        .get(&format!("/api/ai/messages/{question}/"), &alice.token)
        .await;
    assert_eq!(message["status"], "cancelled");
    assert!(replies_to(&app, &alice, chat, question).await.is_empty());
    assert_eq!(budget_used(&app, alice.id).await, 0);

    // Stopping it again answers the same; it is not a conflict.
    let (status, again) = app
        .post(&stop_path(question), &alice.token, json!({}))
        .await;
    assert_eq!((status, again), (StatusCode::OK, stop));
    app.cleanup().await;
}

#[tokio::test]
async fn a_waiting_send_whose_message_is_stopped_answers_409() {
    let (app, alice, chat) = app_without_worker().await;
    let mut ws = app.ws(chat, &alice.token, None).await;
    let waiting = {
        let app_url = app.url(&common::send_path(chat));
        let client = app.client.clone();
        let token = alice.token.clone();
        tokio::spawn(async move {
            let response = client
                .post(format!("{app_url}?wait=20"))
                .bearer_auth(token)
                .json(&json!({"content": "wait for me"}))
                .send()
                .await
                .expect("send");
            let status = response.status();
            (status, response.json::<Value>().await.unwrap_or_default())
        })
    };
    let sent = next_event(&mut ws, 10).await;
    let question = sent["message"]["id"].as_i64().expect("user_message");
    let (status, _) = app
        .post(&stop_path(question), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = waiting.await.expect("the waiting send");
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].is_string());
    app.cleanup().await;
}

#[tokio::test]
async fn stop_then_retry_is_answered_once_and_concurrent_retries_queue_one_job() {
    let (app, alice, chat) = app_without_worker().await;
    let question = id(&app.send_ok(&alice, chat, "second thoughts").await);
    let (status, _) = app
        .post(&stop_path(question), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);

    let path = retry_path(question);
    let retries = (0..10).map(|_| app.post(&path, &alice.token, json!({})));
    let answers = futures::future::join_all(retries).await;
    let accepted: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::ACCEPTED)
        .map(|(_, body)| body)
        .collect();
    assert_eq!(accepted.len(), 1, "{answers:?}");
    assert!(
        answers.iter().all(|(s, b)| *s == StatusCode::ACCEPTED
            || (*s == StatusCode::CONFLICT && b["error"].is_string())),
        "{answers:?}"
    );
    assert_eq!(accepted[0]["message"]["id"], question);
    assert_eq!(accepted[0]["message"]["status"], "queued");
    assert_eq!(accepted[0]["status"], "queued");
    assert!(
        budget_used(&app, alice.id).await > 0,
        "the retry reserved budget"
    );

    let fake = FakeLlm::start(FakeConfig::default())
        .await
        .expect("fake model");
    let _worker = start_worker(&app, &fake, &[]).await;
    let reply = eventually(
        Duration::from_secs(15),
        "the retried message answered",
        || async { replies_to(&app, &alice, chat, question).await.pop() },
    )
    .await;
    assert_eq!(reply["content"], "Echo: second thoughts");
    assert_eq!(reply["stopped"], false);
    // The job queued by the send was still waiting: the retry pushed none of its own.
    eventually(Duration::from_secs(10), "the job finished", || async {
        (done_jobs(&app).await == 1).then_some(())
    })
    .await;
    assert_eq!(fake.requests().len(), 1, "the model was asked once");
    assert_eq!(replies_to(&app, &alice, chat, question).await.len(), 1);
    let messages = app.messages(&alice, chat).await;
    assert_eq!(messages.len(), 2, "no new user message: {messages:?}");

    // Now answered: neither retried nor stopped.
    let (status, body) = app
        .post(&retry_path(question), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = app
        .post(&stop_path(question), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    app.cleanup().await;
}

#[tokio::test]
async fn another_users_message_or_a_reply_is_not_found_and_anonymous_is_refused() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let mallory = stack.user("mallory").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (status, reply) = stack.send_waiting(&alice, chat, "hello", "10").await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let question = reply["reply_to"].as_i64().expect("reply_to");
    let answer = id(&reply);

    for path in [stop_path(question), retry_path(question)] {
        let (status, body) = stack.post(&path, &mallory.token, json!({})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        let (status, _) = stack.post(&path, "", json!({})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    for path in [stop_path(answer), retry_path(answer), stop_path(i64::MAX)] {
        let (status, body) = stack.post(&path, &alice.token, json!({})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    let (status, body) = stack
        .post(&retry_path(question), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    stack.cleanup().await;
}

#[tokio::test]
async fn a_failed_message_retried_by_its_user_leaves_the_dead_list_and_is_answered() {
    let stack = Stack::failing().await;
    let alice = stack.user("alice").await;
    let staff = stack.staff("root").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (status, body) = stack
        .send_waiting(&alice, chat, "are you there?", "10")
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let question = eventually(Duration::from_secs(10), "the dead job listed", || async {
        let (_, dead) = stack.get("/api/admin/dead-jobs/", &staff.token).await;
        dead.as_array()
            .and_then(|jobs| jobs.first())
            .and_then(|job| job["message_id"].as_i64())
    })
    .await;

    stack.fake.set_config(FakeConfig::default());
    // A socket whose catch-up replays the failed message (then its error) still gets the
    // message again when it is retried.
    let mut ws = stack.ws(chat, &alice.token, Some(question - 1)).await;
    let (replayed, _) = event_of(&mut ws, "error", 5).await;
    assert_eq!(replayed["message_id"], question);
    let (status, retried) = stack
        .post(&retry_path(question), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    assert_eq!(retried["message"]["error"], Value::Null);
    let (_, dead) = stack.get("/api/admin/dead-jobs/", &staff.token).await;
    assert_eq!(dead, json!([]), "the retried message left the dead list");

    let (again, _) = event_of(&mut ws, "user_message", 10).await;
    assert_eq!(again["message"]["id"], question);
    let (reply, _) = event_of(&mut ws, "assistant_message", 15).await;
    assert_eq!(reply["message"]["reply_to"], question);
    assert_eq!(reply["message"]["content"], "Echo: are you there?");
    assert_eq!(replies_to(&stack, &alice, chat, question).await.len(), 1);
    stack.cleanup().await;
}
