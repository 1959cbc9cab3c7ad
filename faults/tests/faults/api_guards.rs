//! Faults 6, 7 and 9 at the API's edge: a repeated `Idempotency-Key` (also concurrently)
//! stores and queues one message; abuse limits answer 429 + Retry-After, 413, 400 or close a
//! WebSocket with 1009 without touching the account's other sessions; and the authorization
//! matrix: every route and the WebSocket, for anonymous, owner, another user and staff.
use std::collections::HashSet;
use std::time::Duration;

use aichat_fake_llm::FakeConfig;
use aichat_faults::{
    Answer, Api, Client, Env, User, Ws, WsCollector, WsNext, report, ws::ws_upgrade, ws_connect,
    ws_next, ws_send, ws_until,
};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::route_matrix::{MATRIX, ROLES, Role};

async fn send_with_key(
    client: &Client,
    user: &User,
    chat: i64,
    key: &str,
    content: &str,
) -> Answer {
    client
        .try_call(
            Method::POST,
            &format!("/api/ai/chats/{chat}/send_message/"),
            Some(&user.token),
            Some(json!({"content": content})),
            &[("Idempotency-Key", key)],
        )
        .await
        .expect("send")
}

/// The id of the message `answer` accepted, insisting on 202.
fn accepted_id(answer: &Answer) -> i64 {
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    answer.body["message"]["id"].as_i64().expect("message id")
}

/// Reads `ws` until its next `error` event, which must say `text`; the event.
async fn error_saying(ws: &mut Ws, text: &str) -> Value {
    let error = ws_until(ws, Duration::from_secs(10), |e| e["type"] == "error").await;
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains(text), "{error}");
    error
}

/// Sequential and concurrent repeats of one `Idempotency-Key` store one message, queue one
/// job and get one reply; the first request's message comes back every time (409 only while
/// the first is still being stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_idempotency_keys_store_queue_and_answer_once() {
    let env = Env::start(FakeConfig::default()).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let events = env.event_counter().await;
    let alice = client.user("alice").await;
    let bob = client.user("bob").await;
    let chat = client.ai_chat(&alice, "idem").await;
    let other_chat = client.ai_chat(&alice, "other").await;
    let bobs_chat = client.ai_chat(&bob, "bob's").await;

    let first_id = accepted_id(&send_with_key(&client, &alice, chat, "key-1", "once").await);
    for _ in 0..5 {
        let again = send_with_key(&client, &alice, chat, "key-1", "once").await;
        assert_eq!(accepted_id(&again), first_id);
    }

    // Twenty at once with a fresh key.
    let sends = (0..20).map(|_| send_with_key(&client, &alice, chat, "key-2", "burst"));
    let answers: Vec<Answer> = futures::stream::iter(sends)
        .buffer_unordered(20)
        .collect()
        .await;
    let mut ids = HashSet::new();
    let mut conflicts = 0;
    for answer in &answers {
        match answer.status {
            StatusCode::ACCEPTED => {
                ids.insert(answer.body["message"]["id"].as_i64().expect("id"));
            }
            StatusCode::CONFLICT => conflicts += 1,
            other => panic!("unexpected {other}: {}", answer.body),
        }
    }
    assert_eq!(ids.len(), 1, "one message for the key: {ids:?}");
    let burst_id = *ids.iter().next().expect("an accepted send");

    // The key belongs to its user and chat.
    let elsewhere = send_with_key(&client, &alice, other_chat, "key-1", "once").await;
    assert_eq!(elsewhere.status, StatusCode::CONFLICT, "{}", elsewhere.body);
    let bobs_id = accepted_id(&send_with_key(&client, &bob, bobs_chat, "key-1", "bob's own").await);

    let jobs = {
        let mut conn = env.redis().await;
        let data: Vec<(String, Vec<u8>)> =
            redis::AsyncCommands::hgetall(&mut conn, env.queue_config().job_data_hash())
                .await
                .expect("job data");
        data.len()
    };
    assert_eq!(jobs, 3, "one job per message");

    let worker = env.worker(&[]).await;
    let audit = env.settled(Duration::from_secs(30)).await;
    audit.assert_answered_once(&[first_id, burst_id, bobs_id]);
    let counts = events.drain().await;
    assert!(counts.announced_twice().is_empty());
    assert_eq!(env.fake.requests().len(), 3, "one model call per message");
    // After the reply, a repeat still answers the first request's message.
    let late = send_with_key(&client, &alice, chat, "key-1", "once").await;
    assert_eq!(accepted_id(&late), first_id);
    assert_eq!(late.body["message"]["status"], "answered");
    report(
        "idempotency",
        &[
            ("sequential_repeats", "5".into()),
            ("concurrent_repeats", "20".into()),
            ("concurrent_409", conflicts.to_string()),
            ("messages_stored", audit.messages.len().to_string()),
            ("jobs_queued", jobs.to_string()),
            ("model_calls", env.fake.requests().len().to_string()),
        ],
    );
    env.finish(api, [worker]).await;
}

