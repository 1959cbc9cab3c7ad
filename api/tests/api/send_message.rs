//! `send_message`: the message is stored and exactly one completion job is queued, or,
//! when Redis cannot take the job, nothing is stored and the client gets 503.
use crate::common;

use std::time::Duration;

use aichat_testkit::{PrivateRedis, eventually};
use common::{
    Options, Replied, app_with_ai_chat, app_with_users, assert_error, flags, id, send_path,
    spawn_app_with, spawn_app_with_flags,
};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn send_message_stores_a_queued_message_and_queues_exactly_one_job() {
    let (app, [alice]) = app_with_users(["alice"]).await;
    let team = app.create_chat(&alice, "team", &[]).await;
    let chat = app.linked_ai_chat_id(&alice, team).await;
    let (status, body) = app
        .post(
            &send_path(chat),
            &alice.token,
            json!({"content": "Summarise please", "include_related_chat_context": true, "context_message_limit": 7}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "queued");
    let message = &body["message"];
    assert_eq!(message["role"], "user");
    assert_eq!(message["content"], "Summarise please");
    assert_eq!(message["status"], "queued");
    assert_eq!(message["ai_chat"], chat);
    let message_id = id(message);

    let jobs = app.queued_jobs().await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["message_id"], message_id);
    assert_eq!(jobs[0]["ai_chat_id"], chat);
    assert_eq!(jobs[0]["include_related_chat_context"], true);
    assert_eq!(jobs[0]["context_message_limit"], 7);

    let (_, stored) = app
        .get(&format!("/api/ai/messages/{message_id}/"), &alice.token)
        .await;
    assert_eq!(&stored, message);
    app.cleanup().await;
}

