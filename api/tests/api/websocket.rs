//! The WebSocket endpoint: refusals before the upgrade, client errors, fan-out across API
//! instances, the catch-up seam, slow readers, Redis restarts, pings and shutdown.
use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use aichat_testkit::PrivateRedis;
use common::{Options, next_event, send_ws, spawn_app, spawn_app_with};
use futures::{SinkExt, StreamExt};
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

async fn refused_status(url: String, header: Option<(&'static str, String)>) -> u16 {
    let mut request = url.into_client_request().unwrap();
    if let Some((name, value)) = header {
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Ok(_) => 101,
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[tokio::test]
async fn unauthenticated_missing_and_foreign_chats_are_refused_before_the_upgrade() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let mallory = app.user("mallory").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let path = format!("/ws/ai-chat/{chat}/");
    assert_eq!(refused_status(app.ws_url(&path), None).await, 401);
    assert_eq!(
        refused_status(app.ws_url(&format!("{path}?token=bogus")), None).await,
        401
    );
    assert_eq!(
        refused_status(app.ws_url(&format!("{path}?token={}", mallory.token)), None).await,
        404
    );
    assert_eq!(
        refused_status(
            app.ws_url(&format!("/ws/ai-chat/999999/?token={}", alice.token)),
            None
        )
        .await,
        404
    );
    // Accepted by ?token=, by Bearer header and by the session cookie.
    assert_eq!(
        refused_status(app.ws_url(&format!("{path}?token={}", alice.token)), None).await,
        101
    );
    assert_eq!(
        refused_status(
            app.ws_url(&path),
            Some(("authorization", format!("Bearer {}", alice.token)))
        )
        .await,
        101
    );
    assert_eq!(
        refused_status(
            app.ws_url(&path),
            Some(("cookie", format!("sessionid={}", alice.token)))
        )
        .await,
        101
    );
    // A plain HTTP request to the socket path is answered in JSON too.
    let (status, body) = app.get(&path, &alice.token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].is_string());
    app.cleanup().await;
}

#[tokio::test]
async fn invalid_json_non_objects_and_blank_content_get_error_events_and_typing_is_ignored() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
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
    let (_, messages) = app
        .get(&format!("/api/ai/chats/{chat}/messages/"), &alice.token)
        .await;
    assert_eq!(
        messages.as_array().unwrap().len(),
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
    let alice = a.user("alice").await;
    let chat = a.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let mut on_b = b.ws(chat, &alice.token, None).await;
    let mut on_a = a.ws(chat, &alice.token, None).await;
    let (_, sent) = a
        .post(
            &format!("/api/ai/chats/{chat}/send_message/"),
            &alice.token,
            json!({"content": "over REST"}),
        )
        .await;
    for ws in [&mut on_b, &mut on_a] {
        let event = next_event(ws, 5).await;
        assert_eq!(event["type"], "user_message");
        assert_eq!(event["message"]["id"], sent["message"]["id"]);
    }
    // Events published by anyone (here: as a worker would) reach both instances' sockets.
    let client = redis::Client::open(a.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let delta =
        json!({"type": "assistant_delta", "message_id": sent["message"]["id"], "delta": "Hel"});
    let _: i64 = conn
        .publish(format!("{}:chat:{chat}", a.ns), delta.to_string())
        .await
        .unwrap();
    assert_eq!(next_event(&mut on_b, 5).await, delta);
    assert_eq!(next_event(&mut on_a, 5).await, delta);
    b.cleanup().await;
}

#[tokio::test]
async fn catch_up_then_live_events_have_no_gap_and_no_duplicate_at_the_seam() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let path = format!("/api/ai/chats/{chat}/send_message/");
    let (_, first) = app
        .post(&path, &alice.token, json!({"content": "before 0"}))
        .await;
    let first_id = first["message"]["id"].as_i64().unwrap();

    // Messages keep arriving while the client connects and catches up.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let sender = {
        let client = app.client.clone();
        let url = app.url(&path);
        let token = alice.token.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut started = Some(started_tx);
            for n in 0..40 {
                let resp = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"content": format!("during {n}")}))
                    .send()
                    .await
                    .unwrap();
                let body: Value = resp.json().await.unwrap();
                ids.push(body["message"]["id"].as_i64().unwrap());
                if n == 5
                    && let Some(tx) = started.take()
                {
                    let _ = tx.send(());
                }
            }
            ids
        })
    };
    started_rx.await.unwrap();
    let mut ws = app.ws(chat, &alice.token, Some(first_id)).await;
    let sent = sender.await.unwrap();
    // A sentinel after everything: once it arrives, every earlier event has been delivered.
    let (_, sentinel) = app
        .post(&path, &alice.token, json!({"content": "sentinel"}))
        .await;
    let sentinel_id = sentinel["message"]["id"].as_i64().unwrap();
    let mut seen = Vec::new();
    loop {
        let event = next_event(&mut ws, 10).await;
        assert_eq!(event["type"], "user_message", "{event}");
        let id = event["message"]["id"].as_i64().unwrap();
        if id == sentinel_id {
            break;
        }
        seen.push(id);
    }
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
    let app = spawn_app_with(Options {
        extra: ["--ws-queue-capacity", "16", "--ws-send-timeout-secs", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Options::default()
    })
    .await;
    let alice = app.user("alice").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let mut slow = app.ws(chat, &alice.token, None).await;
    let mut fast = app.ws(chat, &alice.token, None).await;
    assert_eq!(app.sockets.open(), 2);

    let client = redis::Client::open(app.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("{}:chat:{chat}", app.ns);
    let chunk = "x".repeat(16 * 1024);
    let total = 2000;
    let publisher = tokio::spawn(async move {
        for n in 0..total {
            let event = json!({"type": "assistant_delta", "message_id": n, "delta": chunk});
            let _: i64 = conn.publish(&channel, event.to_string()).await.unwrap();
        }
    });
    // The fast reader gets every event, in order, while the slow one reads nothing.
    for n in 0..total {
        let event = next_event(&mut fast, 30).await;
        assert_eq!(event["message_id"], n);
    }
    publisher.await.unwrap();
    assert!(
        app.sockets
            .wait_for_at_most(1, Duration::from_secs(10))
            .await,
        "the slow socket is closed server-side"
    );

    // The slow reader finds the events it was sent, then the end of the connection:
    // a close frame with 1013 when it could still be delivered.
    let mut received = 0;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match slow.next().await {
                Some(Ok(Message::Text(_))) => received += 1,
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the slow connection ends");
    assert!(
        received < total,
        "the slow reader did not get everything ({received})"
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
    let alice = app.user("alice").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let path = format!("/api/ai/chats/{chat}/send_message/");
    let mut ws = app.ws(chat, &alice.token, None).await;
    app.post(&path, &alice.token, json!({"content": "before"}))
        .await;
    assert_eq!(next_event(&mut ws, 5).await["message"]["content"], "before");

    redis.stop();
    let (status, _) = app
        .post(&path, &alice.token, json!({"content": "during"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    redis.restart().await;
    let back = tokio::time::Instant::now();

    // Each try sends a message and waits a second for its event; the pub/sub connection
    // re-subscribes on its own within a few seconds.
    let mut delivered = None;
    for n in 0..20 {
        let (status, sent) = app
            .post(
                &path,
                &alice.token,
                json!({"content": format!("after {n}")}),
            )
            .await;
        if status != StatusCode::ACCEPTED {
            continue;
        }
        let id = sent["message"]["id"].clone();
        let got = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                let event = next_event(&mut ws, 60).await;
                if event["message"]["id"] == id {
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
    let mut app = spawn_app_with(Options {
        extra: vec!["--ws-ping-secs".into(), "1".into()],
        ..Options::default()
    })
    .await;
    let alice = app.user("alice").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
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
    let close = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(close, Some(1001));
    app.cleanup().await;
}

async fn subscribers(app: &common::TestApp, chat: i64) -> i64 {
    let client = redis::Client::open(app.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(format!("{}:chat:{chat}", app.ns))
        .query_async(&mut conn)
        .await
        .unwrap();
    counts[0].1
}

#[tokio::test]
async fn an_instance_subscribes_once_per_chat_and_unsubscribes_when_its_last_socket_leaves() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let chat = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while subscribers(&app, chat).await != 0 {
        assert!(tokio::time::Instant::now() < deadline, "still subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.cleanup().await;
}