/// Each limit answers as documented and touches nothing else: the account's other session
/// keeps working, its other socket keeps receiving, other users can still send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_limits_answer_429_413_400_or_cut_the_socket_and_spare_other_sessions() {
    const RATE: usize = 5;
    let env = Env::start(FakeConfig::default()).await;
    let (api, client) = env
        .api_client(&[
            "--send-rate-per-minute",
            &RATE.to_string(),
            "--max-body-bytes",
            "4096",
            "--ws-max-message-bytes",
            "1024",
            "--max-content-chars",
            "200",
        ])
        .await;
    let alice = client.user("alice").await;
    let alice_2 = client.login("alice").await;
    let bob = client.user("bob").await;
    let chat = client.ai_chat(&alice, "limits").await;
    let bobs_chat = client.ai_chat(&bob, "bob's").await;
    let mut ws_1 = ws_connect(&api, chat, &alice.token).await;
    let ws_2 = WsCollector::start(ws_connect(&api, chat, &alice_2.token).await);
    let path = format!("/api/ai/chats/{chat}/send_message/");

    // Content length: 400 with the field's problem; over the socket, an error event.
    let long = client
        .post(&path, &alice.token, json!({"content": "x".repeat(201)}))
        .await;
    assert_eq!(long.status, StatusCode::BAD_REQUEST, "{}", long.body);
    assert!(long.body["content"].is_array(), "{}", long.body);
    assert!(
        ws_send(
            &mut ws_1,
            json!({"type": "message", "content": "y".repeat(201)})
        )
        .await
    );
    error_saying(&mut ws_1, "too long").await;

    // Body size: 413 with a JSON error, before anything is read into memory.
    let huge = client
        .post(&path, &alice.token, json!({"content": "z".repeat(5000)}))
        .await;
    assert_eq!(huge.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", huge.body);
    assert!(huge.body["error"].is_string(), "{}", huge.body);

    // WebSocket message size (see the next test for the close code): that socket is cut, the
    // other socket of the same account lives on.
    let big = json!({"type": "message", "content": "w".repeat(1500)});
    let _ = ws_send(&mut ws_1, big).await;
    let cut = loop {
        match ws_next(&mut ws_1, Duration::from_secs(10)).await {
            WsNext::Event(_) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(cut, WsNext::Closed(_)),
        "the socket that sent 1500 bytes is still open: {cut:?}"
    );
    let probe = client.send_ok(&alice_2, chat, "still here").await;
    ws_2.wait_for(Duration::from_secs(10), "the other socket's event", |e| {
        e["type"] == "user_message" && e["message"]["id"] == probe
    })
    .await;
    assert!(ws_2.closed().is_none());

    // Rate: RATE sends a minute per user (one is spent), REST and WebSocket together.
    let mut accepted = 1;
    let mut limited = None;
    for i in 0..RATE + 2 {
        let answer = client
            .send(&alice, chat, &format!("rate {i}"))
            .await
            .expect("send");
        match answer.status {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited = Some(answer);
                break;
            }
            other => panic!("unexpected {other}: {}", answer.body),
        }
    }
    assert_eq!(accepted, RATE);
    let limited = limited.expect("a 429");
    let retry_after: u64 = limited
        .retry_after
        .as_deref()
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert!(limited.body["error"].is_string());
    // The other session is limited too (the limit is the user's), but still logged in and
    // reading; other users send freely.
    let other_session = client.send(&alice_2, chat, "over").await.expect("send");
    assert_eq!(other_session.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        client.get("/api/me/", &alice_2.token).await.status,
        StatusCode::OK
    );
    assert_eq!(
        client
            .get(&format!("/api/ai/chats/{chat}/messages/"), &alice_2.token)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        client
            .send(&bob, bobs_chat, "bob")
            .await
            .expect("send")
            .status,
        StatusCode::ACCEPTED
    );
    // Over the socket, the limit is an error event and the socket stays open.
    let mut ws_3 = ws_connect(&api, chat, &alice_2.token).await;
    assert!(ws_send(&mut ws_3, json!({"type": "message", "content": "over"})).await);
    error_saying(&mut ws_3, "slow down").await;
    assert!(ws_send(&mut ws_3, json!({"type": "typing"})).await);
    // Nothing over a limit was stored.
    let audit = env.audit().await;
    assert_eq!(audit.messages.len(), RATE + 1, "{:?}", audit.messages);
    report(
        "abuse_limits",
        &[
            ("content_201_chars", long.status.as_u16().to_string()),
            ("body_5000_bytes", huge.status.as_u16().to_string()),
            ("ws_frame_1500_bytes", format!("{cut:?}")),
            ("sends_accepted_per_minute", accepted.to_string()),
            ("over_rate", limited.status.as_u16().to_string()),
            ("retry_after_s", retry_after.to_string()),
        ],
    );
    env.finish(api, []).await;
}

