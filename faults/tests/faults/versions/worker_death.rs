//! The worker answering a regeneration dies (SIGKILLed while the model hangs or mid-stream, or
//! gone right after saving): another worker takes the job over, and the question still ends
//! with exactly one new reply.
use std::time::{Duration, Instant};

use aichat_fake_llm::{FakeConfig, Outcome, RecordedRequest};
use aichat_faults::{
    Env, FLUSH_AT_ONCE, HEAVY, WsCollector, eventually, queue_settled, report, secs,
    slow_long_reply, wait_worker_ready,
};
use reqwest::StatusCode;

use super::{
    all_messages, answered_question, answered_with_version, assert_one_new_reply, calls_for, find,
    regenerate, replies_of, reply_version, wait_for_v2_announced,
};

const WORKER: &str = env!("CARGO_BIN_EXE_faults-worker");

/// When the worker answering a regeneration dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Death {
    /// SIGKILL while the model holds the call without answering (a hang).
    WhileTheModelHangs,
    /// SIGKILL while the model streams the new reply (slowly).
    MidStream,
    /// Exit right after committing the new reply, before announcing it or acknowledging the
    /// job (`FAULTS_DIE_AFTER_SAVE`).
    AfterSaving,
}

impl Death {
    /// Its name in the report line.
    fn name(self) -> &'static str {
        match self {
            Death::WhileTheModelHangs => "regenerate_sigkill_while_the_model_hangs",
            Death::MidStream => "regenerate_sigkill_mid_stream",
            Death::AfterSaving => "regenerate_death_after_saving",
        }
    }
}

/// The `assistant_delta` events of `question`'s replies the socket has shown.
fn deltas_of(socket: &WsCollector, question: i64) -> usize {
    socket
        .events()
        .iter()
        .filter(|e| e["type"] == "assistant_delta" && e["message_id"] == question)
        .count()
}

/// The model calls made with the API key `key` (each worker process gets its own).
fn calls_by(calls: &[RecordedRequest], key: &str) -> usize {
    calls
        .iter()
        .filter(|r| r.api_key.as_deref() == Some(key))
        .count()
}

