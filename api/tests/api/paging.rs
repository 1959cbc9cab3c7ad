//! Bounded lists (security issue, item 10): every list has a default and a maximum page size,
//! a full page links to the next (`Link: <…>; rel="next"`), the cursor runs the way the list
//! does, and a socket's catch-up stops at its limit and says where REST takes over.
use crate::common;

use std::collections::HashSet;

use common::{Replied, TestApp, TestUser, event_of, id, ids, next_event, spawn_app_with_flags};
use reqwest::{Method, StatusCode};
use serde_json::json;

const NO_SEND_LIMIT: &[&str] = &["--send-rate-per-minute", "0"];

/// The page `user` reads at `path`, with its headers.
async fn page(app: &TestApp, user: &TestUser, path: &str) -> common::Reply {
    app.request(Method::GET, path)
        .bearer_auth(&user.token)
        .reply()
        .await
}

/// Follows `rel="next"` links from `first` to the end; every page's ids, in order.
async fn every_page(app: &TestApp, user: &TestUser, first: &str) -> Vec<Vec<i64>> {
    let mut pages = Vec::new();
    let mut next = Some(first.to_owned());
    while let Some(path) = next.take() {
        let answer = page(app, user, &path).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
        next = answer
            .headers
            .get("link")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix('<'))
            .and_then(|v| v.split_once(">; rel=\"next\""))
            .map(|(path, _)| path.to_owned());
        pages.push(ids(common::items(&answer.expect_json())));
        assert!(pages.len() < 100, "the links never end");
    }
    pages
}

fn sorted(mut ids: Vec<i64>, descending: bool) -> Vec<i64> {
    ids.sort_unstable();
    if descending {
        ids.reverse();
    }
    ids
}

#[tokio::test]
async fn every_list_pages_with_its_cursor_up_to_its_limit() {
    let app = spawn_app_with_flags(NO_SEND_LIMIT).await;
    let alice = app.user("alice").await;
    let mut others = Vec::new();
    for n in 0..4 {
        others.push(app.user(&format!("user{n}")).await);
    }

    // Users: oldest first, `after_id`.
    let pages = every_page(&app, &alice, "/api/users/?limit=2").await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    let users: Vec<i64> = pages.concat();
    assert_eq!(users, sorted(users.clone(), false));
    assert_eq!(users.len(), 5);

    // User-to-user chats: newest first, `before_id`.
    for other in &others {
        app.create_chat(&alice, "c", &[other]).await;
    }
    let pages = every_page(&app, &alice, "/api/chats/?limit=3").await;
    let chats: Vec<i64> = pages.concat();
    assert_eq!(pages.len(), 2);
    assert_eq!(chats, sorted(chats.clone(), true));
    assert_eq!(chats.len(), 4);

    // AI chats: most recently updated first; a message moves the oldest chat to the front.
    let mut ai_chats = Vec::new();
    for n in 0..5 {
        let chat = app
            .create_ai_chat(&alice, json!({"title": format!("ai {n}")}))
            .await;
        ai_chats.push(id(&chat));
    }
    app.send_ok(&alice, ai_chats[0], "bump").await;
    let whole = ids(&app.list("/api/ai/chats/", &alice.token).await);
    assert_eq!(whole[0], ai_chats[0], "the bumped chat comes first");
    let pages = every_page(&app, &alice, "/api/ai/chats/?limit=2").await;
    assert_eq!(
        pages.concat(),
        whole,
        "the pages, end to end, are the whole list"
    );

    // Messages of a chat and of the user: oldest first, `after_id`.
    for n in 0..4 {
        app.send_ok(&alice, ai_chats[1], &format!("m{n}")).await;
    }
    let pages = every_page(
        &app,
        &alice,
        &format!("/api/ai/chats/{}/messages/?limit=3", ai_chats[1]),
    )
    .await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 1]);
    let pages = every_page(&app, &alice, "/api/ai/messages/?limit=2").await;
    let mine: Vec<i64> = pages.concat();
    assert_eq!(mine.len(), 5);
    assert_eq!(mine, sorted(mine.clone(), false));
    assert_eq!(mine.iter().collect::<HashSet<_>>().len(), 5);

    // Limits at and past their edges; a cursor of the other direction; a negative cursor.
    let bad = [
        "/api/users/?limit=0",
        "/api/users/?limit=1001",
        "/api/users/?limit=x",
        "/api/users/?before_id=3",
        "/api/chats/?after_id=3",
        "/api/ai/chats/?after_id=1",
        "/api/ai/messages/?after_id=-1",
        "/api/ai/chats/?limit=-5",
    ];
    app.assert_bad_queries(&alice.token, bad).await;
    let (status, _) = app.get("/api/users/?limit=1000", &alice.token).await;
    assert_eq!(status, StatusCode::OK);
    app.cleanup().await;
}

