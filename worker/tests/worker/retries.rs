//! A model that is slow, limited or failing: retries, Retry-After, permanent failures, the
//! attempt timeout, the request rate shared by workers.

use std::time::Duration;

use crate::common::{Events, TestEnv, WAIT, chat_event, fake_always};
use aichat_fake_llm::{FakeConfig, Outcome};
use aichat_shared::domain::AiMessage;
use aichat_shared::events::ChatEvent;

/// Sends `content` into `chat` and reads until the next `error` event: it must be that
/// message's, telling the user `text`. The message sent.
async fn ask_and_fail(
    env: &TestEnv,
    events: &mut Events,
    chat: i64,
    content: &str,
    text: &str,
) -> AiMessage {
    let sent = env.ask(chat, content).await;
    let error = events.next_error(WAIT).await;
    let ChatEvent::Error {
        message,
        message_id,
    } = chat_event(&error)
    else {
        panic!("{error}");
    };
    assert_eq!(message_id, Some(sent.id));
    assert_eq!(message, text);
    sent
}

#[tokio::test]
async fn rate_limited_calls_wait_for_retry_after_then_succeed() {
    let env = TestEnv::start(FakeConfig::default()).await;
    env.fake.push_script([
        Outcome::RateLimited {
            retry_after: "1".into(),
        },
        Outcome::RateLimited {
            retry_after: "1".into(),
        },
    ]);
    let worker = env.spawn_worker(&["--llm-backoff-base-ms", "10"]).await;
    let (chat, mut events) = env.watched_chat().await;

    let sent = env.ask(chat, "hello").await;
    events.reply_to(sent.id, WAIT).await;

    let requests = env.fake.requests();
    let outcomes: Vec<&str> = requests.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(outcomes, ["rate_limited", "rate_limited", "ok"]);
    for pair in requests.windows(2) {
        let gap = pair[1].received_at_ms - pair[0].received_at_ms;
        assert!(gap >= 1000, "Retry-After: 1 not honoured, gap {gap} ms");
    }
    let stored = env.messages(chat).await;
    assert_eq!(stored.len(), 2, "one question, one reply");
    assert_eq!(stored[0].status, "answered");
    assert!(events.of_type("error").is_empty());

    env.finish([worker]).await;
}

#[tokio::test]
async fn a_permanently_failing_model_fails_the_message_and_kills_the_job() {
    let env = TestEnv::start(fake_always(Outcome::ServerError)).await;
    let worker = env
        .spawn_worker(&["--llm-max-attempts", "3", "--llm-backoff-base-ms", "20"])
        .await;
    let (chat, mut events) = env.watched_chat().await;

    let message = "The AI service did not respond. Please try again later.";
    let sent = ask_and_fail(&env, &mut events, chat, "hello", message).await;

    let stored = env.message(chat, sent.id).await;
    assert_eq!(stored.status, "failed");
    assert_eq!(stored.error.as_deref(), Some(message));
    assert_eq!(env.messages(chat).await.len(), 1, "no reply stored");
    assert_eq!(env.fake.requests().len(), 3, "LLM_MAX_ATTEMPTS calls");

    // Dead, not retried by the queue.
    let dead = env.wait_queue_set("dead", 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    let meta = env.job_meta(&dead[0]).await;
    assert_eq!(meta.get("status").map(String::as_str), Some("Killed"));
    let mut conn = env.redis.clone();
    let scheduled: usize = redis::AsyncCommands::zcard(&mut conn, env.queue_key("scheduled"))
        .await
        .expect("scheduled set");
    assert_eq!(scheduled, 0);
    assert_eq!(env.fake.requests().len(), 3);

    env.finish([worker]).await;
}

#[tokio::test]
async fn client_errors_and_exhausted_quota_are_not_retried() {
    let env = TestEnv::start(fake_always(Outcome::BadRequest)).await;
    env.fake.push_script([Outcome::InsufficientQuota]);
    let worker = env.spawn_worker(&["--llm-backoff-base-ms", "10"]).await;
    let (chat, mut events) = env.watched_chat().await;

    let unavailable = "The AI service is currently unavailable. Please try again later.";
    let quota = ask_and_fail(&env, &mut events, chat, "first", unavailable).await;
    assert_eq!(env.fake.requests().len(), 1);

    let refused = "The AI service could not process this message.";
    let bad = ask_and_fail(&env, &mut events, chat, "second", refused).await;
    assert_eq!(env.fake.requests().len(), 2);
    for id in [quota.id, bad.id] {
        assert_eq!(env.message(chat, id).await.status, "failed");
    }
    let error_text = env.message(chat, bad.id).await.error.unwrap_or_default();
    assert!(!error_text.contains("injected"), "provider text leaked");

    env.finish([worker]).await;
}

#[tokio::test]
async fn a_silent_model_is_abandoned_after_the_attempt_timeout_and_retried() {
    let env = TestEnv::start(FakeConfig::default()).await;
    env.fake.push_script([Outcome::Hang]);
    let worker = env
        .spawn_worker(&[
            "--llm-attempt-timeout-secs",
            "1",
            "--llm-backoff-base-ms",
            "10",
        ])
        .await;
    let (chat, mut events) = env.watched_chat().await;

    let sent = env.ask(chat, "are you there").await;
    let reply = events.reply_to(sent.id, WAIT).await;
    assert_eq!(reply["message"]["content"], "Echo: are you there");
    let outcomes: Vec<String> = env.fake.requests().into_iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, ["hang", "ok"]);

    env.finish([worker]).await;
}