#[tokio::test]
async fn invalid_messages_are_400_and_store_and_queue_nothing() {
    let (app, alice, chat) = app_with_ai_chat("alice").await;
    let cases = [
        (json!({}), "content"),
        (json!({"content": ""}), "content"),
        (json!({"content": " \n\t "}), "content"),
        (json!({"content": "x".repeat(32_001)}), "content"),
        (
            json!({"content": "hi", "context_message_limit": 0}),
            "context_message_limit",
        ),
        (
            json!({"content": "hi", "context_message_limit": 101}),
            "context_message_limit",
        ),
    ];
    let path = send_path(chat);
    app.assert_field_errors(Method::POST, &path, &alice.token, &cases)
        .await;
    // A value of the wrong type names its field (json_body.rs); a body that is no object is
    // one error.
    for (body, field) in [
        (json!({"content": 5}), "content"),
        (
            json!({"content": "hi", "include_related_chat_context": "yes"}),
            "include_related_chat_context",
        ),
        (json!([1]), "error"),
    ] {
        let (status, error) = app.post(&path, &alice.token, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            error[field].is_array() || error[field].is_string(),
            "{body} -> {error}"
        );
    }
    assert!(app.my_messages(&alice).await.is_empty());
    assert!(app.queued_jobs().await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn when_redis_cannot_take_the_job_the_client_gets_503_and_no_message_is_left() {
    let mut redis = PrivateRedis::start().await;
    let app = spawn_app_with(Options {
        redis_url: format!("redis://127.0.0.1:{}", redis.port),
        ..Options::default()
    })
    .await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    app.send_ok(&alice, chat, "before").await;

    redis.stop();
    let (status, body) = app.send(&alice, chat, "during the outage").await;
    let error = assert_error("outage", (status, &body), StatusCode::SERVICE_UNAVAILABLE);
    assert!(error.contains("retry"), "{error}");

    let messages = app.my_messages(&alice).await;
    assert_eq!(
        common::texts(&messages, "content"),
        ["before"],
        "the refused message is not stored"
    );
    let (status, ready) = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["redis"], "unavailable");
    app.cleanup().await;
}

/// A client that goes away while its keyed send is being stored leaves no key pending: the
/// send is stored once, and a repeat with the key answers that message instead of 409.
#[tokio::test]
async fn a_keyed_send_whose_client_went_away_is_stored_once_and_a_repeat_answers_it() {
    let (app, alice, chat) = app_with_ai_chat("alice").await;
    let path = send_path(chat);
    // The chat's row held `for update`: the send's statement waits for it (it takes the row
    // `for key share`).
    let lock = app.holding_row("ai_chats", chat).await;
    let mut send = Box::pin(app.post_with_key(&path, &alice.token, "gone", "hello"));
    app.until_it_waits_for_a_lock(&mut send).await;
    drop(send); // the client goes away
    lock.rollback().await.expect("unlocking the chat");

    let repeat = eventually(Duration::from_secs(10), "a repeat answering", || async {
        let (status, body) = app
            .post_with_key(&path, &alice.token, "gone", "hello")
            .await;
        (status != StatusCode::CONFLICT).then_some((status, body))
    })
    .await;
    assert_eq!(repeat.0, StatusCode::ACCEPTED, "{}", repeat.1);
    let stored = app.my_messages(&alice).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(repeat.1["message"]["id"], stored[0]["id"]);
    assert_eq!(app.queued_jobs().await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_repeated_post_with_the_same_idempotency_key_returns_the_same_message_and_queues_once() {
    let (app, alice, chat) = app_with_ai_chat("alice").await;
    let (bob, bobs) = app.user_with_ai_chat("bob").await;
    let path = send_path(chat);
    let (status, first) = app
        .post_with_key(&path, &alice.token, "key-1", "hello")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (status, again) = app
        .post_with_key(&path, &alice.token, "key-1", "hello")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(again["message"], first["message"]);

    // Concurrent repeats of a new key: one message, every answer names it or says "in progress".
    let tries = futures::future::join_all(
        (0..10).map(|_| app.post_with_key(&path, &alice.token, "key-2", "burst")),
    )
    .await;
    let ids: std::collections::HashSet<i64> = tries
        .iter()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .map(|(_, b)| id(&b["message"]))
        .collect();
    assert_eq!(ids.len(), 1, "{tries:?}");
    assert!(
        tries
            .iter()
            .all(|(s, _)| *s == StatusCode::ACCEPTED || *s == StatusCode::CONFLICT),
        "{tries:?}"
    );

    // Keys are per user: bob's "key-1" is his own.
    let (status, bobs_msg) = app
        .post_with_key(&send_path(bobs), &bob.token, "key-1", "hi")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_ne!(bobs_msg["message"]["id"], first["message"]["id"]);

    assert_eq!(
        app.my_messages(&alice).await.len(),
        2,
        "hello and burst, once each"
    );
    assert_eq!(
        app.queued_jobs().await.len(),
        3,
        "alice's two and bob's one"
    );

    let (status, _) = app
        .post_with_key(&path, &alice.token, &"k".repeat(256), "x")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    app.cleanup().await;
}

/// A key remembers what its first request asked for: a repeat with another body (content or
/// options) is 422, one aimed at another chat or another route 409, and none of them stores
/// or queues anything; the first request repeated as it was still answers its message.
#[tokio::test]
async fn an_idempotency_key_repeated_for_another_request_is_refused_and_stores_nothing() {
    let (app, alice, chat) = app_with_ai_chat("alice").await;
    let other = app.ai_chat_id(&alice).await;
    let path = send_path(chat);
    let (status, first) = app.post_with_key(&path, &alice.token, "k", "hello").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let keyed = |body: serde_json::Value, path: String| {
        let app = &app;
        let token = alice.token.clone();
        async move {
            let reply = app
                .request(Method::POST, &path)
                .bearer_auth(&token)
                .header("Idempotency-Key", "k")
                .json(&body)
                .reply()
                .await;
            (reply.status, reply.expect_json())
        }
    };

    let other_content = keyed(json!({"content": "hello!"}), path.clone()).await;
    let text = assert_error(
        "other content",
        (other_content.0, &other_content.1),
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    assert!(text.contains("Idempotency-Key"), "{text}");
    let other_limit = keyed(
        json!({"content": "hello", "context_message_limit": 5}),
        path.clone(),
    )
    .await;
    assert_error(
        "other options",
        (other_limit.0, &other_limit.1),
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    let other_chat = keyed(json!({"content": "hello"}), send_path(other)).await;
    assert_error(
        "another chat",
        (other_chat.0, &other_chat.1),
        StatusCode::CONFLICT,
    );
    let message = id(&first["message"]);
    let edit = keyed(
        json!({"content": "hello"}),
        format!("/api/ai/messages/{message}/edit/"),
    )
    .await;
    let text = assert_error("another route", (edit.0, &edit.1), StatusCode::CONFLICT);
    assert!(text.contains("Idempotency-Key"), "{text}");

    // The same request, its options written out at their defaults: the first message.
    let same = keyed(
        json!({"content": "hello", "context_message_limit": 20, "include_related_chat_context": false}),
        path.clone(),
    )
    .await;
    assert_eq!(same.0, StatusCode::ACCEPTED, "{}", same.1);
    assert_eq!(same.1["message"], first["message"]);
    assert_eq!(app.my_messages(&alice).await.len(), 1);
    assert_eq!(app.queued_jobs().await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn past_the_per_user_send_rate_requests_get_429_with_retry_after() {
    let app = spawn_app_with_flags(&["--send-rate-per-minute", "3"]).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let (bob, bobs) = app.user_with_ai_chat("bob").await;
    for n in 0..3 {
        app.send_ok(&alice, chat, &format!("m{n}")).await;
    }
    let refused = app
        .request(Method::POST, &send_path(chat))
        .bearer_auth(&alice.token)
        .json(&json!({"content": "one too many"}))
        .reply()
        .await;
    let error = refused.error("4th", StatusCode::TOO_MANY_REQUESTS);
    assert!(error.contains("slow down"), "{error}");
    let retry_after = refused.retry_after().expect("Retry-After");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // The WebSocket path counts too, and says so in an error event.
    let mut ws = app.ws(chat, &alice.token, None).await;
    common::send_ws(&mut ws, json!({"type": "message", "content": "via socket"})).await;
    let event = common::next_event(&mut ws, 5).await;
    assert_eq!(event["type"], "error", "{event}");
    // Another user is not affected.
    app.send_ok(&bob, bobs, "hi").await;
    assert_eq!(app.my_messages(&alice).await.len(), 3);
    app.cleanup().await;
}

#[tokio::test]
async fn the_request_id_travels_from_the_request_into_the_job() {
    let (app, alice, chat) = app_with_ai_chat("alice").await;
    let send = |content: &str| {
        app.request(Method::POST, &send_path(chat))
            .bearer_auth(&alice.token)
            .json(&json!({"content": content}))
    };
    let traced = send("trace me")
        .header("x-request-id", "req-from-the-edge-42")
        .reply()
        .await;
    assert_eq!(traced.status, StatusCode::ACCEPTED);
    assert_eq!(traced.header("x-request-id"), "req-from-the-edge-42");
    let jobs = app.queued_jobs().await;
    assert_eq!(jobs[0]["request_id"], "req-from-the-edge-42");

    // Without one, the API makes one up and still hands it on.
    let untraced = send("again").reply().await;
    let generated = untraced.header("x-request-id");
    assert!(!generated.is_empty());
    let jobs = app.queued_jobs().await;
    assert!(
        jobs.iter().any(|j| j["request_id"] == generated),
        "{jobs:?}"
    );
    app.cleanup().await;
}

/// A daily budget of 85 tokens, prompts of at most 15 and replies of at most 2, no send rate.
const FIVE_RESERVATIONS: &str = "--daily-token-budget 85 --context-token-budget 15 \
    --max-completion-tokens 2 --send-rate-per-minute 0";

#[tokio::test]
async fn fifty_concurrent_sends_against_a_budget_for_five_reservations_admit_exactly_five() {
    // Each send reserves the most it can cost before it is queued: a full prompt (15) and a
    // full reply (2). The budget holds five such reservations.
    let app = spawn_app_with_flags(&flags(FIVE_RESERVATIONS)).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let (bob, bobs) = app.user_with_ai_chat("bob").await;
    let sends = futures::future::join_all((0..50).map(|_| {
        app.request(Method::POST, &send_path(chat))
            .bearer_auth(&alice.token)
            .json(&json!({"content": "hi"}))
            .reply()
    }))
    .await;
    let (admitted, refused): (Vec<_>, Vec<_>) = sends
        .iter()
        .partition(|reply| reply.status == StatusCode::ACCEPTED);
    assert_eq!(admitted.len(), 5);
    for reply in refused {
        let error = reply.error("send", StatusCode::TOO_MANY_REQUESTS);
        assert!(error.contains("budget"), "{error}");
        let secs = reply.retry_after().expect("Retry-After");
        assert!((1..=86_400).contains(&secs));
    }
    assert_eq!(app.my_messages(&alice).await.len(), admitted.len());
    assert_eq!(app.queued_jobs().await.len(), admitted.len());
    // Another user's budget is their own.
    app.send_ok(&bob, bobs, "hi").await;
    app.cleanup().await;
}
