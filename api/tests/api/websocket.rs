//! The WebSocket endpoint: refusals before the upgrade, client errors, fan-out across API
//! instances, the catch-up seam, slow readers, Redis restarts, pings and shutdown.
use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use aichat_testkit::{PrivateRedis, eventually};
use common::{
    Options, app_with_ai_chat, assert_error, closed_with, id, next_event, send_ws, spawn_app,
    spawn_app_with, spawn_app_with_flags, upgrade, ws_events_until, ws_events_until_closed,
};
use futures::{SinkExt, StreamExt};
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Publishes `event` on `app`'s channel of AI chat `chat` through `redis`, as a worker would.
async fn publish(
    redis: &mut redis::aio::MultiplexedConnection,
    app: &common::TestApp,
    chat: i64,
    event: &Value,
) {
    let _: i64 = redis
        .publish(app.keys.chat_channel(chat), event.to_string())
        .await
        .expect("publish");
}

#[tokio::test]
async fn unauthenticated_missing_and_foreign_chats_are_refused_before_the_upgrade() {
    let (app, alice, chat) = app_with_ai_chat("alice").await;
    let mallory = app.user("mallory").await;
    let path = format!("/ws/ai-chat/{chat}/");
    let bearer = format!("Bearer {}", alice.token);
    let cookie = format!("sessionid={}", alice.token);
    for (path, header, expected) in [
        (path.clone(), None, 401),
        (format!("{path}?token=bogus"), None, 401),
        (format!("{path}?token={}", mallory.token), None, 404),
        (
            format!("/ws/ai-chat/999999/?token={}", alice.token),
            None,
            404,
        ),
        // Accepted by ?token=, by Bearer header and by the session cookie.
        (format!("{path}?token={}", alice.token), None, 101),
        (path.clone(), Some(("authorization", bearer.as_str())), 101),
        (path.clone(), Some(("cookie", cookie.as_str())), 101),
    ] {
        let headers: Vec<(&str, &str)> = header.into_iter().collect();
        let (status, _) = upgrade(&app.ws_url(&path), &headers).await;
        assert_eq!(status, expected, "{path} {headers:?}");
    }
    // A plain HTTP request to the socket path is answered in JSON too.
    let (status, body) = app.get(&path, &alice.token).await;
    assert_error(&path, (status, &body), StatusCode::BAD_REQUEST);
    app.cleanup().await;
}

