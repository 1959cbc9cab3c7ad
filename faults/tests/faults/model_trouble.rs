//! Fault 5: the model misbehaves. 30 % of calls fail (429 with Retry-After, 500, or a hang
//! past the attempt time-out): every message is still answered exactly once. Every call fails:
//! every message ends `failed` with a user-safe error, its job in the dead set, listed to staff
//! only, and a staff re-drive answers each message once when the model is back.
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use aichat_fake_llm::FakeConfig;
use aichat_faults::{
    Client, Env, HEAVY, InProcessWorker, User, one_decimal, quantile, report, secs,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Everything the worker may tell a user about a failed message (worker/src/llm.rs).
const USER_SAFE_ERRORS: [&str; 4] = [
    "The AI service is busy right now. Please try again in a moment.",
    "The AI service is currently unavailable. Please try again later.",
    "The AI service could not process this message.",
    "The AI service did not respond. Please try again later.",
];

fn outcomes(env: &Env) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for request in env.fake.requests() {
        *by.entry(request.outcome).or_default() += 1;
    }
    by
}

/// A model failing `fail_rate` of its calls (429 with Retry-After, 500, or a hang holding the
/// call 1.5 s), answering the others after `latency_ms`.
fn failing_model(fail_rate: f64, latency_ms: u64) -> FakeConfig {
    FakeConfig {
        latency_ms,
        fail_rate,
        hang_ms: 1500,
        ..FakeConfig::default()
    }
}

/// A worker giving up on a silent call after 1 s (before the model's 1.5 s hang ends), with
/// `extra` flags; ready to take jobs.
async fn impatient_worker(env: &Env, extra: &[&str]) -> InProcessWorker {
    let mut flags = vec!["--llm-attempt-timeout-secs", "1"];
    flags.extend_from_slice(extra);
    env.ready_worker(&flags).await
}