/// An answered question is regenerated and the worker process answering the regeneration dies
/// at `death`; another worker takes the job over after the orphan window. The question ends
/// with exactly one new reply (v2, active, announced once) and its first reply untouched; the
/// model is asked again only when the dead worker had not saved the reply.
async fn a_regeneration_whose_worker_dies(death: Death) {
    let _heavy = HEAVY.lock().await;
    let started = Instant::now();
    let env = Env::start(FakeConfig::default()).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let first = env.ready_worker(&[]).await;
    let q = answered_question(&api, &client, &env, "regenerate me while a worker dies").await;
    first.stop().await;

    let mut victim_flags = vec!["--openai-api-key", "victim"];
    victim_flags.extend(FLUSH_AT_ONCE);
    let vars: &[(&str, &str)] = match death {
        Death::AfterSaving => &[("FAULTS_DIE_AFTER_SAVE", "1")],
        _ => &[],
    };
    let mut victim = env.worker_process_env(WORKER, &victim_flags, vars);
    wait_worker_ready(victim.port, Duration::from_secs(30)).await;
    match death {
        Death::WhileTheModelHangs => env.fake.push_script([Outcome::Hang]),
        Death::MidStream => env.fake.set_config(slow_long_reply()),
        Death::AfterSaving => {}
    }
    let taken_over = env.watch_takeover(victim.pid);
    let answer = regenerate(&client, &q.alice, q.question, None)
        .await
        .expect("regenerate");
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);

    match death {
        Death::WhileTheModelHangs => {
            let calls = env.fake.wait_for_requests(2, Duration::from_secs(30)).await;
            assert_eq!(
                calls.len(),
                2,
                "the model has the regeneration's call: {calls:?}"
            );
            assert_eq!(calls[1].outcome, "hang", "{:?}", calls[1]);
            victim.sigkill();
        }
        Death::MidStream => {
            // The first reply's deltas are on the socket too: three more are the new reply's.
            let wanted = deltas_of(&q.socket, q.question) + 3;
            eventually(Duration::from_secs(30), "deltas of the new reply", || {
                let seen = deltas_of(&q.socket, q.question);
                async move { (seen >= wanted).then_some(()) }
            })
            .await;
            victim.sigkill();
        }
        Death::AfterSaving => {}
    }
    let exit = victim
        .wait(Duration::from_secs(30))
        .await
        .expect("the victim is gone");
    assert!(!exit.success(), "{exit:?}");
    let died = Instant::now();
    // No live worker can hand its jobs over yet: what it held when it died.
    let held = env.held_by_pid(victim.pid).await;
    assert_eq!(
        held,
        vec![q.question],
        "it died holding the regeneration's job"
    );
    let messages = all_messages(&client, &q.alice, q.chat).await;
    let replies = replies_of(&messages, q.question);
    let status = &find(&messages, q.question)["status"];
    if death == Death::AfterSaving {
        assert_eq!(status, "answered");
        assert_one_new_reply(&replies, &q.v1);
        assert_eq!(
            q.socket.replies().get(&q.question),
            Some(&1),
            "v2 not announced yet"
        );
    } else {
        assert_eq!(status, "answering");
        assert_eq!(
            replies.len(),
            1,
            "nothing saved before the kill: {replies:?}"
        );
        env.fake.set_config(FakeConfig::default());
    }

    let mut rescuer = env
        .ready_worker_process(WORKER, &["--openai-api-key", "rescuer"])
        .await;
    let taken_over = taken_over
        .await
        .expect("watcher")
        .expect("the dead worker's job handed over within 30 s");
    wait_for_v2_announced(&q).await;
    let replies = answered_with_version(&client, &q.alice, q.chat, q.question, 2).await;
    queue_settled(&env, 2).await;
    let settled_after = died.elapsed();

    assert_one_new_reply(&replies, &q.v1);
    assert_eq!(reply_version(&env, q.question).await, 2, "one regeneration");
    let calls = calls_for(&env, &q.content);
    let (victim_calls, rescuer_calls) = (calls_by(&calls, "victim"), calls_by(&calls, "rescuer"));
    let expected_rescuer_calls = usize::from(death != Death::AfterSaving);
    assert_eq!(
        (calls.len(), victim_calls, rescuer_calls),
        (2 + expected_rescuer_calls, 1, expected_rescuer_calls),
        "the first reply's call, the victim's, and the rescuer's only if nothing was saved: \
         {calls:?}"
    );
    if death != Death::AfterSaving {
        let hung_up = env
            .fake
            .wait_until(Duration::from_secs(10), |records| {
                records
                    .iter()
                    .any(|r| r.api_key.as_deref() == Some("victim") && r.client_hung_up)
            })
            .await;
        assert!(hung_up.is_some(), "the victim's call was cut by its death");
    }
    let counts = q.events.drain().await;
    assert_eq!(
        counts.replies.get(&q.question),
        Some(&1),
        "v2 announced once: {counts:?}"
    );
    let audit = env.audit().await;
    assert_eq!(
        (audit.messages.len(), audit.stray_replies),
        (1, 0),
        "{audit:?}"
    );
    assert_eq!(
        (audit.messages[0].status.as_str(), audit.messages[0].replies),
        ("answered", 2),
        "{audit:?}"
    );
    report(
        death.name(),
        &[
            ("taken_over_after_s", secs(taken_over)),
            ("settled_after_death_s", secs(settled_after)),
            ("model_calls_for_the_question", calls.len().to_string()),
            ("replies", replies.len().to_string()),
            ("test_s", secs(started.elapsed())),
        ],
    );
    rescuer.kill().await;
    env.finish(api, []).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regeneration_whose_worker_is_sigkilled_while_the_model_hangs_gets_one_new_reply() {
    a_regeneration_whose_worker_dies(Death::WhileTheModelHangs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regeneration_whose_worker_is_sigkilled_mid_stream_gets_one_new_reply() {
    a_regeneration_whose_worker_dies(Death::MidStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regeneration_whose_worker_died_after_saving_is_announced_not_answered_again() {
    a_regeneration_whose_worker_dies(Death::AfterSaving).await;
}
