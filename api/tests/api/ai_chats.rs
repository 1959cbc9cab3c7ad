//! AI chats: create, read, change, delete, their messages and related-chat context.
use crate::common;

use common::spawn_app;
use reqwest::StatusCode;
use serde_json::{Value, json};

const NOT_A_PARTICIPANT: &str = "You must be a participant in the related chat.";

#[tokio::test]
async fn create_answers_every_field_with_the_defaults() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let chat = app
        .create_ai_chat(&alice, json!({"title": "General"}))
        .await;
    let fields: Vec<&str> = chat
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "id",
        "user",
        "user_username",
        "related_chat",
        "related_chat_name",
        "title",
        "system_prompt",
        "model",
        "created_at",
        "updated_at",
        "message_count",
    ];
    expected.sort_unstable();
    let mut fields = fields;
    fields.sort_unstable();
    assert_eq!(fields, expected);
    assert_eq!(chat["user"], alice.id);
    assert_eq!(chat["user_username"], "alice");
    assert_eq!(chat["title"], "General");
    assert_eq!(chat["system_prompt"], "You are a helpful assistant.");
    assert_eq!(chat["model"], "gpt-test", "the server's OPENAI_MODEL");
    assert_eq!(chat["related_chat"], Value::Null);
    assert_eq!(chat["message_count"], 0);

    let custom = app
        .create_ai_chat(&alice, json!({"title": "Pirate", "system_prompt": "Talk like a pirate.", "model": "gpt-4o-mini"}))
        .await;
    assert_eq!(custom["system_prompt"], "Talk like a pirate.");
    assert_eq!(custom["model"], "gpt-4o-mini");

    let (status, detail) = app
        .get(&format!("/api/ai/chats/{}/", chat["id"]), &alice.token)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(detail["messages"], json!([]));
    assert_eq!(detail["title"], "General");
    app.cleanup().await;
}

