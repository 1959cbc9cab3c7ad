//! User-to-user chats and their messages.
use crate::common;

use common::{app_with_users, ids};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Participants by id and by username; a username in a look-alike spelling (full-width
/// letters, folded by NFKC as at registration and login) names its user.
#[tokio::test]
async fn creating_a_chat_adds_the_creator_and_the_named_participants() {
    let (app, [alice, bob, carol]) = app_with_users(["alice", "bob", "carol"]).await;
    let (status, chat) = app
        .post(
            "/api/chats/",
            &alice.token,
            json!({"name": "Project", "participant_ids": [bob.id], "participant_usernames": ["ｃａｒｏｌ", "ghost"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{chat}");
    assert_eq!(chat["name"], "Project");
    assert!(chat["id"].is_i64() && chat["created_at"].is_string());
    let participants = common::items(&chat["participants"]);
    assert_eq!(
        ids(participants),
        [alice.id, bob.id, carol.id],
        "carol found by her full-width spelling; ghost is skipped"
    );
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
    let (app, [alice]) = app_with_users(["alice"]).await;
    let cases = [
        (
            json!({"name": "x", "participant_ids": [999999]}),
            "participant_ids",
        ),
        (json!({"participant_ids": []}), "name"),
        (json!({"name": "   "}), "name"),
        (json!({"name": "n".repeat(256)}), "name"),
    ];
    app.assert_field_errors(Method::POST, "/api/chats/", &alice.token, &cases)
        .await;
    let named = json!({"name": "x", "participant_ids": ["a"]});
    let (status, body) = app.post("/api/chats/", &alice.token, named).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"participant_ids[0]": ["Expected an integer, got a string."]})
    );
    assert!(app.list("/api/chats/", &alice.token).await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn participants_send_and_read_messages_oldest_first() {
    let (app, [alice, bob]) = app_with_users(["alice", "bob"]).await;
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

    let messages = format!("/api/chats/{chat}/messages/");
    assert_eq!(app.list(&messages, &alice.token).await, [first, second]);

    let bad: [(Value, &str); 3] = [
        (json!({"content": "  "}), "content"),
        (json!({}), "content"),
        (json!({"content": "x".repeat(32_001)}), "content"),
    ];
    app.assert_field_errors(Method::POST, &path, &alice.token, &bad)
        .await;
    assert_eq!(app.list(&messages, &alice.token).await.len(), 2);
    app.cleanup().await;
}

#[tokio::test]
async fn deleting_a_chat_leaves_linked_ai_chats_with_a_null_related_chat() {
    let (app, [alice]) = app_with_users(["alice"]).await;
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
    assert_eq!(ai["related_chat"], Value::Null);
    assert_eq!(ai["related_chat_name"], Value::Null);
    app.cleanup().await;
}

/// A message sent, or an AI chat linked, to a chat another request deletes meanwhile (after the
/// checks that found it, before the write): 409, not 500, and nothing stored.
#[tokio::test]
async fn a_write_racing_the_deletion_of_its_chat_is_a_conflict() {
    let (app, [alice]) = app_with_users(["alice"]).await;
    for what in ["send", "link"] {
        let chat = app.create_chat(&alice, "c", &[]).await;
        // The chat's row held `for update`: the write's foreign-key check waits for it.
        let mut lock = app.holding_row("chats", chat).await;
        let mut request = Box::pin(async {
            match what {
                "send" => {
                    let path = format!("/api/chats/{chat}/send_message/");
                    app.post(&path, &alice.token, json!({"content": "hello"}))
                        .await
                }
                _ => {
                    let body = json!({"title": "helper", "related_chat": chat});
                    app.post("/api/ai/chats/", &alice.token, body).await
                }
            }
        });
        app.until_it_waits_for_a_lock(&mut request).await;
        sqlx::query("delete from chats where id = $1")
            .bind(chat)
            .execute(&mut *lock)
            .await
            .expect("deleting the chat");
        lock.commit().await.expect("commit");
        let (status, body) = request.await;
        assert_eq!(status, StatusCode::CONFLICT, "{what}: {body}");
        assert!(body["error"].is_string(), "{what}: {body}");
    }
    assert!(app.list("/api/ai/chats/", &alice.token).await.is_empty());
    app.cleanup().await;
}
