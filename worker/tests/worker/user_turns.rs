//! A user's turns (`WORKER_PER_USER_CONCURRENCY`) last as long as the job holding one runs,
//! however long that is.

use std::time::Duration;

use crate::common::TestEnv;
use aichat_fake_llm::{FakeConfig, Outcome};

/// With a 3 s lease the user's sets outlive their last use by 10 s; a model call of 14 s keeps
/// the turn (its renewals extend the set), so the chat's second question is asked only after
/// the first is answered.
#[tokio::test]
async fn a_turn_held_longer_than_its_sets_expiry_is_still_held() {
    const CALL_MS: u64 = 14_000;
    let env = TestEnv::start(FakeConfig::default()).await;
    env.fake.push_script([Outcome::Slow {
        latency_ms: CALL_MS,
    }]);
    let worker = env
        .spawn_worker(&[
            "--worker-per-user-concurrency",
            "1",
            "--worker-user-slot-lease-secs",
            "3",
            "--llm-attempt-timeout-secs",
            "60",
        ])
        .await;
    let (chat, mut events) = env.watched_chat().await;
    let first = env.ask(chat, "first").await;
    let second = env.ask(chat, "second").await;
    events
        .replies_to_all(&[first.id, second.id], Duration::from_secs(60))
        .await;
    let requests = env.fake.requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].received_at_ms - requests[0].received_at_ms;
    assert!(
        gap >= CALL_MS,
        "the second call began {gap} ms after the first, before it was answered"
    );
    env.finish([worker]).await;
}