#[tokio::test]
async fn create_and_update_validate_every_field() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let bobs_chat = app.create_chat(&bob, "bob only", &[]).await;
    let cases = [
        (json!({}), "title"),
        (json!({"title": ""}), "title"),
        (json!({"title": "t".repeat(256)}), "title"),
        (
            json!({"title": "ok", "related_chat": bobs_chat}),
            "related_chat",
        ),
        (
            json!({"title": "ok", "related_chat": 987654}),
            "related_chat",
        ),
        (json!({"title": "ok", "model": ""}), "model"),
        (json!({"title": "ok", "model": "bad model name"}), "model"),
        (
            json!({"title": "ok", "system_prompt": "p".repeat(20_001)}),
            "system_prompt",
        ),
    ];
    for (body, field) in &cases {
        let (status, errors) = app.post("/api/ai/chats/", &alice.token, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(errors[field].is_array(), "{body} -> {errors}");
    }
    let (_, errors) = app
        .post(
            "/api/ai/chats/",
            &alice.token,
            json!({"title": "x", "related_chat": bobs_chat}),
        )
        .await;
    assert_eq!(errors, json!({"related_chat": [NOT_A_PARTICIPANT]}));
    assert_eq!(
        app.get("/api/ai/chats/", &alice.token).await.1,
        json!([]),
        "nothing stored"
    );

    // PATCH and PUT apply the same rules (the old app skipped the participant check here).
    let chat = app.create_ai_chat(&alice, json!({"title": "mine"})).await;
    let path = format!("/api/ai/chats/{}/", chat["id"]);
    for (body, field) in cases.iter().skip(1) {
        let (status, errors) = app.patch(&path, &alice.token, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "PATCH {body}");
        assert!(errors[field].is_array(), "PATCH {body} -> {errors}");
        let (status, _) = app.put(&path, &alice.token, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "PUT {body}");
    }
    let (status, errors) = app
        .put(&path, &alice.token, json!({"system_prompt": "no title"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(errors["title"].is_array());
    let (_, unchanged) = app.get(&path, &alice.token).await;
    assert_eq!(unchanged["title"], "mine");
    assert_eq!(unchanged["updated_at"], chat["updated_at"]);
    app.cleanup().await;
}

#[tokio::test]
async fn patch_changes_only_what_is_sent_and_null_unlinks() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let team = app.create_chat(&alice, "team", &[]).await;
    let chat = app
        .create_ai_chat(&alice, json!({"title": "a", "related_chat": team}))
        .await;
    let path = format!("/api/ai/chats/{}/", chat["id"]);

    let (status, patched) = app
        .patch(&path, &alice.token, json!({"system_prompt": "Be brief."}))
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["system_prompt"], "Be brief.");
    assert_eq!(patched["title"], "a");
    assert_eq!(patched["related_chat"], team);

    let (_, patched) = app
        .patch(&path, &alice.token, json!({"related_chat": null}))
        .await;
    assert_eq!(patched["related_chat"], Value::Null);
    assert_eq!(patched["system_prompt"], "Be brief.");

    let (status, put) = app
        .put(
            &path,
            &alice.token,
            json!({"title": "b", "related_chat": team, "model": "m-2"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            put["title"].as_str(),
            put["related_chat"].as_i64(),
            put["model"].as_str()
        ),
        (Some("b"), Some(team), Some("m-2"))
    );
    assert_eq!(put["related_chat_name"], "team");
    app.cleanup().await;
}

#[tokio::test]
async fn list_is_most_recently_updated_first_and_delete_takes_the_messages() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let first = app.create_ai_chat(&alice, json!({"title": "first"})).await;
    let second = app.create_ai_chat(&alice, json!({"title": "second"})).await;
    let titles = |list: &Value| {
        list.as_array()
            .unwrap()
            .iter()
            .map(|c| c["title"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        titles(&app.get("/api/ai/chats/", &alice.token).await.1),
        ["second", "first"]
    );

    let (status, sent) = app
        .post(
            &format!("/api/ai/chats/{}/send_message/", first["id"]),
            &alice.token,
            json!({"content": "bump"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
    let (_, list) = app.get("/api/ai/chats/", &alice.token).await;
    assert_eq!(titles(&list), ["first", "second"]);
    assert_eq!(list[0]["message_count"], 1);
    // A send does not write the chat's row; its `updated_at` is the newest message's time.
    assert_eq!(list[0]["updated_at"], sent["message"]["timestamp"]);

    let message_id = sent["message"]["id"].as_i64().unwrap();
    let (status, _) = app
        .delete(&format!("/api/ai/chats/{}/", first["id"]), &alice.token)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get(&format!("/api/ai/messages/{message_id}/"), &alice.token)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        titles(&app.get("/api/ai/chats/", &alice.token).await.1),
        ["second"]
    );
    let _ = second;
    app.cleanup().await;
}

#[tokio::test]
async fn messages_page_with_after_id_and_limit_oldest_first() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await;
    let id = chat["id"].as_i64().unwrap();
    let mut ids = Vec::new();
    for n in 0..5 {
        let (_, sent) = app
            .post(
                &format!("/api/ai/chats/{id}/send_message/"),
                &alice.token,
                json!({"content": format!("m{n}")}),
            )
            .await;
        ids.push(sent["message"]["id"].as_i64().unwrap());
    }
    let page = |q: &str| {
        let path = format!("/api/ai/chats/{id}/messages/{q}");
        let token = alice.token.clone();
        let app = &app;
        async move { app.get(&path, &token).await }
    };
    let (status, all) = page("").await;
    assert_eq!(status, StatusCode::OK);
    let got: Vec<i64> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, ids);
    let m = &all[0];
    for field in [
        "id",
        "ai_chat",
        "role",
        "content",
        "timestamp",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "status",
        "model",
    ] {
        assert!(m.get(field).is_some(), "{field} missing in {m}");
    }
    assert_eq!(
        (
            m["role"].as_str(),
            m["status"].as_str(),
            m["ai_chat"].as_i64()
        ),
        (Some("user"), Some("queued"), Some(id))
    );
    assert_eq!(m["total_tokens"], Value::Null);

    let (_, after) = page(&format!("?after_id={}&limit=2", ids[1])).await;
    let got: Vec<i64> = after
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, ids[2..4]);
    for bad in [
        "?limit=0",
        "?limit=-1",
        "?limit=1001",
        "?after_id=-5",
        "?limit=abc",
        "?after_id=99999999999999999999999",
    ] {
        let (status, body) = page(bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body.is_object(), "{bad}: {body}");
    }

    // The user's messages across chats, and one by id.
    let (_, mine) = app.get("/api/ai/messages/", &alice.token).await;
    assert_eq!(mine, all);
    let (status, one) = app
        .get(&format!("/api/ai/messages/{}/", ids[3]), &alice.token)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one, all[3]);
    app.cleanup().await;
}

#[tokio::test]
async fn related_chat_context_answers_the_latest_messages_oldest_first() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let team = app.create_chat(&alice, "team", &[&bob]).await;
    for n in 0..6 {
        let who = if n % 2 == 0 { &alice } else { &bob };
        app.post(
            &format!("/api/chats/{team}/send_message/"),
            &who.token,
            json!({"content": format!("line {n}")}),
        )
        .await;
    }
    let unlinked = app.create_ai_chat(&alice, json!({"title": "none"})).await;
    let (status, body) = app
        .get(
            &format!("/api/ai/chats/{}/related_chat_context/", unlinked["id"]),
            &alice.token,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"error": "No related chat linked to this AI chat"})
    );

    let linked = app
        .create_ai_chat(&alice, json!({"title": "ctx", "related_chat": team}))
        .await;
    let path = format!("/api/ai/chats/{}/related_chat_context/", linked["id"]);
    let (status, ctx) = app
        .get(&format!("{path}?message_limit=3"), &alice.token)
        .await;
    assert_eq!(status, StatusCode::OK, "{ctx}");
    assert_eq!(ctx["chat_name"], "team");
    assert_eq!(ctx["message_count"], 3);
    let lines: Vec<String> = ctx["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{}: {}",
                m["sender"].as_str().unwrap(),
                m["content"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(lines, ["bob: line 3", "alice: line 4", "bob: line 5"]);
    assert!(ctx["messages"][0]["timestamp"].is_string());
    let (_, all) = app.get(&path, &alice.token).await;
    assert_eq!(all["message_count"], 6, "default limit 50");
    for bad in ["0", "201", "-1", "x"] {
        let (status, _) = app
            .get(&format!("{path}?message_limit={bad}"), &alice.token)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    app.cleanup().await;
}
