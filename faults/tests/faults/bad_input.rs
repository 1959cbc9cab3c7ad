//! Fault 8 (bad input), API side: what `scripts/fuzz-api` (schemathesis) found, kept as a
//! regression test. A NUL character (U+0000) is valid JSON and valid UTF-8, but PostgreSQL
//! text cannot hold it ("invalid byte sequence for encoding UTF8: 0x00"): every text input
//! that reaches a query must be refused with 400 (or 401 on login), never a 500.
use std::time::Duration;

use aichat_fake_llm::FakeConfig;
use aichat_faults::{Env, fake_with_latency, ws_connect, ws_send, ws_until};
use reqwest::Method;
use serde_json::{Value, json};

const NUL: &str = "a\u{0}b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_in_text_input_are_refused_not_500() {
    let env = Env::start(FakeConfig::default()).await;
    let (api, client) = env.api_client(&[]).await;
    let alice = client.user("alice").await;
    let root = client.staff(&env, "root").await;
    let chat = client.chat(&alice, "c").await;
    let ai = client.ai_chat(&alice, "t").await;

    let cases: Vec<(&str, String, Option<&str>, Option<Value>)> = vec![
        (
            "POST",
            "/api/login/".into(),
            None,
            Some(json!({"username": NUL, "password": "x"})),
        ),
        (
            "POST",
            "/api/register/".into(),
            None,
            Some(
                json!({"username": "ok", "email": NUL, "password": "correct horse", "password_confirm": "correct horse"}),
            ),
        ),
        (
            "POST",
            "/api/chats/".into(),
            Some(&alice.token),
            Some(json!({"name": NUL})),
        ),
        (
            "POST",
            "/api/chats/".into(),
            Some(&alice.token),
            Some(json!({"name": "n", "participant_usernames": [NUL]})),
        ),
        (
            "POST",
            format!("/api/chats/{chat}/send_message/"),
            Some(&alice.token),
            Some(json!({"content": NUL})),
        ),
        (
            "POST",
            "/api/ai/chats/".into(),
            Some(&alice.token),
            Some(json!({"title": NUL})),
        ),
        (
            "POST",
            "/api/ai/chats/".into(),
            Some(&alice.token),
            Some(json!({"title": "t", "system_prompt": NUL})),
        ),
        (
            "POST",
            "/api/ai/chats/".into(),
            Some(&alice.token),
            Some(json!({"title": "t", "model": NUL})),
        ),
        (
            "PATCH",
            format!("/api/ai/chats/{ai}/"),
            Some(&alice.token),
            Some(json!({"system_prompt": NUL})),
        ),
        (
            "POST",
            format!("/api/ai/chats/{ai}/send_message/"),
            Some(&alice.token),
            Some(json!({"content": NUL})),
        ),
        (
            "GET",
            "/api/admin/ai-chats/?q=a%00b".into(),
            Some(&root.token),
            None,
        ),
    ];
    let mut server_errors = Vec::new();
    for (method, path, token, body) in &cases {
        let answer = client
            .try_call(
                Method::from_bytes(method.as_bytes()).expect("method"),
                path,
                *token,
                body.clone(),
                &[],
            )
            .await
            .expect("request");
        if answer.status.is_server_error() {
            server_errors.push(format!("{method} {path} {body:?} -> {}", answer.status));
        }
    }
    // Over the WebSocket, the same content must get a validation error, not "Internal server error".
    let mut ws = ws_connect(&api, ai, &alice.token).await;
    assert!(ws_send(&mut ws, json!({"type": "message", "content": NUL})).await);
    let event = ws_until(&mut ws, Duration::from_secs(10), |e| e["type"] == "error").await;
    if event["message"] == "Internal server error" {
        server_errors.push(format!("WS message {NUL:?} -> {event}"));
    }
    assert!(
        server_errors.is_empty(),
        "{} input(s) with NUL answered with a server error:\n{}",
        server_errors.len(),
        server_errors.join("\n")
    );
    env.finish(api, []).await;
}

/// Not bad input but found on the way: the API's `queue_jobs{state="in_flight"}` gauge (and
/// `JobQueue::depth`) must count the jobs workers hold, or an operator watching a stuck
/// worker sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_counts_the_jobs_workers_hold() {
    let env = Env::start(fake_with_latency(5_000)).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let worker = env.ready_worker(&[]).await;
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "depth").await;
    client.send_round(&alice, &[chat], "held", 4).await;
    env.fake.wait_for_requests(4, Duration::from_secs(20)).await;
    let held: u64 = env
        .queue_snapshot()
        .await
        .in_flight
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert_eq!(held, 4, "the workers hold the 4 jobs");
    let depth = api.state.queue.depth().await.expect("depth");
    assert_eq!(depth.in_flight, 4, "{depth:?}");
    env.finish(api, [worker]).await;
}
