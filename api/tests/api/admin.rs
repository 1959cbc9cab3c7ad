//! Staff-only admin endpoints: who may call them, search and filters, token totals, and the
//! re-drive of dead jobs.
use crate::common;

use std::time::Duration;

use aichat_fake_llm::{FakeConfig, Outcome};
use aichat_testkit::{eventually, fake_always};
use common::{Stack, app_with_users, event_of, items, texts};
use reqwest::{Method, StatusCode};
use serde_json::json;

const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/admin/ai-chats/"),
    ("GET", "/api/admin/messages/"),
    ("GET", "/api/admin/usage/"),
    ("GET", "/api/admin/dead-jobs/"),
    ("POST", "/api/admin/dead-jobs/nope/redrive/"),
    ("GET", "/api/admin/users/"),
    ("GET", "/api/admin/users/1/"),
    ("PUT", "/api/admin/users/1/budget/"),
];

#[tokio::test]
async fn admin_routes_are_401_for_anonymous_and_403_for_non_staff() {
    let (app, [alice]) = app_with_users(["alice"]).await;
    for (method, path) in ROUTES {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let (status, _) = app.call(method.clone(), path, None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        let (status, body) = app
            .call(method.clone(), path, Some(&alice.token), None)
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(body, json!({"error": "Staff only"}));
    }
    app.cleanup().await;
}

#[tokio::test]
async fn staff_search_chats_filter_messages_and_read_token_totals() {
    let app = Stack::start(FakeConfig::default(), &[], &[]).await;
    let root = app.staff("root").await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let trip = app
        .create_ai_chat(&alice, json!({"title": "Trip to Porto"}))
        .await;
    app.create_ai_chat(&bob, json!({"title": "Taxes"})).await;
    let (status, reply) = app
        .send_waiting(&alice, common::id(&trip), "plan it", "true")
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");

    let titles = |query: &'static str| {
        let (app, token) = (&app, &root.token);
        async move { texts(&app.list(query, token).await, "title") }
    };
    assert_eq!(
        titles("/api/admin/ai-chats/?q=porto").await,
        ["Trip to Porto"]
    );
    assert_eq!(titles("/api/admin/ai-chats/?q=BOB").await, ["Taxes"]);
    assert_eq!(titles("/api/admin/ai-chats/").await.len(), 2);
    assert_eq!(
        app.get("/api/admin/ai-chats/?q=%25", &root.token).await.1,
        json!([]),
        "wildcards are literal"
    );

    let (_, assistant) = app
        .get("/api/admin/messages/?role=assistant", &root.token)
        .await;
    assert_eq!(items(&assistant).len(), 1);
    assert_eq!(assistant[0]["id"], reply["id"]);
    let (_, none) = app
        .get(
            "/api/admin/messages/?since=2999-01-01T00:00:00Z",
            &root.token,
        )
        .await;
    assert_eq!(none, json!([]));
    app.assert_bad_queries(
        &root.token,
        [
            "/api/admin/messages/?role=robot",
            "/api/admin/messages/?since=yesterday",
        ],
    )
    .await;
    // Times chrono reads and PostgreSQL cannot hold: field errors, at and past the edge.
    for (query, field) in [
        ("since=-5000-01-01T00:00:00Z", "since"),
        ("until=%2B10000-01-01T00:00:00Z", "until"),
        ("since=0000-12-31T23:59:59Z", "since"),
    ] {
        let (status, body) = app
            .get(&format!("/api/admin/messages/?{query}"), &root.token)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(body[field].is_array(), "{query}: {body}");
    }
    let (status, edge) = app
        .get(
            "/api/admin/messages/?since=0001-01-01T00:00:00Z&until=9999-12-31T23:59:59Z",
            &root.token,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{edge}");
    assert_eq!(items(&edge).len(), 2, "{edge}");

    let (status, usage) = app.get("/api/admin/usage/", &root.token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(items(&usage).len(), 1, "{usage}");
    assert_eq!(usage[0]["username"], "alice");
    assert_eq!(usage[0]["model"], "gpt-test");
    assert_eq!(usage[0]["total_tokens"], reply["total_tokens"]);
    assert_eq!(usage[0]["message_count"], 1);
    assert_eq!(usage[0]["cost"], json!({}), "an unpriced model: {usage}");
    app.cleanup().await;
}

/// A failed regeneration whose question then had its older reply activated: the question's
/// reply version points at a reply that exists. A staff re-drive answers it anew, as a retry
/// would (a version above every reply of it): one model call, one new reply, the question
/// answered (before, the save collided with the existing reply and the question stayed
/// `answering`, its jobs pushed again by the sweeper, each asking the model).
#[tokio::test]
async fn a_redrive_after_an_older_reply_was_activated_answers_the_question_anew() {
    let app = Stack::start(FakeConfig::default(), &[], &["--llm-max-attempts", "1"]).await;
    let root = app.staff("root").await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let mut ws = app.ws(chat, &alice.token, None).await;
    let (status, first) = app.send_waiting(&alice, chat, "hello", "true").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let question = first["reply_to"].as_i64().expect("the question");
    let first_reply = first["id"].as_i64().expect("the reply");

    // The regeneration fails for good: its job goes dead.
    app.fake.set_config(fake_always(Outcome::ServerError));
    let (status, body) = app
        .post(
            &format!("/api/ai/messages/{question}/regenerate/"),
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    event_of(&mut ws, "error", 10).await;
    let dead = dead_jobs_listed(&app, &root, 1).await;
    let task_id = dead[0]["task_id"].as_str().expect("task id").to_owned();
    // The older reply made active again: the failed question's version now names it.
    let (status, body) = app
        .post(
            &format!("/api/ai/messages/{first_reply}/activate/"),
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    app.fake.set_config(FakeConfig::default());
    let calls_before = app.fake.requests().len();
    let (status, body) = redrive(&app, &root, &task_id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (reply, _) = event_of(&mut ws, "assistant_message", 15).await;
    assert_eq!(reply["message"]["reply_to"], question);
    assert!(
        reply["message"]["version"].as_i64().is_some_and(|v| v >= 2),
        "a new version: {reply}"
    );
    let messages = app.messages(&alice, chat).await;
    let asked = messages
        .iter()
        .find(|m| m["id"] == question)
        .expect("the question");
    assert_eq!(asked["status"], "answered", "{asked}");
    assert_eq!(
        app.fake.requests().len(),
        calls_before + 1,
        "one model call"
    );
    app.cleanup().await;
}

/// A stack whose model always fails and whose worker makes one attempt a job: every message
/// fails for good and its job goes dead.
async fn failing_for_good() -> Stack {
    Stack::start(
        fake_always(Outcome::ServerError),
        &[],
        &["--llm-max-attempts", "1"],
    )
    .await
}

/// Staff's re-drive of the dead job `task_id`: the answer's status and body.
async fn redrive(
    app: &Stack,
    staff: &common::TestUser,
    task_id: &str,
) -> (StatusCode, serde_json::Value) {
    app.post(
        &format!("/api/admin/dead-jobs/{task_id}/redrive/"),
        &staff.token,
        json!({}),
    )
    .await
}

/// Sends `text` into `chat` with `?wait=true` on a stack whose model fails for good: the send
/// answers 502, and the message's id comes with the `error` event on `ws`.
async fn send_failing(
    app: &Stack,
    user: &common::TestUser,
    chat: i64,
    ws: &mut common::Ws,
    text: &str,
) -> i64 {
    let (status, _) = app.send_waiting(user, chat, text, "true").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let (_, events) = event_of(ws, "error", 10).await;
    events[0]["message"]["id"].as_i64().expect("the message id")
}

/// The dead jobs staff list, once at least `count` are listed. The worker publishes the error
/// before apalis moves the job to the dead set (after the handler returns), so the listing may
/// lag the event by a moment.
async fn dead_jobs_listed(
    app: &Stack,
    staff: &common::TestUser,
    count: usize,
) -> Vec<serde_json::Value> {
    eventually(
        Duration::from_secs(10),
        "the dead jobs are listed",
        || async {
            let dead = app.list("/api/admin/dead-jobs/", &staff.token).await;
            (dead.len() >= count).then_some(dead)
        },
    )
    .await
}

/// A message of alice's that the model failed, on `app` (its model failing, one attempt a
/// job), and its dead job as staff list it.
struct Failed {
    root: common::TestUser,
    alice: common::TestUser,
    chat: i64,
    /// A socket on the chat, opened before the send.
    ws: common::Ws,
    message_id: i64,
    task_id: String,
}

async fn a_failed_message(app: &Stack) -> Failed {
    let root = app.staff("root").await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let mut ws = app.ws(chat, &alice.token, None).await;
    let message_id = send_failing(app, &alice, chat, &mut ws, "hello").await;
    let dead = dead_jobs_listed(app, &root, 1).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["message_id"], message_id);
    assert_eq!(dead[0]["ai_chat_id"], chat);
    let task_id = dead[0]["task_id"].as_str().expect("task id").to_owned();
    Failed {
        root,
        alice,
        chat,
        ws,
        message_id,
        task_id,
    }
}

/// Deletes the first job key of `message_id` (its only one), as a day after its push.
async fn expire_first_job_key(app: &Stack, message_id: i64) {
    let mut redis = app.redis().await;
    let first_key: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*:message:{message_id}", app.ns))
        .query_async(&mut redis)
        .await
        .expect("keys");
    assert_eq!(first_key.len(), 1, "{first_key:?}");
    let _: i64 = redis::AsyncCommands::del(&mut redis, &first_key)
        .await
        .expect("expire the key");
}

/// A re-drive of a dead job whose message's job keys have expired (they live a day): the
/// re-drive's job starts the message's chain again, so the sweeps that run while it is being
/// answered find it alive and push nothing of their own; the model is asked once.
#[tokio::test]
async fn a_redrive_of_a_job_older_than_its_keys_is_asked_once_while_sweeps_run() {
    let app = Stack::start(
        fake_always(Outcome::ServerError),
        &[],
        &[
            "--llm-max-attempts",
            "1",
            "--worker-sweep-interval-secs",
            "1",
            "--worker-sweep-grace-secs",
            "1",
        ],
    )
    .await;
    let Failed {
        root,
        alice,
        chat,
        mut ws,
        message_id,
        task_id,
    } = a_failed_message(&app).await;
    // A day later: the message's first job key has expired.
    expire_first_job_key(&app, message_id).await;

    // The model is back, and slow: several sweeps run while the re-drive is answered.
    app.fake.set_config(FakeConfig {
        latency_ms: 4000,
        ..FakeConfig::default()
    });
    let (status, body) = redrive(&app, &root, &task_id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (reply, _) = event_of(&mut ws, "assistant_message", 20).await;
    assert_eq!(reply["message"]["reply_to"], message_id);
    let outcomes: Vec<String> = app.fake.requests().into_iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        ["server_error", "ok"],
        "asked once by the re-drive"
    );
    let replies = app
        .messages(&alice, chat)
        .await
        .into_iter()
        .filter(|m| m["role"] == "assistant")
        .count();
    assert_eq!(replies, 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_dead_job_is_listed_and_a_redrive_answers_its_message_once() {
    let app = Stack::start(
        fake_always(Outcome::ServerError),
        &["--daily-token-budget", "1000000"],
        &["--llm-max-attempts", "1"],
    )
    .await;
    let Failed {
        root,
        alice,
        chat,
        mut ws,
        message_id,
        task_id,
    } = a_failed_message(&app).await;

    // As on a day after the failure on which alice has sent nothing yet: no budget of the day
    // is counted until the re-drive's reply is.
    let today = chrono::Utc::now()
        .date_naive()
        .format("%Y-%m-%d")
        .to_string();
    let day_total = app.keys.budget(alice.id, &today);
    let mut redis = app.redis().await;
    let _: i64 = redis::AsyncCommands::del(
        &mut redis,
        &[day_total.clone(), format!("{day_total}:reserved")],
    )
    .await
    .expect("forget today's budget");
    let (_, quota) = app.get("/api/ai/quota/", &alice.token).await;
    assert_eq!(quota["daily"]["used"], 0, "{quota}");

    // The model is back; the re-drive answers the message, once.
    app.fake.set_config(FakeConfig::default());
    let (status, body) = redrive(&app, &root, &task_id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        body,
        json!({"task_id": task_id, "message_id": message_id, "status": "queued"})
    );
    let (reply, _) = event_of(&mut ws, "assistant_message", 15).await;
    assert_eq!(reply["message"]["reply_to"], message_id);
    assert_eq!(
        app.get("/api/admin/dead-jobs/", &root.token).await.1,
        json!([])
    );
    let (status, _) = redrive(&app, &root, &task_id).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a second re-drive finds nothing"
    );

    let messages = app.messages(&alice, chat).await;
    assert_eq!(texts(&messages, "status"), ["answered", "complete"]);

    // The budget of the day of the re-drive counts the reply once: the failure gave the send's
    // reservation back, and the re-driven reply gives nothing back a second time.
    let (status, quota) = app.get("/api/ai/quota/", &alice.token).await;
    assert_eq!(status, StatusCode::OK, "{quota}");
    let used = reply["message"]["usage"]["total_tokens"].clone();
    assert!(used.as_i64().is_some_and(|n| n > 0), "{reply}");
    assert_eq!(
        (&quota["daily"]["used"], &quota["daily"]["reserved"]),
        (&used, &json!(0)),
        "{quota}"
    );
    app.cleanup().await;
}

/// A failed message answered afterwards by a route that does not follow its chain of jobs back
/// to the dead job (here its user's retry once the chain's keys have expired, as a day later):
/// the dead job leaves the staff's list and the queue's dead set. The dead jobs of messages
/// still failed stay, newest first.
#[tokio::test]
async fn a_dead_job_whose_message_was_answered_since_leaves_the_list_and_the_dead_set() {
    let app = failing_for_good().await;
    let Failed {
        root,
        alice,
        mut ws,
        message_id,
        task_id,
        ..
    } = a_failed_message(&app).await;
    let (bob, bobs_chat) = app.user_with_ai_chat("bob").await;
    for text in ["first", "second"] {
        let (status, body) = app.send_waiting(&bob, bobs_chat, text, "true").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    }
    let bobs: Vec<i64> = app
        .messages(&bob, bobs_chat)
        .await
        .iter()
        .filter_map(|m| m["id"].as_i64())
        .collect();
    assert_eq!(bobs.len(), 2, "{bobs:?}");
    let listed = dead_jobs_listed(&app, &root, 3).await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    let listed: Vec<i64> = listed
        .iter()
        .filter_map(|j| j["message_id"].as_i64())
        .collect();
    assert_eq!(listed, [bobs[1], bobs[0], message_id], "newest first");

    // A day later: alice's chain of jobs has expired; her retry starts a new one and is answered.
    expire_first_job_key(&app, message_id).await;
    let mut redis = app.redis().await;
    app.fake.set_config(FakeConfig::default());
    let (status, body) = app
        .post(
            &format!("/api/ai/messages/{message_id}/retry/"),
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (reply, _) = event_of(&mut ws, "assistant_message", 15).await;
    assert_eq!(reply["message"]["reply_to"], message_id);
    let dead_set = aichat_shared::jobs::queue_config(&app.keys).dead_jobs_set();
    let still_dead: bool = redis::AsyncCommands::sismember(&mut redis, &dead_set, &task_id)
        .await
        .expect("sismember");
    assert!(
        still_dead,
        "nothing forgot the answered message's dead job yet"
    );

    let listed: Vec<i64> = app
        .list("/api/admin/dead-jobs/", &root.token)
        .await
        .iter()
        .filter_map(|j| j["message_id"].as_i64())
        .collect();
    assert_eq!(listed, [bobs[1], bobs[0]]);
    let still_dead: bool = redis::AsyncCommands::sismember(&mut redis, &dead_set, &task_id)
        .await
        .expect("sismember");
    assert!(!still_dead, "the answered message's dead job is forgotten");
    let (status, _) = redrive(&app, &root, &task_id).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.cleanup().await;
}

/// Three dead jobs are listed newest first, each entry with its own job's message, chat and
/// attempts (the listing reads every job's arguments in one round trip and their attempts in
/// another): a re-drive of the middle entry's task answers the middle message.
#[tokio::test]
async fn several_dead_jobs_are_listed_newest_first_each_with_its_own_message() {
    let app = failing_for_good().await;
    let root = app.staff("root").await;
    let alice = app.user("alice").await;
    let mut sent = Vec::new();
    for text in ["one", "two", "three"] {
        let chat = app.ai_chat_id(&alice).await;
        let mut ws = app.ws(chat, &alice.token, None).await;
        let message_id = send_failing(&app, &alice, chat, &mut ws, text).await;
        sent.push((message_id, chat));
    }
    let dead = dead_jobs_listed(&app, &root, 3).await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    let listed: Vec<(i64, i64)> = dead
        .iter()
        .map(|job| {
            (
                job["message_id"].as_i64().expect("message id"),
                job["ai_chat_id"].as_i64().expect("chat id"),
            )
        })
        .collect();
    let newest_first: Vec<(i64, i64)> = sent.iter().rev().copied().collect();
    assert_eq!(listed, newest_first, "{dead:?}");
    assert!(
        dead.iter().all(|job| job["attempts"] == dead[0]["attempts"]
            && job["attempts"].as_i64().is_some()),
        "each job's attempts: {dead:?}"
    );

    app.fake.set_config(FakeConfig::default());
    let (middle_message, middle_chat) = sent[1];
    let mut ws = app.ws(middle_chat, &alice.token, None).await;
    let task_id = dead[1]["task_id"].as_str().expect("task id");
    let (status, body) = redrive(&app, &root, task_id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["message_id"], middle_message, "{body}");
    let (reply, _) = event_of(&mut ws, "assistant_message", 15).await;
    assert_eq!(reply["message"]["reply_to"], middle_message);
    let left: Vec<i64> = app
        .list("/api/admin/dead-jobs/", &root.token)
        .await
        .iter()
        .map(|job| job["message_id"].as_i64().expect("message id"))
        .collect();
    assert_eq!(left, [sent[2].0, sent[0].0], "the other two stay listed");
    app.cleanup().await;
}