#[tokio::test]
async fn invalid_json_non_objects_and_blank_content_get_error_events_and_typing_is_ignored() {
    let (app, alice, chat) = app_with_ai_chat("alice").await;
    let mut ws = app.ws(chat, &alice.token, None).await;
    ws.send(Message::Text("{nope".into())).await.unwrap();
    assert_eq!(
        next_event(&mut ws, 5).await,
        json!({"type": "error", "message": "Invalid JSON"})
    );
    // JSON that is not an object: serde would read the array as the frame's fields in order
    // (`type`, `content`) and store "sneaky".
    for frame in [
        json!(["message", "sneaky"]),
        json!("message"),
        json!(1),
        Value::Null,
        json!(true),
    ] {
        ws.send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
        assert_eq!(
            next_event(&mut ws, 5).await,
            json!({"type": "error", "message": "Invalid data: expected a JSON object"}),
            "{frame}"
        );
    }
    // A binary frame, even of a JSON object, is not a frame the socket reads.
    let object = json!({"type": "message", "content": "binary"}).to_string();
    ws.send(Message::Binary(object.into_bytes().into()))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut ws, 5).await,
        json!({"type": "error", "message": "Invalid data: expected a JSON object in a text frame"})
    );
    for content in [json!(""), json!("   "), Value::Null] {
        send_ws(&mut ws, json!({"type": "message", "content": content})).await;
        assert_eq!(
            next_event(&mut ws, 5).await,
            json!({"type": "error", "message": "Message content cannot be empty"})
        );
    }
    send_ws(&mut ws, json!({"type": "typing"})).await;
    send_ws(&mut ws, json!({"type": "something-new", "content": "x"})).await;
    send_ws(
        &mut ws,
        json!({"type": "message", "content": "hello", "context_message_limit": 5}),
    )
    .await;
    // The first event after the ignored frames is the stored message.
    let event = next_event(&mut ws, 5).await;
    assert_eq!(event["type"], "user_message", "{event}");
    assert_eq!(event["message"]["content"], "hello");
    assert_eq!(event["message"]["role"], "user");
    assert!(event["message"]["id"].is_i64() && event["message"]["timestamp"].is_string());
    assert_eq!(
        app.messages(&alice, chat).await.len(),
        1,
        "only the valid message is stored"
    );
    assert_eq!(app.queued_jobs().await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_client_on_instance_b_gets_the_events_of_a_message_sent_to_instance_a() {
    let a = spawn_app().await;
    let b = a.another_instance(&[]).await;
    let (alice, chat) = a.user_with_ai_chat("alice").await;
    let mut on_b = b.ws(chat, &alice.token, None).await;
    let mut on_a = a.ws(chat, &alice.token, None).await;
    let sent = a.send_ok(&alice, chat, "over REST").await;
    for ws in [&mut on_b, &mut on_a] {
        let event = next_event(ws, 5).await;
        assert_eq!(event["type"], "user_message");
        assert_eq!(event["message"]["id"], sent["id"]);
    }
    // Events published by anyone (here: as a worker would) reach both instances' sockets.
    let delta = json!({"type": "assistant_delta", "message_id": sent["id"], "delta": "Hel"});
    publish(&mut a.redis().await, &a, chat, &delta).await;
    assert_eq!(next_event(&mut on_b, 5).await, delta);
    assert_eq!(next_event(&mut on_a, 5).await, delta);
    b.cleanup().await;
}

#[tokio::test]
async fn catch_up_then_live_events_have_no_gap_and_no_duplicate_at_the_seam() {
    let (app, alice, chat) = app_with_ai_chat("alice").await;
    let first_id = id(&app.send_ok(&alice, chat, "before 0").await);

    // Messages keep arriving while the client connects and catches up: the socket opens
    // once the sixth has been sent, while the sends go on.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let sender = async {
        let mut ids = Vec::new();
        let mut started = Some(started_tx);
        for n in 0..40 {
            ids.push(id(&app.send_ok(&alice, chat, &format!("during {n}")).await));
            if n == 5
                && let Some(tx) = started.take()
            {
                let _ = tx.send(());
            }
        }
        ids
    };
    let connect = async {
        started_rx.await.expect("the sixth message was sent");
        app.ws(chat, &alice.token, Some(first_id)).await
    };
    let (sent, mut ws) = tokio::join!(sender, connect);
    // A sentinel after everything: once it arrives, every earlier event has been delivered.
    let sentinel_id = id(&app.send_ok(&alice, chat, "sentinel").await);
    let (sentinel, before) =
        ws_events_until(&mut ws, Duration::from_secs(10), "the sentinel", |event| {
            event["message"]["id"] == sentinel_id
        })
        .await;
    assert_eq!(sentinel["type"], "user_message", "{sentinel}");
    let seen: Vec<i64> = before
        .iter()
        .map(|event| {
            assert_eq!(event["type"], "user_message", "{event}");
            id(&event["message"])
        })
        .collect();
    let unique: HashSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "no duplicate: {seen:?}");
    assert!(!unique.contains(&first_id), "after_id is exclusive");
    assert_eq!(
        unique,
        sent.iter().copied().collect::<HashSet<_>>(),
        "no gap"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_slow_reader_is_cut_off_while_a_fast_reader_keeps_receiving() {
    let app =
        spawn_app_with_flags(&["--ws-queue-capacity", "16", "--ws-send-timeout-secs", "1"]).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let mut slow = app.ws(chat, &alice.token, None).await;
    let mut fast = app.ws(chat, &alice.token, None).await;
    assert_eq!(app.sockets.open(), 2);

    let chunk = "x".repeat(16 * 1024);
    let total = 2000;
    let publisher = async {
        let mut redis = app.redis().await;
        for n in 0..total {
            let event = json!({"type": "assistant_delta", "message_id": n, "delta": chunk});
            publish(&mut redis, &app, chat, &event).await;
        }
    };
    // The fast reader gets every event, in order, while the slow one reads nothing.
    let reader = async {
        for n in 0..total {
            let event = next_event(&mut fast, 30).await;
            assert_eq!(event["message_id"], n);
        }
    };
    tokio::join!(publisher, reader);
    assert!(
        app.sockets
            .wait_for_at_most(1, Duration::from_secs(10))
            .await,
        "the slow socket is closed server-side"
    );

    // The slow reader finds the events it was sent, then the end of the connection:
    // a close frame with 1013 when it could still be delivered.
    let (received, ended) = ws_events_until_closed(&mut slow, Duration::from_secs(30)).await;
    assert!(
        received.len() < total,
        "the slow reader did not get everything ({})",
        received.len()
    );
    if let Some(code) = ended {
        assert_eq!(code, 1013);
    }
    app.cleanup().await;
}

#[tokio::test]
async fn events_flow_again_after_redis_restarts_while_sockets_stay_open() {
    let mut redis = PrivateRedis::start().await;
    let app = spawn_app_with(Options {
        redis_url: redis.url(),
        ..Options::default()
    })
    .await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let mut ws = app.ws(chat, &alice.token, None).await;
    app.send_ok(&alice, chat, "before").await;
    assert_eq!(next_event(&mut ws, 5).await["message"]["content"], "before");

    redis.stop();
    let (status, _) = app.send(&alice, chat, "during").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    redis.restart().await;
    let back = tokio::time::Instant::now();

    // Each try sends a message and waits a second for its event; the pub/sub connection
    // re-subscribes on its own within a few seconds.
    let mut delivered = None;
    for n in 0..20 {
        let (status, sent) = app.send(&alice, chat, &format!("after {n}")).await;
        if status != StatusCode::ACCEPTED {
            continue;
        }
        let sent_id = sent["message"]["id"].clone();
        let got = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                let event = next_event(&mut ws, 60).await;
                if event["message"]["id"] == sent_id {
                    return event;
                }
            }
        })
        .await;
        if let Ok(event) = got {
            delivered = Some(event);
            break;
        }
    }
    let event = delivered.expect("events flow again after the restart");
    assert_eq!(event["type"], "user_message");
    println!(
        "events flowed again {:?} after Redis came back",
        back.elapsed()
    );
    assert_eq!(app.sockets.open(), 1, "the socket stayed open");
    app.cleanup().await;
    drop(redis);
}

