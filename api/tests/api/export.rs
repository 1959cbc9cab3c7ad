//! Export of an AI chat (JSON, the whole tree or the active path; Markdown) and import of a JSON
//! export as a new chat: the real API, and for the round trips the worker and the fake model.
use crate::common;

use std::collections::HashMap;

use aichat_fake_llm::FakeConfig;
use common::{
    Replied, Stack, TestApp, TestUser, id, messages_path, spawn_app, spawn_app_with_flags,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const IMPORT: &str = "/api/ai/chats/import/";

fn export_path(chat: i64, query: &str) -> String {
    format!("/api/ai/chats/{chat}/export/{query}")
}

/// `user`'s JSON export of `chat` (`?all=true` with `all`), which must be 200.
async fn export(app: &TestApp, user: &TestUser, chat: i64, all: bool) -> Value {
    let query = if all { "?all=true" } else { "" };
    let (status, body) = app.get(&export_path(chat, query), &user.token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// `user`'s Markdown export of `chat`, which must be 200: the whole reply.
async fn markdown(app: &TestApp, user: &TestUser, chat: i64) -> common::Reply {
    let reply = app
        .request(Method::GET, &export_path(chat, "?format=markdown"))
        .bearer_auth(&user.token)
        .reply()
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    reply
}

/// Imports `document` as `user`, which must be 201: the new chat.
async fn import_ok(app: &TestApp, user: &TestUser, document: &Value) -> Value {
    let (status, chat) = app.post(IMPORT, &user.token, document.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{chat}");
    chat
}

/// Every message of `chat`, every version.
async fn all_messages(app: &TestApp, user: &TestUser, chat: i64) -> Vec<Value> {
    app.list(&format!("{}?all=true", messages_path(chat)), &user.token)
        .await
}

/// An export with each id replaced by the message's position, and parent ids likewise; without
/// what an import makes anew (`exported_at`, the chat's `created_at`).
fn by_position(export: &Value) -> Value {
    let messages = export["messages"].as_array().expect("messages");
    let position: HashMap<i64, usize> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| (id(m), i))
        .collect();
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            m["id"] = json!(position[&id(&m)]);
            if let Some(parent) = m["parent_id"].as_i64() {
                m["parent_id"] = json!(position[&parent]);
            }
            m
        })
        .collect();
    let mut normalized = export.clone();
    normalized["exported_at"] = Value::Null;
    normalized["chat"]["created_at"] = Value::Null;
    normalized["messages"] = json!(messages);
    normalized
}

/// `"2026-12-04T16:05:07.123Z"` as the Markdown export writes it: `2026-12-04 16:05 UTC`.
fn minutes(timestamp: &Value) -> String {
    let text = timestamp.as_str().expect("a timestamp");
    format!("{} {} UTC", &text[..10], &text[11..16])
}

/// One message of an import document.
fn message(id: i64, parent: Option<i64>, role: &str, content: &str, status: &str) -> Value {
    json!({"id": id, "parent_id": parent, "role": role, "content": content, "status": status,
           "version": 1, "active": true})
}

/// An import document of a chat titled "Imported" holding `messages`.
fn document(messages: Vec<Value>) -> Value {
    json!({
        "format": "aichat.chat",
        "version": 1,
        "exported_at": "2026-12-01T10:00:00Z",
        "chat": {"title": "Imported", "system_prompt": "Be brief.", "model": "gpt-test"},
        "messages": messages,
    })
}

/// A small valid conversation: a question and its reply.
fn one_turn() -> Vec<Value> {
    vec![
        message(10, None, "user", "hi", "answered"),
        message(11, Some(10), "assistant", "hello", "complete"),
    ]
}

#[tokio::test]
async fn an_exported_tree_imports_as_the_same_tree_under_new_ids() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = id(&stack
        .create_ai_chat(
            &alice,
            json!({"title": "Trip plans", "system_prompt": "Talk like a guide.", "model": "gpt-4o-mini"}),
        )
        .await);
    let mut questions = Vec::new();
    for content in ["where to go?", "and when?"] {
        let (status, reply) = stack.send_waiting(&alice, chat, content, "true").await;
        assert_eq!(status, StatusCode::OK, "{reply}");
        questions.push(reply["reply_to"].as_i64().expect("reply_to"));
    }
    // A second reply to the second question, then a new version of the first question (the
    // second turn stays behind on the old branch), then a turn on the new branch.
    let (status, regenerated) = stack
        .post(
            &format!("/api/ai/messages/{}/regenerate/?wait=true", questions[1]),
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{regenerated}");
    assert_eq!(regenerated["version"], 2);
    let (status, edited) = stack
        .post(
            &format!("/api/ai/messages/{}/edit/?wait=true", questions[0]),
            &alice.token,
            json!({"content": "where to go in spring?"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{edited}");
    let (status, _) = stack
        .send_waiting(&alice, chat, "what to pack?", "true")
        .await;
    assert_eq!(status, StatusCode::OK);

    let original = export(&stack, &alice, chat, true).await;
    assert_eq!(original["format"], "aichat.chat");
    assert_eq!(original["version"], 1);
    assert_eq!(
        original["chat"],
        json!({"title": "Trip plans", "system_prompt": "Talk like a guide.", "model": "gpt-4o-mini",
               "created_at": original["chat"]["created_at"]})
    );
    let messages = original["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 9, "4 questions and 5 replies: {original}");
    assert!(
        messages.iter().any(|m| m["active"] == false),
        "the old branch is in the export: {original}"
    );
    let mut fields: Vec<&str> = messages[0]
        .as_object()
        .expect("a message")
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "active",
            "completion_tokens",
            "content",
            "cost",
            "currency",
            "error",
            "id",
            "model",
            "parent_id",
            "prompt_tokens",
            "role",
            "status",
            "stopped",
            "timestamp",
            "total_tokens",
            "version",
        ]
    );
    // The active path alone: what the chat shows.
    let active = export(&stack, &alice, chat, false).await;
    let shown: Vec<Value> = stack
        .messages(&alice, chat)
        .await
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    let exported: Vec<Value> = active["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(exported, shown);

    let imported = import_ok(&stack, &alice, &original).await;
    let copy = id(&imported);
    assert_ne!(copy, chat);
    assert_eq!(imported["title"], "Trip plans");
    assert_eq!(imported["model"], "gpt-4o-mini");
    assert_eq!(imported["related_chat"], Value::Null);
    assert_eq!(
        imported["message_count"],
        active["messages"].as_array().map(Vec::len).unwrap_or(0)
    );
    let again = export(&stack, &alice, copy, true).await;
    let old_ids: Vec<i64> = messages.iter().map(id).collect();
    assert!(
        again["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .all(|m| !old_ids.contains(&id(m))),
        "new ids: {again}"
    );
    assert_eq!(by_position(&again), by_position(&original));

    // The copy goes on from the end of its active path, as the original would.
    let (status, reply) = stack
        .send_waiting(&alice, copy, "and the weather?", "true")
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let copied = all_messages(&stack, &alice, copy).await;
    let last_question = copied
        .iter()
        .filter(|m| m["role"] == "user" && m["active"] == true && m["id"] != reply["reply_to"])
        .map(id)
        .max();
    let new_question = copied
        .iter()
        .find(|m| m["id"] == reply["reply_to"])
        .expect("the new question");
    assert_eq!(new_question["parent_id"].as_i64(), last_question);
    stack.cleanup().await;
}

#[tokio::test]
async fn the_markdown_export_reads_as_the_active_conversation() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = id(&stack
        .create_ai_chat(
            &alice,
            json!({"title": "Weekend: plans & ideas!", "model": "gpt-4o-mini"}),
        )
        .await);
    let (status, first) = stack
        .send_waiting(&alice, chat, "What should we cook?", "true")
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (status, edited) = stack
        .post(
            &format!("/api/ai/messages/{}/edit/?wait=true", first["reply_to"]),
            &alice.token,
            json!({"content": "What should we bake?"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{edited}");

    let reply = markdown(&stack, &alice, chat).await;
    assert_eq!(reply.header("content-type"), "text/markdown; charset=utf-8");
    assert_eq!(
        reply.header("content-disposition"),
        format!("attachment; filename=\"aichat-{chat}-weekend-plans-ideas.md\"")
    );
    let text = &reply.text;
    assert!(text.starts_with("# Weekend: plans & ideas!\n"), "{text}");
    assert!(text.contains("gpt-4o-mini"), "{text}");
    let shown = stack.messages(&alice, chat).await;
    assert_eq!(shown.len(), 2, "{shown:?}");
    let question = &shown[0];
    let answer = &shown[1];
    let model = answer["model"].as_str().expect("the reply's model");
    for expected in [
        format!("### You — {}", minutes(&question["timestamp"])),
        "What should we bake?".to_owned(),
        format!(
            "### Assistant ({model}) — {}",
            minutes(&answer["timestamp"])
        ),
        answer["content"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_owned(),
    ] {
        assert!(text.contains(&expected), "no {expected:?} in:\n{text}");
    }
    assert!(
        text.find("### You").unwrap_or(usize::MAX) < text.find("### Assistant").unwrap_or(0),
        "{text}"
    );
    assert!(
        !text.contains("cook"),
        "the old branch is left out:\n{text}"
    );

    // Every branch is JSON's alone.
    let (status, errors) = stack
        .get(
            &export_path(chat, "?format=markdown&all=true"),
            &alice.token,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{errors}");
    assert!(errors["all"].is_array(), "{errors}");
    stack.cleanup().await;
}

#[tokio::test]
async fn the_markdown_export_shows_failures_stops_and_cancellations() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let mut failed = message(1, None, "user", "first question", "failed");
    failed["error"] = json!("The model is overloaded.");
    let mut stopped = message(3, Some(2), "assistant", "a half", "complete");
    stopped["stopped"] = json!(true);
    stopped["model"] = json!("gpt-test");
    let doc = document(vec![
        failed,
        message(2, Some(1), "user", "second question", "answered"),
        stopped,
        message(4, Some(2), "user", "third question", "cancelled"),
    ]);
    let chat = id(&import_ok(&app, &alice, &doc).await);
    let text = markdown(&app, &alice, chat).await.text;
    for expected in [
        "# Imported",
        "first question",
        "> **Failed:** The model is overloaded.",
        "### Assistant (gpt-test) — ",
        "(stopped)",
        "third question",
        "*(stopped before the model answered)*",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn export_needs_a_session_the_owner_and_a_known_format() {
    let app = spawn_app().await;
    let [alice, bob] = app.users(["alice", "bob"]).await;
    let chat = app.ai_chat_id(&alice).await;

    let (status, _) = app
        .call(Method::GET, &export_path(chat, ""), None, None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = app
        .call(Method::POST, IMPORT, None, Some(document(one_turn())))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Bob is told what every AI chat route tells him about a chat that is not his.
    let not_his = app.get(&format!("/api/ai/chats/{chat}/"), &bob.token).await;
    assert_eq!(not_his.0, StatusCode::NOT_FOUND);
    for query in ["", "?all=true", "?format=markdown"] {
        assert_eq!(
            app.get(&export_path(chat, query), &bob.token).await,
            not_his,
            "{query}"
        );
    }
    assert_eq!(
        app.get(&export_path(chat + 1000, ""), &alice.token).await.0,
        StatusCode::NOT_FOUND
    );

    let (status, errors) = app
        .get(&export_path(chat, "?format=pdf"), &alice.token)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        errors["format"][0]
            .as_str()
            .unwrap_or_default()
            .contains("pdf"),
        "{errors}"
    );

    // The default is JSON, named after the chat.
    let reply = app
        .request(Method::GET, &export_path(chat, ""))
        .bearer_auth(&alice.token)
        .reply()
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.header("content-type").starts_with("application/json"));
    assert_eq!(
        reply.header("content-disposition"),
        format!("attachment; filename=\"aichat-{chat}-t.json\"")
    );
    let empty = reply.expect_json();
    assert_eq!(empty["messages"], json!([]));
    let copy = import_ok(&app, &alice, &empty).await;
    assert_eq!(
        (copy["title"].clone(), copy["message_count"].clone()),
        (json!("t"), json!(0))
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_refused_import_names_the_problem_and_stores_nothing() {
    let app = spawn_app_with_flags(&[
        "--import-max-messages",
        "3",
        "--max-content-chars",
        "50",
        "--import-max-bytes",
        "4000",
    ])
    .await;
    let alice = app.user("alice").await;
    app.ai_chat_id(&alice).await;

    let with = |change: &dyn Fn(&mut Value)| {
        let mut doc = document(one_turn());
        change(&mut doc);
        doc
    };
    let mut assistant_after_assistant = one_turn();
    assistant_after_assistant.push(message(12, Some(11), "assistant", "again", "complete"));
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "wrong format tag",
            with(&|d| d["format"] = json!("other.app")),
            "format",
            "aichat.chat",
        ),
        (
            "a newer version",
            with(&|d| d["version"] = json!(2)),
            "version",
            "version 2",
        ),
        (
            "a parent after its child",
            document(vec![
                message(1, Some(2), "user", "first", "answered"),
                message(2, None, "user", "second", "answered"),
            ]),
            "messages",
            "messages[0]: parent_id 2 is not an earlier message",
        ),
        (
            "a parent that is not there",
            document(vec![message(1, Some(99), "user", "first", "answered")]),
            "messages",
            "messages[0]: parent_id 99 is not an earlier message",
        ),
        (
            "an assistant answering an assistant",
            document(assistant_after_assistant),
            "messages",
            "messages[2]: an assistant message's parent must be a user message",
        ),
        (
            "a reply without a question",
            document(vec![message(1, None, "assistant", "hello", "complete")]),
            "messages",
            "messages[0]: an assistant message needs a parent_id",
        ),
        (
            "a status of the other role",
            document(vec![message(1, None, "user", "hi", "complete")]),
            "messages",
            "messages[0]: status complete is not valid for role user",
        ),
        (
            "two active replies",
            document(vec![
                message(1, None, "user", "hi", "answered"),
                message(2, Some(1), "assistant", "a", "complete"),
                {
                    let mut second = message(3, Some(1), "assistant", "b", "complete");
                    second["version"] = json!(2);
                    second
                },
            ]),
            "messages",
            "messages[2]: messages[0] has another active reply",
        ),
        (
            "no active first turn",
            with(&|d| {
                d["messages"][0]["active"] = json!(false);
                d["messages"][1]["active"] = json!(false);
            }),
            "messages",
            "messages[0]: no first turn is active",
        ),
        (
            "an active path that stops before a later question",
            document(vec![
                message(1, None, "user", "hi", "answered"),
                message(2, Some(1), "assistant", "hello", "complete"),
                {
                    let mut later = message(3, Some(1), "user", "and?", "cancelled");
                    later["active"] = json!(false);
                    later
                },
            ]),
            "messages",
            "messages[0]: an active question with later questions needs one of them active",
        ),
        (
            "an answered question shown without a reply",
            with(&|d| d["messages"][1]["active"] = json!(false)),
            "messages",
            "messages[0]: an active answered question needs an active reply",
        ),
        (
            "two versions of a turn with one number",
            document(vec![message(1, None, "user", "hi", "cancelled"), {
                let mut again = message(2, None, "user", "hi again", "cancelled");
                again["active"] = json!(false);
                again
            }]),
            "messages",
            "messages[1]: another version of the same turn is version 1",
        ),
        (
            "a year PostgreSQL cannot hold",
            with(&|d| d["messages"][0]["timestamp"] = json!("+10000-01-01T00:00:00Z")),
            "messages",
            "messages[0]: timestamp is not between the years 1 and 9999",
        ),
        (
            "a time in the future",
            with(&|d| d["messages"][0]["timestamp"] = json!("2999-01-01T00:00:00Z")),
            "messages",
            "messages[0]: timestamp is in the future",
        ),
        (
            "version 0",
            with(&|d| d["messages"][0]["version"] = json!(0)),
            "messages",
            "messages[0]: version 0 is below 1",
        ),
        (
            "a version past the most an import takes",
            with(&|d| d["messages"][1]["version"] = json!(2_147_483_647)),
            "messages",
            "messages[1]: version 2147483647 is above 1000000",
        ),
        (
            "an answered question without its reply",
            document(vec![message(1, None, "user", "hi", "answered")]),
            "messages",
            "messages[0]: an answered question needs a reply",
        ),
        (
            "too many messages",
            document(vec![
                message(1, None, "user", "a", "answered"),
                message(2, Some(1), "user", "b", "answered"),
                message(3, Some(2), "user", "c", "answered"),
                message(4, Some(3), "user", "d", "answered"),
            ]),
            "messages",
            "no more than 3 messages",
        ),
        (
            "content over the send limit",
            with(&|d| d["messages"][0]["content"] = json!("x".repeat(51))),
            "messages",
            "messages[0]: content: Ensure this field has no more than 50 characters.",
        ),
        (
            "a model the server does not offer",
            with(&|d| d["chat"]["model"] = json!("gpt-unknown")),
            "chat.model",
            "gpt-unknown is not one of the available models",
        ),
        (
            "no title",
            with(&|d| d["chat"]["title"] = json!("")),
            "chat.title",
            "may not be blank",
        ),
        (
            "an unknown role",
            with(&|d| d["messages"][1]["role"] = json!("robot")),
            "messages[1].role",
            "robot",
        ),
        (
            "a cost on a question",
            with(&|d| {
                d["messages"][0]["cost"] = json!("0.1");
                d["messages"][0]["currency"] = json!("USD");
            }),
            "messages",
            "messages[0]: only an assistant message can have a cost",
        ),
        (
            "a cost that is not a plain decimal",
            with(&|d| {
                d["messages"][1]["cost"] = json!("-1e-5");
                d["messages"][1]["currency"] = json!("USD");
            }),
            "messages",
            "messages[1]: cost must be a decimal such as \"0.00045\"",
        ),
        (
            "a cost without its currency",
            with(&|d| d["messages"][1]["cost"] = json!("0.1")),
            "messages",
            "messages[1]: cost and currency go together",
        ),
        (
            "a currency that is not a code",
            with(&|d| {
                d["messages"][1]["cost"] = json!("0.1");
                d["messages"][1]["currency"] = json!("dollars");
            }),
            "messages",
            "messages[1]: currency must be a code such as \"USD\"",
        ),
    ];
    for (what, doc, field, expected) in cases {
        let (status, errors) = app.post(IMPORT, &alice.token, doc).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {errors}");
        let problems = errors[field]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: {errors}"));
        assert!(
            problems
                .iter()
                .any(|p| p.as_str().unwrap_or_default().contains(expected)),
            "{what}: no {expected:?} in {errors}"
        );
    }

    // Not an object, not JSON, not declared JSON, too large.
    let (status, body) = app.post(IMPORT, &alice.token, json!([1, 2])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"error": "Invalid data: expected a JSON object"})
    );
    let raw = |content_type: &str, body: String| {
        app.request(Method::POST, IMPORT)
            .bearer_auth(&alice.token)
            .header("content-type", content_type)
            .body(body)
            .reply()
    };
    let reply = raw("application/json", "{\"format\":".to_owned()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    let reply = raw("text/plain", document(one_turn()).to_string()).await;
    assert_eq!(
        reply.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        reply.text
    );
    let large = with(&|d| d["chat"]["system_prompt"] = json!("p".repeat(5000)));
    let reply = raw("application/json", large.to_string()).await;
    let error = reply.error(
        "an import over IMPORT_MAX_BYTES",
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    assert!(error.contains("4000 bytes"), "{error}");

    assert_eq!(
        app.list("/api/ai/chats/", &alice.token).await.len(),
        1,
        "nothing was stored"
    );
    let stored: i64 = sqlx::query_scalar("select count(*) from ai_messages")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(stored, 0);
    // The same document, valid, goes in.
    import_ok(&app, &alice, &document(one_turn())).await;
    assert_eq!(app.list("/api/ai/chats/", &alice.token).await.len(), 2);
    app.cleanup().await;
}

#[tokio::test]
async fn an_imported_replys_cost_is_kept_and_counted_in_the_usage() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let mut turns = one_turn();
    turns[1]["cost"] = json!("0.00045");
    turns[1]["currency"] = json!("USD");
    turns.push(message(12, Some(10), "assistant", "hey", "complete"));
    turns[2]["version"] = json!(2);
    turns[2]["active"] = json!(false);
    let imported = import_ok(&app, &alice, &document(turns)).await;
    let messages = all_messages(&app, &alice, id(&imported)).await;
    let costs: Vec<(&Value, &Value)> = messages
        .iter()
        .map(|m| (&m["cost"], &m["currency"]))
        .collect();
    assert_eq!(
        costs,
        [
            (&Value::Null, &Value::Null),
            (&json!("0.00045"), &json!("USD")),
            // An export from before costs: none.
            (&Value::Null, &Value::Null),
        ]
    );
    let (status, usage) = app.get("/api/ai/usage/", &alice.token).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["total"]["cost"], json!({"USD": "0.00045"}), "{usage}");
    app.cleanup().await;
}

#[tokio::test]
async fn imported_waiting_messages_are_cancelled_and_never_answered() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let mut messages = one_turn();
    messages.push(message(12, Some(10), "user", "still waiting", "queued"));
    let mut answering = message(13, Some(10), "user", "being answered", "answering");
    answering["version"] = json!(2);
    answering["active"] = json!(false);
    messages.push(answering);
    let chat = id(&import_ok(&stack, &alice, &document(messages)).await);
    assert!(stack.queued_jobs().await.is_empty(), "no job was queued");

    let imported = all_messages(&stack, &alice, chat).await;
    let statuses: Vec<&str> = imported
        .iter()
        .map(|m| m["status"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(statuses, ["answered", "complete", "cancelled", "cancelled"]);
    let waiting = id(&imported[2]);

    // A message sent now is answered; the imported ones are not: it follows the end of the
    // active path, and its reply is the only new one.
    let (status, reply) = stack
        .send_waiting(&alice, chat, "anyone there?", "true")
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let after = all_messages(&stack, &alice, chat).await;
    let question = after
        .iter()
        .find(|m| m["id"] == reply["reply_to"])
        .expect("the new question");
    assert_eq!(question["parent_id"], waiting);
    let replies: Vec<&Value> = after.iter().filter(|m| m["role"] == "assistant").collect();
    assert_eq!(replies.len(), 2, "{after:?}");
    assert_eq!(replies[0]["parent_id"], imported[0]["id"]);
    assert_eq!(replies[1]["id"], reply["id"]);
    assert_eq!(after[2]["status"], "cancelled");
    assert_eq!(after[3]["status"], "cancelled");

    // A cancelled import is the user's to retry, as any cancelled message.
    let (status, retried) = stack
        .post(
            &format!("/api/ai/messages/{waiting}/retry/"),
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    stack.cleanup().await;
}

/// An export larger than `MAX_BODY_BYTES` still imports, up to `IMPORT_MAX_BYTES`.
#[tokio::test]
async fn an_import_may_be_larger_than_the_body_limit_of_other_routes() {
    let app =
        spawn_app_with_flags(&["--max-body-bytes", "2000", "--import-max-bytes", "8000"]).await;
    let alice = app.user("alice").await;
    let mut doc = document(one_turn());
    doc["chat"]["system_prompt"] = json!("p".repeat(5000));
    let chat = import_ok(&app, &alice, &doc).await;
    assert_eq!(chat["system_prompt"].as_str().map(str::len), Some(5000));

    // Past its own limit, an import is told that limit.
    doc["chat"]["system_prompt"] = json!("p".repeat(9000));
    let (status, body) = app.post(IMPORT, &alice.token, doc).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(
        body,
        json!({"error": "Request body is too large: an import is at most 8000 bytes"})
    );
    app.cleanup().await;
}

/// A reply regenerated for an earlier turn is saved after the later turns, but reads under
/// its own question.
#[tokio::test]
async fn the_markdown_export_puts_a_regenerated_reply_under_its_question() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (status, first) = stack.send_waiting(&alice, chat, "turn one", "true").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (status, second) = stack.send_waiting(&alice, chat, "turn two", "true").await;
    assert_eq!(status, StatusCode::OK, "{second}");
    stack.fake.set_config(FakeConfig {
        reply_words: Some(4),
        ..FakeConfig::default()
    });
    let (status, again) = stack
        .post(
            &format!(
                "/api/ai/messages/{}/regenerate/?wait=true",
                first["reply_to"]
            ),
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    let text = markdown(&stack, &alice, chat).await.text;
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{text}"))
    };
    let regenerated = again["content"].as_str().unwrap_or_default().trim();
    assert!(at("turn one") < at(regenerated), "{text}");
    assert!(at(regenerated) < at("turn two"), "{text}");
    assert!(!text.contains("Echo: turn one"), "{text}");
    stack.cleanup().await;
}

/// The highest version an import takes leaves room for the versions that come after it: its
/// question can be regenerated and edited.
#[tokio::test]
async fn a_turn_at_the_highest_imported_version_can_be_regenerated_and_edited() {
    let app = spawn_app_with_flags(&[]).await;
    let alice = app.user("alice").await;
    let mut turn = one_turn();
    turn[0]["version"] = json!(1_000_000);
    turn[1]["version"] = json!(1_000_000);
    for action in ["regenerate", "edit"] {
        let chat = import_ok(&app, &alice, &document(turn.clone())).await;
        let messages = all_messages(&app, &alice, id(&chat)).await;
        let question = id(&messages[0]);
        let (status, body) = app
            .post(
                &format!("/api/ai/messages/{question}/{action}/"),
                &alice.token,
                json!({"content": "once more"}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{action}: {body}");
        let message = &body["message"];
        assert_eq!(message["status"], "queued", "{action}: {body}");
        if action == "edit" {
            assert_ne!(id(message), question, "a new version: {body}");
            assert_eq!(message["version"], 1_000_001, "{body}");
        } else {
            assert_eq!(id(message), question, "{body}");
        }
    }
    app.cleanup().await;
}
