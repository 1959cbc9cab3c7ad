//! Staff-only admin endpoints: who may call them, search and filters, token totals, and the
//! re-drive of dead jobs.
use crate::common;

use aichat_fake_llm::{FakeConfig, FakeLlm, Outcome};
use common::{event_of, spawn_app, start_worker};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/admin/ai-chats/"),
    ("GET", "/api/admin/messages/"),
    ("GET", "/api/admin/usage/"),
    ("GET", "/api/admin/dead-jobs/"),
    ("POST", "/api/admin/dead-jobs/nope/redrive/"),
];

#[tokio::test]
async fn admin_routes_are_401_for_anonymous_and_403_for_non_staff() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
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
    let fake = FakeLlm::start(FakeConfig::default()).await.unwrap();
    let app = spawn_app().await;
    let _worker = start_worker(&app, &fake, &[]).await;
    let root = app.user("root").await;
    aichat_shared::db::users::set_staff(&app.db, "root", true)
        .await
        .unwrap();
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let trip = app
        .create_ai_chat(&alice, json!({"title": "Trip to Porto"}))
        .await["id"]
        .as_i64()
        .unwrap();
    app.create_ai_chat(&bob, json!({"title": "Taxes"})).await;
    let (status, reply) = app
        .post(
            &format!("/api/ai/chats/{trip}/send_message/?wait=true"),
            &alice.token,
            json!({"content": "plan it"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");

    let titles = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| c["title"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        titles(&app.get("/api/admin/ai-chats/?q=porto", &root.token).await.1),
        ["Trip to Porto"]
    );
    assert_eq!(
        titles(&app.get("/api/admin/ai-chats/?q=BOB", &root.token).await.1),
        ["Taxes"]
    );
    assert_eq!(
        app.get("/api/admin/ai-chats/", &root.token)
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        app.get("/api/admin/ai-chats/?q=%25", &root.token).await.1,
        json!([]),
        "wildcards are literal"
    );

    let (_, assistant) = app
        .get("/api/admin/messages/?role=assistant", &root.token)
        .await;
    assert_eq!(assistant.as_array().unwrap().len(), 1);
    assert_eq!(assistant[0]["id"], reply["id"]);
    let (_, none) = app
        .get(
            "/api/admin/messages/?since=2999-01-01T00:00:00Z",
            &root.token,
        )
        .await;
    assert_eq!(none, json!([]));
    assert_eq!(
        app.get("/api/admin/messages/?role=robot", &root.token)
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.get("/api/admin/messages/?since=yesterday", &root.token)
            .await
            .0,
        StatusCode::BAD_REQUEST
    );

    let (status, usage) = app.get("/api/admin/usage/", &root.token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(usage.as_array().unwrap().len(), 1, "{usage}");
    assert_eq!(usage[0]["username"], "alice");
    assert_eq!(usage[0]["model"], "gpt-test");
    assert_eq!(usage[0]["total_tokens"], reply["total_tokens"]);
    assert_eq!(usage[0]["message_count"], 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_dead_job_is_listed_and_a_redrive_answers_its_message_once() {
    let fake = FakeLlm::start(FakeConfig {
        always: Some(Outcome::ServerError),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let app = spawn_app().await;
    let _worker = start_worker(&app, &fake, &["--llm-max-attempts", "1"]).await;
    let root = app.user("root").await;
    aichat_shared::db::users::set_staff(&app.db, "root", true)
        .await
        .unwrap();
    let alice = app.user("alice").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let mut ws = app.ws(chat, &alice.token, None).await;
    let (status, _) = app
        .post(
            &format!("/api/ai/chats/{chat}/send_message/?wait=true"),
            &alice.token,
            json!({"content": "hello"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let (_, sent) = event_of(&mut ws, "error", 10).await;
    let message_id = sent[0]["message"]["id"].as_i64().unwrap();

    // The worker publishes the error before apalis moves the job to the dead set (after the
    // handler returns), so the listing may lag the event by a moment.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let dead = loop {
        let (status, dead) = app.get("/api/admin/dead-jobs/", &root.token).await;
        assert_eq!(status, StatusCode::OK);
        let dead = dead.as_array().unwrap().clone();
        if !dead.is_empty() || tokio::time::Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["message_id"], message_id);
    assert_eq!(dead[0]["ai_chat_id"], chat);
    let task_id = dead[0]["task_id"].as_str().unwrap().to_owned();

    // The model is back; the re-drive answers the message, once.
    fake.set_config(FakeConfig::default());
    let (status, body) = app
        .post(
            &format!("/api/admin/dead-jobs/{task_id}/redrive/"),
            &root.token,
            json!({}),
        )
        .await;
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
    let (status, _) = app
        .post(
            &format!("/api/admin/dead-jobs/{task_id}/redrive/"),
            &root.token,
            json!({}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a second re-drive finds nothing"
    );

    let (_, messages) = app
        .get(&format!("/api/ai/chats/{chat}/messages/"), &alice.token)
        .await;
    let statuses: Vec<&str> = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["answered", "complete"]);
    app.cleanup().await;
}