/// `method path` is for staff only: 401 without a token, 403 for `user` (sending `body`).
async fn assert_staff_only(
    client: &Client,
    method: Method,
    path: &str,
    user: &User,
    body: Option<Value>,
) {
    let anonymous = client.call(method.clone(), path, None, None).await;
    assert_eq!(
        anonymous.status,
        StatusCode::UNAUTHORIZED,
        "{method} {path}"
    );
    let as_user = client
        .call(method.clone(), path, Some(&user.token), body)
        .await;
    assert_eq!(as_user.status, StatusCode::FORBIDDEN, "{method} {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_failing_30_percent_of_calls_still_answers_every_message_once() {
    const MESSAGES: usize = 60;
    let _heavy = HEAVY.lock().await;
    let env = Env::start(failing_model(0.3, 100)).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let events = env.event_counter().await;
    // Ten attempts: a message fails only if ten calls in a row fail (0.3^10 ≈ 6e-6).
    let flags = [
        "--worker-concurrency",
        "16",
        "--llm-max-attempts",
        "10",
        "--llm-max-retry-secs",
        "90",
    ];
    let worker = impatient_worker(&env, &flags).await;
    let alice = client.user("alice").await;
    let chats = client.ai_chats(&alice, 6).await;
    let started = Instant::now();
    let ids = client.send_round(&alice, &chats, "flaky", MESSAGES).await;
    let audit = env.settled(Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    let by_outcome = outcomes(&env);
    let counts = events.drain().await;
    let delays = env.reply_delays().await;
    report(
        "model_30_percent_failing",
        &[
            ("messages", MESSAGES.to_string()),
            ("model_calls_by_outcome", format!("{by_outcome:?}")),
            ("answered", audit.with_status("answered").len().to_string()),
            ("failed", audit.with_status("failed").len().to_string()),
            ("lost", audit.not_answered_once(&ids).len().to_string()),
            ("duplicated", audit.duplicated().len().to_string()),
            (
                "announced_twice",
                counts.announced_twice().len().to_string(),
            ),
            ("all_answered_after_s", secs(elapsed)),
            ("reply_delay_p50_s", one_decimal(quantile(&delays, 0.5))),
            ("reply_delay_max_s", one_decimal(quantile(&delays, 1.0))),
        ],
    );
    audit.assert_answered_once(&ids);
    counts.assert_announced_once(&ids);
    let failures: usize = by_outcome
        .iter()
        .filter(|(outcome, _)| outcome.as_str() != "ok")
        .map(|(_, n)| n)
        .sum();
    assert!(failures > 0, "the model never failed: {by_outcome:?}");
    env.finish(api, [worker]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_model_fails_every_message_safely_and_staff_redrive_answers_each_once() {
    const MESSAGES: usize = 10;
    let _heavy = HEAVY.lock().await;
    let env = Env::start(failing_model(1.0, 0)).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let events = env.event_counter().await;
    let worker = impatient_worker(&env, &["--llm-max-attempts", "3"]).await;
    let alice = client.user("alice").await;
    let root = client.staff(&env, "root").await;
    let chats = client.ai_chats(&alice, 2).await;
    let started = Instant::now();
    let ids = client.send_round(&alice, &chats, "doomed", MESSAGES).await;
    let audit = env.settled(Duration::from_secs(60)).await;
    let all_failed_after = started.elapsed();
    let failed = audit.with_status("failed");
    assert_eq!(failed.len(), MESSAGES, "{:?}", audit.messages);
    for row in &audit.messages {
        let error = row.error.as_deref().unwrap_or_default();
        assert!(
            USER_SAFE_ERRORS.contains(&error),
            "message {} failed with a text users must not see: {error:?}",
            row.id
        );
        assert_eq!(row.replies, 0);
    }
    // One `error` event per message, and the same text on the REST side.
    let counts = events.drain().await;
    for id in &ids {
        assert_eq!(counts.errors.get(id), Some(&1), "error events of {id}");
    }
    let listed = client
        .get(
            &format!("/api/ai/chats/{}/messages/", chats[0]),
            &alice.token,
        )
        .await;
    for message in listed.body.as_array().expect("messages") {
        assert_eq!(message["status"], "failed");
        assert!(USER_SAFE_ERRORS.contains(&message["error"].as_str().unwrap_or_default()));
    }
    // apalis moves a job to the dead set after its handler returned (after the `failed` row
    // and the event), so the set may lag them by a moment.
    aichat_faults::eventually(Duration::from_secs(10), "every job in the dead set", || {
        let env = &env;
        async move { (env.queue_set("dead").await.len() == MESSAGES).then_some(()) }
    })
    .await;

    // The dead jobs: staff only.
    assert_staff_only(&client, Method::GET, "/api/admin/dead-jobs/", &alice, None).await;
    let dead = client.get("/api/admin/dead-jobs/", &root.token).await;
    assert_eq!(dead.status, StatusCode::OK, "{}", dead.body);
    let dead = dead.body.as_array().expect("dead jobs").clone();
    assert_eq!(dead.len(), MESSAGES);
    let listed_ids: HashSet<i64> = dead
        .iter()
        .map(|d| d["message_id"].as_i64().expect("message_id"))
        .collect();
    assert_eq!(listed_ids, ids.iter().copied().collect());
    for job in &dead {
        assert!(chats.contains(&job["ai_chat_id"].as_i64().expect("ai_chat_id")));
        assert!(job["attempts"].as_i64().is_some(), "{job}");
        assert!(job["task_id"].is_string(), "{job}");
    }

    // The model is back: staff re-drives every dead job; each message is answered once.
    env.fake.set_config(FakeConfig::default());
    let task = dead[0]["task_id"].as_str().expect("task id").to_owned();
    let path = format!("/api/admin/dead-jobs/{task}/redrive/");
    assert_staff_only(&client, Method::POST, &path, &alice, Some(json!({}))).await;
    let redriven_at = Instant::now();
    for job in &dead {
        let task = job["task_id"].as_str().expect("task id");
        let answer = client
            .post(
                &format!("/api/admin/dead-jobs/{task}/redrive/"),
                &root.token,
                json!({}),
            )
            .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
        assert_eq!(
            answer.body,
            json!({"task_id": task, "message_id": job["message_id"], "status": "queued"})
        );
    }
    let audit = env.settled(Duration::from_secs(30)).await;
    let redrive_answered_after = redriven_at.elapsed();
    audit.assert_answered_once(&ids);
    events.drain().await.assert_announced_once(&ids);
    let after = client.get("/api/admin/dead-jobs/", &root.token).await;
    assert_eq!(after.body, json!([]));
    let again = client.post(&path, &root.token, json!({})).await;
    assert_eq!(
        again.status,
        StatusCode::NOT_FOUND,
        "a second re-drive finds nothing"
    );
    report(
        "model_dead",
        &[
            ("messages", MESSAGES.to_string()),
            ("failed", failed.len().to_string()),
            ("all_failed_after_s", secs(all_failed_after)),
            ("model_calls_by_outcome", format!("{:?}", outcomes(&env))),
            ("dead_jobs_listed", dead.len().to_string()),
            ("redriven_answered_after_s", secs(redrive_answered_after)),
            ("lost", audit.not_answered_once(&ids).len().to_string()),
            ("duplicated", audit.duplicated().len().to_string()),
        ],
    );
    env.finish(api, [worker]).await;
}

/// A retry sent the moment a failure's `error` event arrives, while the job that failed the
/// message is still finishing (held alive here for 5 s after it recorded the failure, as a
/// slow acknowledgement would hold it), is queued at once and answered: it does not wait for
/// the sweeper (off here) nor for the failed job's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_right_after_a_failure_is_answered_while_the_failed_job_finishes() {
    let env = Env::start(aichat_testkit::fake_always(
        aichat_fake_llm::Outcome::ServerError,
    ))
    .await;
    let (api, client) = env.api_client(&[]).await;
    let mut worker = env.worker_process_env(
        env!("CARGO_BIN_EXE_faults-worker"),
        &[
            "--llm-max-attempts",
            "1",
            "--worker-sweep-interval-secs",
            "0",
        ],
        &[("FAULTS_PAUSE_AFTER_FAILURE_MS", "5000")],
    );
    aichat_testkit::wait_worker_ready(worker.port, Duration::from_secs(30)).await;
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "retried").await;
    let socket = aichat_faults::WsCollector::start(
        aichat_faults::ws_connect(&api, chat, &alice.token).await,
    );
    let message = client.send_ok(&alice, chat, "again, please").await;
    socket
        .wait_for(Duration::from_secs(15), "the failure", |e| {
            e["type"] == "error" && e["message_id"] == message
        })
        .await;
    env.fake.state().set_config(FakeConfig::default());
    let retried = Instant::now();
    let retry = client
        .call(
            Method::POST,
            &format!("/api/ai/messages/{message}/retry/"),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(retry.status, StatusCode::ACCEPTED, "{}", retry.body);
    let reply = socket
        .reply_to(
            message,
            Duration::from_secs(4),
            "the retry's reply, before the failed job ends",
        )
        .await;
    assert_eq!(reply["message"]["content"], "Echo: again, please");
    report(
        "retry_after_failure",
        &[("answered_after_retry_s", secs(retried.elapsed()))],
    );
    worker.kill().await;
    api.stop().await;
    env.cleanup().await;
}
