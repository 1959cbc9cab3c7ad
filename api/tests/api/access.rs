//! Who may call what: 401 for anonymous callers on every route, 404 for another user's chats.
use crate::common;

use common::{TestApp, TestUser, app_with_users, assert_error, id};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

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
    ("GET", "/api/ai/quota/"),
];

/// Calls `route` of `ROUTES` as `token` on the objects `ids` names (chat, AI chat, message),
/// with the body the route takes; the route as it was called ("METHOD /path"), the status and
/// the body of the answer.
async fn call(
    app: &TestApp,
    (method, path): &(&str, &str),
    (chat, ai, msg): (i64, i64, i64),
    token: Option<&str>,
) -> (String, StatusCode, Value) {
    let path = path
        .replace("{ai}", &ai.to_string())
        .replace("{chat}", &chat.to_string())
        .replace("{msg}", &msg.to_string());
    let body = match *method {
        "POST" if path.ends_with("send_message/") => Some(json!({"content": "hi"})),
        "POST" if path == "/api/chats/" => Some(json!({"name": "n"})),
        "POST" if path.ends_with("/logout/") => None,
        "POST" | "PATCH" | "PUT" => Some(json!({"title": "t"})),
        _ => None,
    };
    let method = Method::from_bytes(method.as_bytes()).expect("a method");
    let (status, answer) = app.call(method.clone(), &path, token, body).await;
    (format!("{method} {path}"), status, answer)
}

/// What every route of `ROUTES` is tried on: `owner`'s chat named `name`, an AI chat linked
/// to it, and a message sent to the AI chat; their ids.
async fn owned(app: &TestApp, owner: &TestUser, name: &str, content: &str) -> (i64, i64, i64) {
    let chat = app.create_chat(owner, name, &[]).await;
    let ai = app.linked_ai_chat_id(owner, chat).await;
    let msg = id(&app.send_ok(owner, ai, content).await);
    (chat, ai, msg)
}

#[tokio::test]
async fn every_route_answers_401_to_an_anonymous_or_bad_token_caller() {
    let (app, [alice]) = app_with_users(["alice"]).await;
    let ids = owned(&app, &alice, "c", "x").await;
    let (chat, ai, _) = ids;
    for route in ROUTES {
        for token in [None, Some("not-a-real-token")] {
            let (route, status, body) = call(&app, route, ids, token).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{route} with {token:?}");
            assert_eq!(body, json!({"error": "Authentication required"}), "{route}");
        }
    }
    // Nothing was changed by any of them.
    let (_, detail) = app.get(&format!("/api/ai/chats/{ai}/"), &alice.token).await;
    assert_eq!(detail["message_count"], 1);
    let (status, _) = app.get(&format!("/api/chats/{chat}/"), &alice.token).await;
    assert_eq!(status, StatusCode::OK);
    app.cleanup().await;
}

#[tokio::test]
async fn another_users_chats_and_messages_are_404_on_every_route() {
    let (app, [alice, mallory]) = app_with_users(["alice", "mallory"]).await;
    let ids = owned(&app, &alice, "private", "secret").await;
    let (chat, ai, _) = ids;
    let routes: Vec<_> = ROUTES.iter().filter(|(_, p)| p.contains('{')).collect();
    assert_eq!(routes.len(), 12);
    for route in routes {
        let (route, status, body) = call(&app, route, ids, Some(&mallory.token)).await;
        assert_error(&route, (status, &body), StatusCode::NOT_FOUND);
    }
    // Lists hold nothing of alice's, and nothing of hers changed.
    for list in ["/api/ai/chats/", "/api/ai/messages/", "/api/chats/"] {
        assert!(app.list(list, &mallory.token).await.is_empty(), "{list}");
    }
    let (_, detail) = app.get(&format!("/api/ai/chats/{ai}/"), &alice.token).await;
    assert_eq!(
        (detail["title"].as_str(), detail["message_count"].as_i64()),
        (Some("t"), Some(1))
    );
    let chat_messages = format!("/api/chats/{chat}/messages/");
    assert!(app.list(&chat_messages, &alice.token).await.is_empty());
    // Mallory cannot link alice's chat to an AI chat of her own.
    app.assert_cannot_link(&mallory, chat).await;
    app.cleanup().await;
}

#[tokio::test]
async fn once_the_related_chat_is_deleted_its_context_is_gone() {
    let (app, [alice, bob]) = app_with_users(["alice", "bob"]).await;
    let team = app.create_chat(&bob, "team", &[&alice]).await;
    let ai = app.linked_ai_chat_id(&alice, team).await;
    let path = format!("/api/ai/chats/{ai}/related_chat_context/");
    assert_eq!(app.get(&path, &alice.token).await.0, StatusCode::OK);
    // Bob deletes the chat: the link goes null and the context with it.
    let (status, _) = app.delete(&format!("/api/chats/{team}/"), &bob.token).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(app.get(&path, &alice.token).await.0, StatusCode::NOT_FOUND);
    app.cleanup().await;
}
