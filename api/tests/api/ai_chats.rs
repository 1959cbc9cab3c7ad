//! AI chats: create, read, change, delete, their messages and related-chat context.
use crate::common;

use common::{Replied, app_with_users, id, ids, messages_path, texts};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn create_answers_every_field_with_the_defaults() {
    let (app, [alice]) = app_with_users(["alice"]).await;
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
    let (app, [alice, bob]) = app_with_users(["alice", "bob"]).await;
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
    app.assert_field_errors(Method::POST, "/api/ai/chats/", &alice.token, &cases)
        .await;
    app.assert_cannot_link(&alice, bobs_chat).await;
    assert!(
        app.list("/api/ai/chats/", &alice.token).await.is_empty(),
        "nothing stored"
    );

    // PATCH and PUT apply the same rules (the old app skipped the participant check here).
    let chat = app.create_ai_chat(&alice, json!({"title": "mine"})).await;
    let path = format!("/api/ai/chats/{}/", chat["id"]);
    app.assert_field_errors(Method::PATCH, &path, &alice.token, &cases[1..])
        .await;
    for (body, _) in &cases[1..] {
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
    let (app, [alice]) = app_with_users(["alice"]).await;
    let team = app.create_chat(&alice, "team", &[]).await;
    let path = format!(
        "/api/ai/chats/{}/",
        app.linked_ai_chat_id(&alice, team).await
    );

    let (status, patched) = app
        .patch(&path, &alice.token, json!({"system_prompt": "Be brief."}))
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["system_prompt"], "Be brief.");
    assert_eq!(patched["title"], "t");
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
    let (app, [alice]) = app_with_users(["alice"]).await;
    let first = id(&app.create_ai_chat(&alice, json!({"title": "first"})).await);
    app.create_ai_chat(&alice, json!({"title": "second"})).await;
    let titles = || async { texts(&app.list("/api/ai/chats/", &alice.token).await, "title") };
    assert_eq!(titles().await, ["second", "first"]);

    let sent = app.send_ok(&alice, first, "bump").await;
    let list = app.list("/api/ai/chats/", &alice.token).await;
    assert_eq!(texts(&list, "title"), ["first", "second"]);
    assert_eq!(list[0]["message_count"], 1);
    // A send does not write the chat's row; its `updated_at` is the newest message's time.
    assert_eq!(list[0]["updated_at"], sent["timestamp"]);

    let (status, _) = app
        .delete(&format!("/api/ai/chats/{first}/"), &alice.token)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get(&format!("/api/ai/messages/{}/", id(&sent)), &alice.token)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(titles().await, ["second"]);
    app.cleanup().await;
}

#[tokio::test]
async fn messages_page_with_after_id_and_limit_oldest_first() {
    let (app, [alice, mallory]) = app_with_users(["alice", "mallory"]).await;
    let chat = app.ai_chat_id(&alice).await;
    let mut sent = Vec::new();
    for n in 0..5 {
        sent.push(id(&app.send_ok(&alice, chat, &format!("m{n}")).await));
    }
    let page = |query: &str| {
        let path = format!("{}{query}", messages_path(chat));
        let app = &app;
        let token = &alice.token;
        async move { app.list(&path, token).await }
    };
    let all = page("").await;
    assert_eq!(ids(&all), sent);
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
        "cost",
        "currency",
    ] {
        assert!(m.get(field).is_some(), "{field} missing in {m}");
    }
    assert_eq!(
        (
            m["role"].as_str(),
            m["status"].as_str(),
            m["ai_chat"].as_i64()
        ),
        (Some("user"), Some("queued"), Some(chat))
    );
    assert_eq!(m["total_tokens"], Value::Null);
    assert_eq!((&m["cost"], &m["currency"]), (&Value::Null, &Value::Null));

    let after = page(&format!("?after_id={}&limit=2", sent[1])).await;
    assert_eq!(ids(&after), sent[2..4]);
    // Past the last message: an empty page of the owner's chat, and no page of someone else's
    // (the ownership check is part of the page's query, and an empty page asks again).
    assert!(page(&format!("?after_id={}", sent[4])).await.is_empty());
    let empty_chat = app.ai_chat_id(&alice).await;
    assert!(
        app.list(&messages_path(empty_chat), &alice.token)
            .await
            .is_empty()
    );
    for path in [
        messages_path(chat),
        format!("{}?after_id={}", messages_path(chat), sent[4]),
        messages_path(empty_chat),
    ] {
        assert_eq!(
            app.get(&path, &mallory.token).await.0,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    let bad = [
        "?limit=0",
        "?limit=-1",
        "?limit=1001",
        "?after_id=-5",
        "?limit=abc",
        "?after_id=99999999999999999999999",
    ];
    let bad = bad.map(|query| format!("{}{query}", messages_path(chat)));
    app.assert_bad_queries(&alice.token, bad).await;

    // The user's messages across chats, and one by id.
    assert_eq!(app.my_messages(&alice).await, all);
    let (status, one) = app
        .get(&format!("/api/ai/messages/{}/", sent[3]), &alice.token)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one, all[3]);
    app.cleanup().await;
}

#[tokio::test]
async fn related_chat_context_answers_the_latest_messages_oldest_first() {
    let (app, [alice, bob]) = app_with_users(["alice", "bob"]).await;
    let team = app.create_chat(&alice, "team", &[&bob]).await;
    for n in 0..6 {
        let who = if n % 2 == 0 { &alice } else { &bob };
        let (status, body) = app
            .post(
                &format!("/api/chats/{team}/send_message/"),
                &who.token,
                json!({"content": format!("line {n}")}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
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

    let linked = app.linked_ai_chat_id(&alice, team).await;
    let path = format!("/api/ai/chats/{linked}/related_chat_context/");
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
    let bad = ["0", "201", "-1", "x"].map(|limit| format!("{path}?message_limit={limit}"));
    app.assert_bad_queries(&alice.token, bad).await;
    app.cleanup().await;
}

/// A database that gives up on a statement (a `lock_timeout` or `statement_timeout` set on the
/// server, as managed PostgreSQL often has) is a backing service out of time, not a bug:
/// 503 with `Retry-After`, and nothing changed.
#[tokio::test]
async fn a_request_the_database_times_out_gets_503_and_changes_nothing() {
    let (app, [alice]) = app_with_users(["alice"]).await;
    let chat = id(&app.create_ai_chat(&alice, json!({"title": "kept"})).await);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "alter database \"{}\" set lock_timeout = '200ms'",
        app.db_name
    )))
    .execute(&app.db)
    .await
    .expect("set the lock timeout");
    // An instance whose connections are opened from now on, with the setting.
    let timed = app.another_instance(&[]).await;
    let lock = app.holding_row("ai_chats", chat).await;
    let deleted = timed
        .request(Method::DELETE, &format!("/api/ai/chats/{chat}/"))
        .bearer_auth(&alice.token)
        .reply()
        .await;
    assert_eq!(
        deleted.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{deleted:?}"
    );
    assert!(
        deleted.retry_after().is_some_and(|secs| secs >= 1),
        "{deleted:?}"
    );
    assert!(deleted.json()["error"].is_string(), "{deleted:?}");
    lock.rollback().await.expect("rollback");
    let (status, _) = app
        .get(&format!("/api/ai/chats/{chat}/"), &alice.token)
        .await;
    assert_eq!(status, StatusCode::OK);
    drop(timed);
    app.cleanup().await;
}