/// Lists of chats answer 100 by default (with a link to the rest); lists of messages 1000, so
/// an old client still reads a whole chat of that size at once.
#[tokio::test]
async fn lists_have_a_default_page() {
    let app = spawn_app_with_flags(NO_SEND_LIMIT).await;
    let alice = app.user("alice").await;
    sqlx::query(
        "insert into ai_chats (user_id, title, system_prompt, model)
         select $1, 'chat ' || g, '', 'gpt-test' from generate_series(1, 101) g",
    )
    .bind(alice.id)
    .execute(&app.db)
    .await
    .expect("101 AI chats");
    let answer = page(&app, &alice, "/api/ai/chats/").await;
    let link = answer.header("link");
    assert!(link.contains("limit=100"), "{link}");
    let chats = answer.expect_json();
    assert_eq!(common::items(&chats).len(), 100);

    let chat = id(&chats[0]);
    app.insert_messages(chat, 1001, 0).await;
    let answer = page(&app, &alice, &common::messages_path(chat)).await;
    assert!(answer.headers.contains_key("link"));
    assert_eq!(common::items(&answer.expect_json()).len(), 1000);
    let (_, detail) = app
        .get(&format!("/api/ai/chats/{chat}/"), &alice.token)
        .await;
    assert_eq!(common::items(&detail["messages"]).len(), 1000);
    app.cleanup().await;
}

/// A socket opened with `?after_id=` sends at most 500 stored messages, then
/// `catch_up_truncated` with the id REST continues from; live events still follow.
#[tokio::test]
async fn the_socket_catch_up_stops_at_its_limit_and_says_where_rest_takes_over() {
    let app = spawn_app_with_flags(NO_SEND_LIMIT).await;
    let alice = app.user("alice").await;
    let chat = app.ai_chat_id(&alice).await;
    app.insert_messages(chat, 502, 0).await;
    let mut ws = app.ws(chat, &alice.token, Some(0)).await;
    let (truncated, before) = event_of(&mut ws, "catch_up_truncated", 20).await;
    assert_eq!(before.len(), 500);
    assert!(before.iter().all(|e| e["type"] == "user_message"));
    let last = id(&before[499]["message"]);
    assert_eq!(truncated["next_after_id"], last);
    let rest = format!("{}?after_id={last}", common::messages_path(chat));
    assert_eq!(app.list(&rest, &alice.token).await.len(), 2);

    app.send_ok(&alice, chat, "live").await;
    let live = next_event(&mut ws, 5).await;
    assert_eq!(live["message"]["content"], "live", "{live}");
    app.cleanup().await;
}

/// At the limit exactly (500 stored messages, read in pages), the catch-up sends them all, in
/// id order, and says nothing of a truncation; the next event is live.
#[tokio::test]
async fn a_catch_up_of_exactly_its_limit_is_whole_and_not_truncated() {
    let app = spawn_app_with_flags(NO_SEND_LIMIT).await;
    let alice = app.user("alice").await;
    let chat = app.ai_chat_id(&alice).await;
    app.insert_messages(chat, 500, 0).await;
    let mut ws = app.ws(chat, &alice.token, Some(0)).await;
    let mut events = Vec::new();
    while events.len() < 500 {
        events.push(next_event(&mut ws, 5).await);
    }
    // Sent once the catch-up is out: a truncation would come before this.
    app.send_ok(&alice, chat, "live").await;
    events.push(next_event(&mut ws, 5).await);
    assert!(
        events.iter().all(|e| e["type"] == "user_message"),
        "no truncation, nothing else: {:?}",
        events.iter().find(|e| e["type"] != "user_message")
    );
    let ids: Vec<i64> = events.iter().map(|e| id(&e["message"])).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in id order, each once"
    );
    assert_eq!(events[500]["message"]["content"], "live");
    app.cleanup().await;
}
