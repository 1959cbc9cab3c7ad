//! Who may call what: 401 for anonymous callers on every route, 404 for another user's chats.
use crate::common;

use common::spawn_app;
use reqwest::{Method, StatusCode};
use serde_json::json;

/// Every authenticated route of the contract, with `{ai}` / `{chat}` / `{msg}` placeholders.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/logout/"),
    ("GET", "/api/me/"),
    ("GET", "/api/users/"),
    ("GET", "/api/chats/"),
    ("POST", "/api/chats/"),
    ("GET", "/api/chats/{chat}/"),
    ("DELETE", "/api/chats/{chat}/"),
    ("POST", "/api/chats/{chat}/send_message/"),
    ("GET", "/api/chats/{chat}/messages/"),
    ("GET", "/api/ai/chats/"),
    ("POST", "/api/ai/chats/"),
    ("GET", "/api/ai/chats/{ai}/"),
    ("PATCH", "/api/ai/chats/{ai}/"),
    ("PUT", "/api/ai/chats/{ai}/"),
    ("DELETE", "/api/ai/chats/{ai}/"),
    ("POST", "/api/ai/chats/{ai}/send_message/"),
    ("GET", "/api/ai/chats/{ai}/messages/"),
    ("GET", "/api/ai/chats/{ai}/related_chat_context/"),
    ("GET", "/api/ai/messages/"),
    ("GET", "/api/ai/messages/{msg}/"),
    ("GET", "/api/ai/usage/"),
];

fn fill(path: &str, ai: i64, chat: i64, msg: i64) -> String {
    path.replace("{ai}", &ai.to_string())
        .replace("{chat}", &chat.to_string())
        .replace("{msg}", &msg.to_string())
}

fn body_for(method: &str, path: &str) -> Option<serde_json::Value> {
    match method {
        "POST" if path.ends_with("send_message/") => Some(json!({"content": "hi"})),
        "POST" if path == "/api/chats/" => Some(json!({"name": "n"})),
        "POST" if path.ends_with("/logout/") => None,
        "POST" | "PATCH" | "PUT" => Some(json!({"title": "t"})),
        _ => None,
    }
}

#[tokio::test]
async fn every_route_answers_401_to_an_anonymous_or_bad_token_caller() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let chat = app.create_chat(&alice, "c", &[]).await;
    let ai = app
        .create_ai_chat(&alice, json!({"title": "t", "related_chat": chat}))
        .await["id"]
        .as_i64()
        .unwrap();
    let (_, sent) = app
        .post(
            &format!("/api/ai/chats/{ai}/send_message/"),
            &alice.token,
            json!({"content": "x"}),
        )
        .await;
    let msg = sent["message"]["id"].as_i64().unwrap();
    for (method, path) in ROUTES {
        let path = fill(path, ai, chat, msg);
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        for token in [None, Some("not-a-real-token")] {
            let (status, body) = app
                .call(
                    method.clone(),
                    &path,
                    token,
                    body_for(method.as_str(), &path),
                )
                .await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
            assert_eq!(
                body,
                json!({"error": "Authentication required"}),
                "{method} {path}"
            );
        }
    }
    // Nothing was changed by any of them.
    assert_eq!(
        app.get(&format!("/api/ai/chats/{ai}/"), &alice.token)
            .await
            .1["message_count"],
        1
    );
    assert_eq!(
        app.get(&format!("/api/chats/{chat}/"), &alice.token)
            .await
            .0,
        StatusCode::OK
    );
    app.cleanup().await;
}

#[tokio::test]
async fn another_users_chats_and_messages_are_404_on_every_route() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let mallory = app.user("mallory").await;
    let chat = app.create_chat(&alice, "private", &[]).await;
    let ai = app
        .create_ai_chat(&alice, json!({"title": "t", "related_chat": chat}))
        .await["id"]
        .as_i64()
        .unwrap();
    let (_, sent) = app
        .post(
            &format!("/api/ai/chats/{ai}/send_message/"),
            &alice.token,
            json!({"content": "secret"}),
        )
        .await;
    let msg = sent["message"]["id"].as_i64().unwrap();
    let owned: Vec<_> = ROUTES.iter().filter(|(_, p)| p.contains('{')).collect();
    assert_eq!(owned.len(), 12);
    for (method, path) in owned {
        let path = fill(path, ai, chat, msg);
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let (status, body) = app
            .call(
                method.clone(),
                &path,
                Some(&mallory.token),
                body_for(method.as_str(), &path),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert!(body["error"].is_string(), "{method} {path}: {body}");
    }
    // Lists hold nothing of alice's, and nothing of hers changed.
    assert_eq!(app.get("/api/ai/chats/", &mallory.token).await.1, json!([]));
    assert_eq!(
        app.get("/api/ai/messages/", &mallory.token).await.1,
        json!([])
    );
    assert_eq!(app.get("/api/chats/", &mallory.token).await.1, json!([]));
    let (_, detail) = app.get(&format!("/api/ai/chats/{ai}/"), &alice.token).await;
    assert_eq!(
        (detail["title"].as_str(), detail["message_count"].as_i64()),
        (Some("t"), Some(1))
    );
    assert_eq!(
        app.get(&format!("/api/chats/{chat}/messages/"), &alice.token)
            .await
            .1,
        json!([])
    );
    // Mallory cannot link alice's chat to an AI chat of her own.
    let (status, errors) = app
        .post(
            "/api/ai/chats/",
            &mallory.token,
            json!({"title": "x", "related_chat": chat}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        errors,
        json!({"related_chat": ["You must be a participant in the related chat."]})
    );
    app.cleanup().await;
}

#[tokio::test]
async fn once_the_related_chat_is_deleted_its_context_is_gone() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let team = app.create_chat(&bob, "team", &[&alice]).await;
    let ai = app
        .create_ai_chat(&alice, json!({"title": "t", "related_chat": team}))
        .await["id"]
        .as_i64()
        .unwrap();
    let path = format!("/api/ai/chats/{ai}/related_chat_context/");
    assert_eq!(app.get(&path, &alice.token).await.0, StatusCode::OK);
    // Bob deletes the chat: the link goes null and the context with it.
    app.delete(&format!("/api/chats/{team}/"), &bob.token).await;
    assert_eq!(app.get(&path, &alice.token).await.0, StatusCode::NOT_FOUND);
    app.cleanup().await;
}
