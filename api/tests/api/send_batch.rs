//! Sends written in batches: one statement stores many senders' messages, each only in a chat
//! its sender owns, in the order they came; concurrent sends each get their own message and
//! exactly one job, and a stranger's send in the same batch is a 404 that stores nothing.
use crate::common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aichat_shared::db::ai_messages::{NewUserMessage, insert_owned_user_messages};
use aichat_shared::domain::ContextOptions;
use aichat_testkit::eventually;
use common::{app_with_ai_chat, id, ids, send_path, spawn_app, spawn_app_with_flags, texts};
use reqwest::StatusCode;
use serde_json::json;

fn new(ai_chat_id: i64, user_id: i64, content: &str, limit: i32) -> NewUserMessage {
    NewUserMessage {
        ai_chat_id,
        user_id,
        content: content.to_owned(),
        options: ContextOptions {
            include_related_chat_context: limit % 2 == 0,
            context_message_limit: limit,
        },
        budget: None,
    }
}

#[tokio::test]
async fn one_batch_stores_only_what_each_sender_owns_in_input_order() {
    let (app, alice, a) = app_with_ai_chat("alice").await;
    let (bob, b) = app.user_with_ai_chat("bob").await;
    let batch = [
        new(a, alice.id, "a1", 3),
        new(a, bob.id, "bob into alice's chat", 4), // not bob's: nothing stored
        new(b, bob.id, "b1", 5),
        new(a, alice.id, "a2", 6),
        new(b + 1000, bob.id, "no such chat", 7),
        new(b, alice.id, "alice into bob's chat", 8),
        new(b, bob.id, "b2", 9),
    ];
    let stored = insert_owned_user_messages(&app.db, &batch).await.unwrap();
    assert_eq!(stored.len(), batch.len());
    let owned = [true, false, true, true, false, false, true];
    for ((message, input), owned) in stored.iter().zip(&batch).zip(owned) {
        match message {
            Some(m) => {
                assert!(owned, "stored {:?} for {:?}", m.content, input.content);
                assert_eq!(m.content, input.content);
                assert_eq!(m.ai_chat, input.ai_chat_id);
                assert_eq!((m.role.as_str(), m.status.as_str()), ("user", "queued"));
            }
            None => assert!(!owned, "{:?} was not stored", input.content),
        }
    }
    // Ids follow the input order.
    let ids: Vec<i64> = stored.iter().flatten().map(|m| m.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    // The options are stored per message, and nothing else was written.
    let rows: Vec<(i64, String, bool, i32)> = sqlx::query_as(
        "select ai_chat_id, content, include_related_chat_context, context_message_limit
         from ai_messages order by id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (a, "a1".to_owned(), false, 3),
            (b, "b1".to_owned(), false, 5),
            (a, "a2".to_owned(), true, 6),
            (b, "b2".to_owned(), false, 9),
        ]
    );
    // An empty batch, and a batch of strangers only, store nothing.
    assert!(
        insert_owned_user_messages(&app.db, &[])
            .await
            .unwrap()
            .is_empty()
    );
    let strangers = [new(a, bob.id, "x", 1), new(b, alice.id, "y", 1)];
    let none = insert_owned_user_messages(&app.db, &strangers)
        .await
        .unwrap();
    assert!(none.len() == 2 && none.iter().all(Option::is_none));
    app.cleanup().await;
}

#[tokio::test]
async fn concurrent_sends_each_get_their_message_and_one_job_and_strangers_get_404() {
    const USERS: usize = 6;
    const SENDS: usize = 15;
    let app = spawn_app().await;
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(app.user_with_ai_chat(&format!("user{i}")).await);
    }
    let mallory = app.user("mallory").await;

    // Every user sends SENDS messages one after another, all users at once; mallory sends
    // into each of their chats at the same time.
    let api = &app;
    let owners = users.iter().map(|(user, chat)| async move {
        let mut ids = Vec::new();
        for k in 0..SENDS {
            let content = format!("{} #{k}", user.username);
            ids.push(id(&api.send_ok(user, *chat, &content).await));
        }
        ids
    });
    let strangers = users.iter().map(|(_, chat)| {
        let token = &mallory.token;
        async move {
            for _ in 0..SENDS {
                let (status, body) = api
                    .post(&send_path(*chat), token, json!({"content": "intrusion"}))
                    .await;
                assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
                assert_eq!(body, json!({"error": "Not found."}));
            }
        }
    });
    let (sent, _) = tokio::join!(
        futures::future::join_all(owners),
        futures::future::join_all(strangers)
    );

    for ((user, chat), sent_ids) in users.iter().zip(&sent) {
        let messages = app.messages(user, *chat).await;
        let expected: Vec<String> = (0..SENDS)
            .map(|k| format!("{} #{k}", user.username))
            .collect();
        assert_eq!(
            texts(&messages, "content"),
            expected,
            "stored in the order sent, nothing else"
        );
        assert_eq!(&ids(&messages), sent_ids);
    }

    // Exactly one job per message, carrying its chat.
    let jobs = app.queued_jobs().await;
    assert_eq!(jobs.len(), USERS * SENDS, "{jobs:?}");
    let chat_of: HashMap<i64, i64> = users
        .iter()
        .zip(&sent)
        .flat_map(|((_, chat), ids)| ids.iter().map(move |id| (*id, *chat)))
        .collect();
    let mut seen = HashSet::new();
    for job in &jobs {
        let id = job["message_id"].as_i64().unwrap();
        assert!(seen.insert(id), "two jobs for message {id}");
        assert_eq!(
            Some(&job["ai_chat_id"]),
            chat_of.get(&id).map(|c| json!(c)).as_ref()
        );
    }
    let intrusions: i64 =
        sqlx::query_scalar("select count(*) from ai_messages where content = 'intrusion'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(intrusions, 0);
    app.cleanup().await;
}

/// The send writers' connections are not checked before each batch (under load they are never
/// idle, and the check cost each batch a round trip). A batch whose connection PostgreSQL has
/// ended since its last batch is answered with that error, nothing committed, and runs again on
/// a new connection: the sender gets 202 and the message is stored and queued once.
#[tokio::test]
async fn a_batch_whose_connection_postgres_ended_runs_again_on_another() {
    // Never checked here, however long the test takes.
    let app = spawn_app_with_flags(&["--send-batch-ping-after-idle-ms", "600000"]).await;
    let alice = app.user("alice").await;
    let chat = app.ai_chat_id(&alice).await;
    app.send_ok(&alice, chat, "before").await;
    let ended: Vec<i32> = sqlx::query_scalar(
        "with others as materialized (
             select pid from pg_stat_activity
             where datname = current_database() and pid <> pg_backend_pid()
         )
         select pid from others where pg_terminate_backend(pid)",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert!(!ended.is_empty(), "no session to end");
    eventually(
        Duration::from_secs(10),
        "the ended sessions gone",
        || async {
            let left: i64 =
                sqlx::query_scalar("select count(*) from pg_stat_activity where pid = any($1)")
                    .bind(&ended)
                    .fetch_one(&app.db)
                    .await
                    .ok()?;
            (left == 0).then_some(())
        },
    )
    .await;

    let (status, body) = app.send(&alice, chat, "after").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let messages = app.messages(&alice, chat).await;
    assert_eq!(texts(&messages, "content"), ["before", "after"]);
    let jobs = app.queued_jobs().await;
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    app.cleanup().await;
}
