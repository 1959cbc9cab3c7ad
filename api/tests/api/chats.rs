//! User-to-user chats and their messages.
use crate::common;

use common::spawn_app;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn creating_a_chat_adds_the_creator_and_the_named_participants() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let (status, chat) = app
        .post(
            "/api/chats/",
            &alice.token,
            json!({"name": "Project", "participant_ids": [bob.id], "participant_usernames": ["carol", "ghost"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{chat}");
    assert_eq!(chat["name"], "Project");
    assert!(chat["id"].is_i64() && chat["created_at"].is_string());
    let ids: Vec<i64> = chat["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![alice.id, bob.id, carol.id], "ghost is skipped");
    assert_eq!(
        chat["participants"][1],
        json!({"id": bob.id, "username": "bob"})
    );

    // Every participant sees it; the single GET answers the same object.
    for user in [&alice, &bob, &carol] {
        let (status, list) = app.get("/api/chats/", &user.token).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(list, json!([chat.clone()]));
    }
    let (status, one) = app
        .get(&format!("/api/chats/{}/", chat["id"]), &bob.token)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one, chat);
    app.cleanup().await;
}

#[tokio::test]
async fn unknown_participant_ids_and_bad_names_are_400_and_create_nothing() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let cases = [
        (
            json!({"name": "x", "participant_ids": [999999]}),
            "participant_ids",
        ),
        (json!({"participant_ids": []}), "name"),
        (json!({"name": "   "}), "name"),
        (json!({"name": "n".repeat(256)}), "name"),
    ];
    for (body, field) in cases {
        let (status, errors) = app.post("/api/chats/", &alice.token, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(errors[field].is_array(), "{body} -> {errors}");
    }
    let (status, body) = app
        .post(
            "/api/chats/",
            &alice.token,
            json!({"name": "x", "participant_ids": ["a"]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"participant_ids[0]": ["Expected an integer, got a string."]})
    );
    assert_eq!(app.get("/api/chats/", &alice.token).await.1, json!([]));
    app.cleanup().await;
}

#[tokio::test]
async fn participants_send_and_read_messages_oldest_first() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.create_chat(&alice, "c", &[&bob]).await;
    let path = format!("/api/chats/{chat}/send_message/");
    let (status, first) = app
        .post(&path, &alice.token, json!({"content": "hello"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["chat"], chat);
    assert_eq!(first["content"], "hello");
    assert_eq!(
        first["sender"],
        json!({"id": alice.id, "username": "alice"})
    );
    assert!(first["id"].is_i64() && first["timestamp"].is_string());
    let (_, second) = app
        .post(&path, &bob.token, json!({"content": "hi alice"}))
        .await;

    let (status, list) = app
        .get(&format!("/api/chats/{chat}/messages/"), &alice.token)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list, json!([first, second]));

    for body in [
        json!({"content": "  "}),
        json!({}),
        json!({"content": "x".repeat(32_001)}),
    ] {
        let (status, errors) = app.post(&path, &alice.token, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(errors["content"].is_array(), "{errors}");
    }
    assert_eq!(
        app.get(&format!("/api/chats/{chat}/messages/"), &alice.token)
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        2
    );
    app.cleanup().await;
}

#[tokio::test]
async fn deleting_a_chat_leaves_linked_ai_chats_with_a_null_related_chat() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let chat = app.create_chat(&alice, "team", &[]).await;
    let ai = app
        .create_ai_chat(&alice, json!({"title": "helper", "related_chat": chat}))
        .await;
    assert_eq!(ai["related_chat"], chat);
    assert_eq!(ai["related_chat_name"], "team");

    let (status, body) = app
        .delete(&format!("/api/chats/{chat}/"), &alice.token)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(
        app.get(&format!("/api/chats/{chat}/"), &alice.token)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (status, ai) = app
        .get(&format!("/api/ai/chats/{}/", ai["id"]), &alice.token)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ai["related_chat"], serde_json::Value::Null);
    assert_eq!(ai["related_chat_name"], serde_json::Value::Null);
    app.cleanup().await;
}