#[tokio::test]
async fn the_server_pings_and_closes_sockets_with_1001_on_shutdown() {
    let mut app = spawn_app_with_flags(&["--ws-ping-secs", "1"]).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let mut ws = app.ws(chat, &alice.token, None).await;
    let ping = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Ok(Message::Ping(_))) = ws.next().await {
                return;
            }
        }
    })
    .await;
    assert!(ping.is_ok(), "a ping within two intervals");

    app.shut_down();
    assert_eq!(closed_with(&mut ws, 5).await, Some(1001));
    app.cleanup().await;
}

/// How many connections are subscribed to `app`'s channel of AI chat `chat`.
async fn subscribers(app: &common::TestApp, chat: i64) -> i64 {
    let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(app.keys.chat_channel(chat))
        .query_async(&mut app.redis().await)
        .await
        .expect("PUBSUB NUMSUB");
    counts[0].1
}

#[tokio::test]
async fn an_instance_subscribes_once_per_chat_and_unsubscribes_when_its_last_socket_leaves() {
    let (app, alice, chat) = app_with_ai_chat("alice").await;
    assert_eq!(subscribers(&app, chat).await, 0);
    let first = app.ws(chat, &alice.token, None).await;
    let second = app.ws(chat, &alice.token, None).await;
    assert_eq!(
        subscribers(&app, chat).await,
        1,
        "one pub/sub subscription for both sockets"
    );
    drop(first);
    assert!(
        app.sockets
            .wait_for_at_most(1, Duration::from_secs(5))
            .await
    );
    assert_eq!(subscribers(&app, chat).await, 1, "still one socket");
    drop(second);
    assert!(
        app.sockets
            .wait_for_at_most(0, Duration::from_secs(5))
            .await
    );
    // The unsubscribe runs just after the last socket goes: wait for Redis to see it.
    eventually(Duration::from_secs(5), "unsubscribed", || async {
        (subscribers(&app, chat).await == 0).then_some(())
    })
    .await;
    app.cleanup().await;
}
