//! `send_message`: the message is stored and exactly one completion job is queued, or,
//! when Redis cannot take the job, nothing is stored and the client gets 503.
use crate::common;

use aichat_testkit::PrivateRedis;
use common::{Options, spawn_app, spawn_app_with};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn send_message_stores_a_queued_message_and_queues_exactly_one_job() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let team = app.create_chat(&alice, "team", &[]).await;
    let chat = app
        .create_ai_chat(&alice, json!({"title": "t", "related_chat": team}))
        .await;
    let id = chat["id"].as_i64().unwrap();
    let (status, body) = app
        .post(
            &format!("/api/ai/chats/{id}/send_message/"),
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
    assert_eq!(message["ai_chat"], id);
    let message_id = message["id"].as_i64().unwrap();

    let jobs = app.queued_jobs().await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["message_id"], message_id);
    assert_eq!(jobs[0]["ai_chat_id"], id);
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
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await;
    let path = format!("/api/ai/chats/{}/send_message/", chat["id"]);
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
    for (body, field) in cases {
        let (status, errors) = app.post(&path, &alice.token, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(errors[field].is_array(), "{body} -> {errors}");
    }
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
    assert_eq!(
        app.get("/api/ai/messages/", &alice.token).await.1,
        json!([])
    );
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
    let alice = app.user("alice").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await;
    let path = format!("/api/ai/chats/{}/send_message/", chat["id"]);
    let (status, _) = app
        .post(&path, &alice.token, json!({"content": "before"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    redis.stop();
    let (status, body) = app
        .post(&path, &alice.token, json!({"content": "during the outage"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"].as_str().unwrap().contains("retry"), "{body}");

    let (_, messages) = app.get("/api/ai/messages/", &alice.token).await;
    let contents: Vec<&Value> = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["content"])
        .collect();
    assert_eq!(
        contents,
        [&json!("before")],
        "the refused message is not stored"
    );
    let (status, ready) = app.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["redis"], "unavailable");
    app.cleanup().await;
}

async fn post_with_key(
    app: &common::TestApp,
    path: &str,
    token: &str,
    key: &str,
    content: &str,
) -> (StatusCode, Value) {
    let resp = app
        .client
        .post(app.url(path))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&json!({"content": content}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn a_repeated_post_with_the_same_idempotency_key_returns_the_same_message_and_queues_once() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let bobs = app.create_ai_chat(&bob, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let path = format!("/api/ai/chats/{chat}/send_message/");
    let (status, first) = post_with_key(&app, &path, &alice.token, "key-1", "hello").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (status, again) = post_with_key(&app, &path, &alice.token, "key-1", "hello").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(again["message"], first["message"]);

    // Concurrent repeats of a new key: one message, every answer names it or says "in progress".
    let tries = futures::future::join_all(
        (0..10).map(|_| post_with_key(&app, &path, &alice.token, "key-2", "burst")),
    )
    .await;
    let ids: std::collections::HashSet<i64> = tries
        .iter()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .map(|(_, b)| b["message"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "{tries:?}");
    assert!(
        tries
            .iter()
            .all(|(s, _)| *s == StatusCode::ACCEPTED || *s == StatusCode::CONFLICT),
        "{tries:?}"
    );

    // Keys are per user: bob's "key-1" is his own.
    let (status, bobs_msg) = post_with_key(
        &app,
        &format!("/api/ai/chats/{bobs}/send_message/"),
        &bob.token,
        "key-1",
        "hi",
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_ne!(bobs_msg["message"]["id"], first["message"]["id"]);

    let (_, messages) = app.get("/api/ai/messages/", &alice.token).await;
    assert_eq!(
        messages.as_array().unwrap().len(),
        2,
        "hello and burst, once each"
    );
    assert_eq!(
        app.queued_jobs().await.len(),
        3,
        "alice's two and bob's one"
    );

    let (status, _) = post_with_key(&app, &path, &alice.token, &"k".repeat(256), "x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    app.cleanup().await;
}

#[tokio::test]
async fn past_the_per_user_send_rate_requests_get_429_with_retry_after() {
    let app = spawn_app_with(Options {
        extra: vec!["--send-rate-per-minute".into(), "3".into()],
        ..Options::default()
    })
    .await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let path = format!("/api/ai/chats/{chat}/send_message/");
    for n in 0..3 {
        assert_eq!(
            app.post(&path, &alice.token, json!({"content": format!("m{n}")}))
                .await
                .0,
            StatusCode::ACCEPTED
        );
    }
    let resp = app
        .client
        .post(app.url(&path))
        .bearer_auth(&alice.token)
        .json(&json!({"content": "one too many"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("slow down"));
    // The WebSocket path counts too, and says so in an error event.
    let mut ws = app.ws(chat, &alice.token, None).await;
    common::send_ws(&mut ws, json!({"type": "message", "content": "via socket"})).await;
    let event = common::next_event(&mut ws, 5).await;
    assert_eq!(event["type"], "error", "{event}");
    // Another user is not affected.
    let bobs = app.create_ai_chat(&bob, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    assert_eq!(
        app.post(
            &format!("/api/ai/chats/{bobs}/send_message/"),
            &bob.token,
            json!({"content": "hi"})
        )
        .await
        .0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        app.get("/api/ai/messages/", &alice.token)
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        3
    );
    app.cleanup().await;
}

#[tokio::test]
async fn the_request_id_travels_from_the_request_into_the_job() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let resp = app
        .client
        .post(app.url(&format!("/api/ai/chats/{chat}/send_message/")))
        .bearer_auth(&alice.token)
        .header("x-request-id", "req-from-the-edge-42")
        .json(&json!({"content": "trace me"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(resp.headers()["x-request-id"], "req-from-the-edge-42");
    let jobs = app.queued_jobs().await;
    assert_eq!(jobs[0]["request_id"], "req-from-the-edge-42");

    // Without one, the API makes one up and still hands it on.
    let resp = app
        .client
        .post(app.url(&format!("/api/ai/chats/{chat}/send_message/")))
        .bearer_auth(&alice.token)
        .json(&json!({"content": "again"}))
        .send()
        .await
        .unwrap();
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(!generated.is_empty());
    let jobs = app.queued_jobs().await;
    assert!(
        jobs.iter().any(|j| j["request_id"] == generated.as_str()),
        "{jobs:?}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn fifty_concurrent_sends_against_a_budget_for_five_reservations_admit_exactly_five() {
    // Each send reserves the most it can cost before it is queued: a full prompt (15) and a
    // full reply (2). The budget holds five such reservations.
    let app = spawn_app_with(Options {
        extra: [
            "--daily-token-budget",
            "85",
            "--context-token-budget",
            "15",
            "--max-completion-tokens",
            "2",
            "--send-rate-per-minute",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        ..Options::default()
    })
    .await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let path = format!("/api/ai/chats/{chat}/send_message/");
    let sends = futures::future::join_all((0..50).map(|_| {
        let req = app
            .client
            .post(app.url(&path))
            .bearer_auth(&alice.token)
            .json(&json!({"content": "hi"}));
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, retry_after, resp.json::<Value>().await.unwrap())
        }
    }))
    .await;
    let admitted = sends
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::ACCEPTED)
        .count();
    assert_eq!(admitted, 5);
    for (status, retry_after, body) in sends.iter().filter(|(s, _, _)| *s != StatusCode::ACCEPTED) {
        assert_eq!(*status, StatusCode::TOO_MANY_REQUESTS);
        let secs: u64 = retry_after.as_deref().unwrap().parse().unwrap();
        assert!((1..=86_400).contains(&secs));
        assert!(body["error"].as_str().unwrap().contains("budget"), "{body}");
    }
    assert_eq!(
        app.get("/api/ai/messages/", &alice.token)
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        admitted
    );
    assert_eq!(app.queued_jobs().await.len(), admitted);
    // Another user's budget is their own.
    let bobs = app.create_ai_chat(&bob, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let (status, _) = app
        .post(
            &format!("/api/ai/chats/{bobs}/send_message/"),
            &bob.token,
            json!({"content": "hi"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    app.cleanup().await;
}
