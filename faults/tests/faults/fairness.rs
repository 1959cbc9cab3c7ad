//! Fault 15: one user's backlog against everyone else. With `WORKER_PER_USER_CONCURRENCY`, a
//! user who queued hundreds of messages runs at most that many at once across the workers;
//! another user's message is answered at once, not after the backlog; the backlog is still
//! answered exactly once, each chat's messages asked in the order they were sent; a worker
//! killed while it holds the user's turns loses nothing (the turns end with their lease).
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aichat_faults::{Env, HEAVY, fake_with_latency, report, secs};
use reqwest::{Method, StatusCode};
use serde_json::json;

const WORKER: &str = env!("CARGO_BIN_EXE_faults-worker");
const MODEL_LATENCY_MS: u64 = 1000;

/// The question a recorded model request asks: its last message.
fn question(request: &aichat_fake_llm::RecordedRequest) -> String {
    request
        .messages
        .last()
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_backlog_does_not_hold_up_another_users_reply() {
    const BACKLOG: usize = 200;
    const CHATS: usize = 10;
    let _heavy = HEAVY.lock().await;
    let env = Env::start(fake_with_latency(MODEL_LATENCY_MS)).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let events = env.event_counter().await;
    // Four model slots in all, over two processes; two of them at most for one user.
    let flags = [
        "--worker-concurrency",
        "2",
        "--worker-per-user-concurrency",
        "2",
    ];
    let mut workers = vec![
        env.ready_worker_process(WORKER, &flags).await,
        env.ready_worker_process(WORKER, &flags).await,
    ];
    let alice = client.user("alice").await;
    let bob = client.user("bob").await;
    let chats = client.ai_chats(&alice, CHATS).await;
    let bobs_chat = client.ai_chat(&bob, "bob's").await;

    let backlog = client.send_round(&alice, &chats, "alice", BACKLOG).await;
    let sent = Instant::now();
    let answer = client
        .call(
            Method::POST,
            &format!("/api/ai/chats/{bobs_chat}/send_message/?wait=30"),
            Some(&bob.token),
            Some(json!({"content": "bob's only question"})),
        )
        .await;
    let bob_waited = sent.elapsed();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert!(
        bob_waited < Duration::from_secs(3),
        "bob's reply came {bob_waited:?} after his send, behind alice's backlog"
    );
    // The rest of the backlog need not take 100 s: the model answers fast from now on.
    let fast_from = aichat_faults::epoch_now();
    env.fake.state().set_config(fake_with_latency(20));
    let audit = env.settled(Duration::from_secs(120)).await;
    let mut everyone = backlog.clone();
    everyone.push(answer.body["reply_to"].as_i64().expect("bob's message"));
    audit.assert_answered_once(&everyone);
    let counts = events.drain().await;
    counts.assert_announced_once(&everyone);

    // At most two of alice's calls at once: a third starts only after the first one of the
    // two before it has answered (one model latency after it was received).
    let requests = env.fake.requests();
    let alices: Vec<u64> = requests
        .iter()
        .filter(|r| question(r).starts_with("alice"))
        .filter(|r| (r.received_at_ms as f64) / 1000.0 < fast_from)
        .map(|r| r.received_at_ms)
        .collect();
    assert!(
        alices.len() > 2,
        "alice's backlog was asked during bob's wait"
    );
    let closest = alices
        .windows(3)
        .map(|w| w[2] - w[0])
        .min()
        .unwrap_or(u64::MAX);
    assert!(
        closest >= MODEL_LATENCY_MS,
        "three of alice's calls within {closest} ms: more than two ran at once"
    );
    // Each chat's messages were asked in the order they were sent.
    let mut asked: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for request in &requests {
        let question = question(request);
        if let Some(i) = question.strip_prefix("alice ") {
            let i: usize = i.parse().expect("a message number");
            asked.entry(chats[i % CHATS]).or_default().push(i);
        }
    }
    for (chat, order) in &asked {
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "chat {chat} was asked out of order: {order:?}"
        );
    }
    report(
        "fairness",
        &[
            ("backlog", BACKLOG.to_string()),
            ("bob_reply_after_s", secs(bob_waited)),
            ("closest_three_alice_calls_ms", closest.to_string()),
            ("model_calls", requests.len().to_string()),
        ],
    );
    for worker in &mut workers {
        worker.kill().await;
    }
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_holding_a_users_turns_loses_nothing_and_the_turns_come_back() {
    const MESSAGES: usize = 6;
    let _heavy = HEAVY.lock().await;
    let env = Env::start(fake_with_latency(2000)).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let events = env.event_counter().await;
    let flags = [
        "--worker-concurrency",
        "4",
        "--worker-per-user-concurrency",
        "2",
        "--worker-user-slot-lease-secs",
        "3",
    ];
    let mut first = env.ready_worker_process(WORKER, &flags).await;
    let alice = client.user("alice").await;
    let chats = client.ai_chats(&alice, MESSAGES).await;
    let ids = client.send_round(&alice, &chats, "alice", MESSAGES).await;
    // Killed while it holds both of alice's turns, in the middle of their model calls.
    env.fake.wait_for_requests(2, Duration::from_secs(30)).await;
    first.sigkill();
    first
        .wait(Duration::from_secs(10))
        .await
        .expect("the killed worker is gone");
    let killed = Instant::now();
    let mut second = env.ready_worker_process(WORKER, &flags).await;
    let audit = env.settled(Duration::from_secs(90)).await;
    audit.assert_answered_once(&ids);
    events.drain().await.assert_announced_once(&ids);
    report(
        "fairness_kill",
        &[
            ("messages", MESSAGES.to_string()),
            ("all_answered_after_kill_s", secs(killed.elapsed())),
            ("model_calls", env.fake.requests().len().to_string()),
        ],
    );
    second.kill().await;
    api.stop().await;
    env.cleanup().await;
}

/// SIGTERM while jobs wait for their user's turn: the running one finishes, the waiting ones go
/// back to the queue at once (they never reached the model), the worker exits 0 without waiting
/// out its grace, and another worker answers every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_hands_back_the_jobs_waiting_for_their_users_turn() {
    const MESSAGES: usize = 4;
    const GRACE_SECS: u64 = 20;
    let _heavy = HEAVY.lock().await;
    let env = Env::start(fake_with_latency(2000)).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let events = env.event_counter().await;
    let grace = GRACE_SECS.to_string();
    let flags = [
        "--worker-concurrency",
        "4",
        "--worker-per-user-concurrency",
        "1",
        "--worker-shutdown-grace-secs",
        grace.as_str(),
    ];
    let mut first = env.ready_worker_process(WORKER, &flags).await;
    let alice = client.user("alice").await;
    let chats = client.ai_chats(&alice, MESSAGES).await;
    let ids = client.send_round(&alice, &chats, "alice", MESSAGES).await;
    // One runs (alice's one turn); the others wait in the worker.
    env.fake
        .state()
        .wait_for_requests(1, Duration::from_secs(30))
        .await;
    let signalled = Instant::now();
    first.sigterm();
    let status = first
        .wait(Duration::from_secs(GRACE_SECS + 10))
        .await
        .expect("the worker exits after SIGTERM");
    let exited_after = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        exited_after < Duration::from_secs(GRACE_SECS),
        "the waiting jobs held the stop until the grace ended: {exited_after:?}"
    );
    assert_eq!(
        env.fake.requests().len(),
        1,
        "a waiting job reached the model while stopping"
    );
    let mut second = env.ready_worker_process(WORKER, &flags).await;
    let audit = env.settled(Duration::from_secs(60)).await;
    audit.assert_answered_once(&ids);
    events.drain().await.assert_announced_once(&ids);
    report(
        "fairness_sigterm",
        &[
            ("messages", MESSAGES.to_string()),
            ("exited_after_s", secs(exited_after)),
            ("model_calls", env.fake.requests().len().to_string()),
        ],
    );
    second.kill().await;
    api.stop().await;
    env.cleanup().await;
}