/// README and the issue: a WebSocket message over `WS_MAX_MESSAGE_BYTES` closes the socket
/// with 1009 (message too big), so the client knows not to resend it as is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_websocket_message_is_answered_with_close_1009() {
    use tokio_tungstenite::tungstenite::Message;
    let env = Env::start(FakeConfig::default()).await;
    let (api, client) = env.api_client(&["--ws-max-message-bytes", "1024"]).await;
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "limits").await;
    let mut ws = ws_connect(&api, chat, &alice.token).await;
    let big = json!({"type": "message", "content": "w".repeat(1500)});
    let _ = ws_send(&mut ws, big).await;
    let mut seen = Vec::new();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break Some(frame),
            Ok(Some(Ok(other))) => seen.push(format!("{other:?}")),
            Ok(Some(Err(err))) => {
                seen.push(format!("error: {err}"));
                break None;
            }
            Ok(None) => {
                seen.push("end of stream".into());
                break None;
            }
            Err(_) => panic!("nothing within 10 s"),
        }
    };
    let code = close.flatten().map(|f| u16::from(f.code));
    assert_eq!(
        code,
        Some(1009),
        "no 1009 close frame; the client saw {seen:?}"
    );
    env.finish(api, []).await;
}

// ---------------------------------------------------------------------------------------------
// The authorization matrix (its table: `route_matrix`)

/// What one row runs against: alice's chat, AI chat (linked to it) and a message in it.
struct Fixture {
    chat: i64,
    ai: i64,
    msg: i64,
}

async fn fixture(client: &Client, owner: &User) -> Fixture {
    let chat = client.chat(owner, "private").await;
    let linked = json!({"title": "mine", "related_chat": chat});
    let ai = client.create("/api/ai/chats/", owner, linked).await;
    let msg = client.send_ok(owner, ai, "secret").await;
    Fixture { chat, ai, msg }
}

/// What the matrix test has seen: how many checks, and the ones that got the wrong status.
#[derive(Default)]
struct Checks {
    checked: usize,
    mismatches: Vec<String>,
}

impl Checks {
    /// `what` (a request and role) got `status` and should have got `want`.
    fn status(&mut self, what: String, status: u16, want: u16, body: &Value) {
        self.checked += 1;
        if status != want {
            self.mismatches
                .push(format!("{what}: {status} (want {want}) {body}"));
        }
    }
}