#[tokio::test]
async fn two_workers_never_exceed_the_shared_request_rate() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let limits = [
        "--rate-limit-rpm",
        "5",
        "--rate-limit-window-ms",
        "1000",
        "--rate-limit-tpm",
        "0",
    ];
    let first = env.spawn_worker(&limits).await;
    let second = env.spawn_worker(&limits).await;
    let (chat, mut events) = env.watched_chat().await;

    const JOBS: usize = 40;
    let mut ids = Vec::with_capacity(JOBS);
    for i in 0..JOBS {
        ids.push(env.ask(chat, &format!("question {i}")).await.id);
    }
    events.replies_to_all(&ids, Duration::from_secs(60)).await;

    let mut arrivals: Vec<u64> = env
        .fake
        .requests()
        .iter()
        .map(|r| r.received_at_ms)
        .collect();
    assert_eq!(arrivals.len(), JOBS);
    arrivals.sort_unstable();
    // Six requests inside any 1000 ms window would mean arrivals[i + 5] - arrivals[i] < 1000.
    // Both times come from the same millisecond clock, so no allowance is needed.
    let tightest = arrivals.windows(6).map(|w| w[5] - w[0]).min();
    eprintln!("tightest span of 6 consecutive arrivals: {tightest:?} ms");
    for (i, window) in arrivals.windows(6).enumerate() {
        let span = window[5] - window[0];
        assert!(
            span >= 1000,
            "requests {i}..={} arrived within {span} ms: {arrivals:?}",
            i + 5
        );
    }

    env.finish([first, second]).await;
}

#[tokio::test]
async fn a_retry_after_too_long_to_wait_fails_the_message_instead_of_the_job() {
    // 10^20 seconds does not fit a duration, 2^64 - 1 overflows an instant: both mean "not
    // within this job's deadline".
    let env = TestEnv::start(FakeConfig::default()).await;
    env.fake.push_script([
        Outcome::RateLimited {
            retry_after: "1e20".into(),
        },
        Outcome::RateLimited {
            retry_after: "18446744073709551615".into(),
        },
    ]);
    let worker = env.spawn_worker(&["--llm-backoff-base-ms", "10"]).await;
    let (chat, mut events) = env.watched_chat().await;
    let busy = "The AI service is busy right now. Please try again in a moment.";
    for content in ["first", "second"] {
        let sent = ask_and_fail(&env, &mut events, chat, content, busy).await;
        assert_eq!(env.message(chat, sent.id).await.status, "failed");
    }
    let outcomes: Vec<String> = env.fake.requests().into_iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, ["rate_limited", "rate_limited"]);
    env.finish([worker]).await;
}