/// The WebSocket's answer to an upgrade: 101, or the refusal's status.
async fn ws_status(api: &Api, ai: i64, token: Option<&str>) -> u16 {
    let mut url = api.ws_url(&format!("/ws/ai-chat/{ai}/"));
    if let Some(token) = token {
        url.push_str(&format!("?token={token}"));
    }
    ws_upgrade(url).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_every_route_every_role() {
    let env = Env::start(FakeConfig::default()).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let alice = client.user("alice").await;
    let mallory = client.user("mallory").await;
    let root = client.staff(&env, "root").await;
    let user_of = |role: Role| match role {
        Role::Anonymous => None,
        Role::Owner => Some(&alice),
        Role::Other => Some(&mallory),
        Role::Staff => Some(&root),
    };
    let token_of = |role: Role| user_of(role).map(|u| u.token.as_str());
    let mut checks = Checks::default();
    for row in MATRIX {
        // Fresh fixtures per row, so a DELETE or logout never changes another row's outcome;
        // the owner goes last in `ROLES` for the same reason.
        let fixture = fixture(&client, &alice).await;
        let path = row
            .path
            .replace("{chat}", &fixture.chat.to_string())
            .replace("{ai}", &fixture.ai.to_string())
            .replace("{msg}", &fixture.msg.to_string())
            .replace("{user}", &alice.id.to_string());
        for role in ROLES {
            // Logging out ends the session: use a session of its own.
            let session = match (row.path, user_of(role)) {
                ("/api/logout/", Some(user)) => Some(client.login(&user.username).await),
                (_, user) => user.cloned(),
            };
            let answer = client
                .try_call(
                    Method::from_bytes(row.method.as_bytes()).expect("method"),
                    &path,
                    session.as_ref().map(|u| u.token.as_str()),
                    row.body.map(|b| b()),
                    &[],
                )
                .await
                .expect("request");
            let want = row.expected(role);
            let what = format!("{} {} as {role:?}", row.method, row.path);
            checks.status(what, answer.status.as_u16(), want, &answer.body);
            if want == 401 {
                assert_eq!(answer.body, json!({"error": "Authentication required"}));
            }
        }
    }
    // The WebSocket: refused before the upgrade unless it is the owner's chat.
    let fixture = fixture(&client, &alice).await;
    for (role, want) in [
        (Role::Anonymous, 401),
        (Role::Owner, 101),
        (Role::Other, 404),
        (Role::Staff, 404),
    ] {
        let status = ws_status(&api, fixture.ai, token_of(role)).await;
        let what = format!("WS /ws/ai-chat/{{ai}}/ as {role:?}");
        checks.status(what, status, want, &Value::Null);
    }
    // Staff is an ordinary user on the contract routes: only its own data in its lists.
    for list in ["/api/ai/chats/", "/api/chats/"] {
        let answer = client.get(list, &root.token).await;
        let items = answer.body.as_array().expect("a list").clone();
        assert!(!items.is_empty(), "{list}: staff created one in the matrix");
        for item in items {
            let owner = item.get("user").cloned().unwrap_or(Value::Null);
            let participants = item["participants"].as_array().cloned().unwrap_or_default();
            assert!(
                owner == json!(root.id) || participants.iter().any(|p| p["id"] == root.id),
                "{list} as staff shows someone else's: {item}"
            );
        }
    }
    let messages = client.get("/api/ai/messages/", &root.token).await;
    assert_eq!(messages.body, json!([]), "staff sent no AI message");
    // ...while the admin routes show everyone's.
    let all = client.get("/api/admin/ai-chats/", &root.token).await;
    assert!(
        all.body
            .as_array()
            .is_some_and(|chats| chats.iter().any(|c| c["id"] == fixture.ai)),
        "{}",
        all.body
    );
    // Logging out everywhere ends every session of the caller, so it goes last, for each role
    // (no request follows it): anonymous 401, any signed-in user 200.
    for role in ROLES {
        let want = if role == Role::Anonymous { 401 } else { 200 };
        let answer = client
            .try_call(Method::POST, "/api/logout/all/", token_of(role), None, &[])
            .await
            .expect("request");
        let what = format!("POST /api/logout/all/ as {role:?}");
        checks.status(what, answer.status.as_u16(), want, &answer.body);
    }
    let Checks {
        checked,
        mismatches,
    } = checks;
    report(
        "authorization_matrix",
        &[
            ("checks", checked.to_string()),
            ("mismatches", mismatches.len().to_string()),
        ],
    );
    assert!(mismatches.is_empty(), "\n{}", mismatches.join("\n"));
    env.finish(api, []).await;
}
