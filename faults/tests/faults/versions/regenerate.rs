//! Ten regenerations of one answered question at once, with one `Idempotency-Key` and without:
//! one requeue, one job, one new model call, one new reply.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aichat_fake_llm::FakeConfig;
use aichat_faults::stack::{api_args, start_api};
use aichat_faults::{Answer, Client, Env, SlowLink, User, queue_settled, report};
use reqwest::StatusCode;
use serde_json::Value;

use super::{
    Answered, STILL_WAITING, all_messages, answered_question, answered_with_version,
    assert_one_new_reply, calls_for, regenerate, replies_of, reply_version, wait_for_v2_announced,
};

const KEY_IN_USE: &str = "A request with this Idempotency-Key is still being processed";

/// Ten regenerations of `question` at once (released together by a barrier), half naming the
/// question, half its reply `reply` (both name the same question), with `key` if given.
async fn ten_at_once(
    client: &Arc<Client>,
    user: &User,
    question: i64,
    reply: i64,
    key: Option<&'static str>,
) -> Vec<Answer> {
    let barrier = Arc::new(tokio::sync::Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (client, user, barrier) = (client.clone(), user.clone(), barrier.clone());
            let target = if i % 2 == 0 { question } else { reply };
            tokio::spawn(async move {
                barrier.wait().await;
                regenerate(&client, &user, target, key).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        let answer = task.await.expect("request task");
        answers.push(answer.unwrap_or_else(|err| panic!("a regenerate got no answer: {err}")));
    }
    answers
}

fn statuses(answers: &[Answer]) -> BTreeMap<u16, usize> {
    let mut by_status = BTreeMap::new();
    for answer in answers {
        *by_status.entry(answer.status.as_u16()).or_default() += 1;
    }
    by_status
}

/// What both end with, once v2 is saved and announced and the queue has settled: v1 untouched
/// and one new reply, one new model call for it, one requeue and one new reply announced, and
/// the audit finds the one question with its two replies; then the report line `fault`.
async fn assert_regenerated_once(
    env: &Env,
    q: &Answered,
    replies: &[Value],
    by_status: &BTreeMap<u16, usize>,
    fault: &str,
) {
    assert_one_new_reply(replies, &q.v1);
    let calls = calls_for(env, &q.content);
    assert_eq!(
        calls.len(),
        2,
        "one model call for the new reply: {calls:?}"
    );
    let counts = q.events.drain().await;
    assert_eq!(counts.user_messages, 1, "one requeue announced: {counts:?}");
    assert_eq!(counts.replies.get(&q.question), Some(&1), "{counts:?}");
    let audit = env.audit().await;
    assert_eq!(
        (audit.messages.len(), audit.stray_replies),
        (1, 0),
        "{audit:?}"
    );
    assert_eq!(audit.messages[0].replies, 2, "{audit:?}");
    report(
        fault,
        &[
            ("statuses", format!("{by_status:?}")),
            ("model_calls_for_the_question", calls.len().to_string()),
            ("replies", replies.len().to_string()),
        ],
    );
}

/// Ten regenerations of one answered question at once, all with the same `Idempotency-Key`,
/// while a worker runs: none answered 5xx; each 202 (the first, or a repeat answering the same
/// question) or 409 (the key's first request still running); one requeue (one `user_message`
/// event, `reply_version` 2), one job, one new model call, and the question ends with v1
/// untouched and inactive and one active v2. A repeat afterwards still changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_regenerates_with_one_idempotency_key_make_one_new_reply() {
    let env = Env::start(FakeConfig::default()).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let client = Arc::new(client);
    let worker = env.ready_worker(&[]).await;
    let q = answered_question(&api, &client, &env, "regenerate me ten times with one key").await;
    // The first reply's job acknowledged: a regeneration while that job is still finishing
    // gets no job of its own (a known defect, see the race in `races.rs`), which is not this
    // test's.
    queue_settled(&env, 1).await;
    let v1_id = q.v1["id"].as_i64().expect("reply id");

    let key = Some("regenerate-once");
    let answers = ten_at_once(&client, &q.alice, q.question, v1_id, key).await;
    let by_status = statuses(&answers);
    for answer in &answers {
        match answer.status {
            StatusCode::ACCEPTED => assert_eq!(
                answer.body["message"]["id"], q.question,
                "a 202 answers the question: {}",
                answer.body
            ),
            StatusCode::CONFLICT => assert_eq!(answer.body["error"], KEY_IN_USE),
            other => panic!("{other}: {} (all: {by_status:?})", answer.body),
        }
    }
    assert!(
        by_status.get(&202).is_some_and(|n| *n >= 1),
        "{by_status:?}"
    );

    let replies = answered_with_version(&client, &q.alice, q.chat, q.question, 2).await;
    wait_for_v2_announced(&q).await;
    queue_settled(&env, 2).await;
    let repeat = regenerate(&client, &q.alice, q.question, key)
        .await
        .expect("a repeat");
    assert_eq!(repeat.status, StatusCode::ACCEPTED, "{}", repeat.body);
    assert_eq!(
        repeat.body["message"]["status"], "answered",
        "{}",
        repeat.body
    );
    queue_settled(&env, 2).await;

    let all = all_messages(&client, &q.alice, q.chat).await;
    assert_eq!(
        replies_of(&all, q.question),
        replies,
        "the repeat changed nothing"
    );
    assert_eq!(reply_version(&env, q.question).await, 2, "one regeneration");
    assert_eq!(
        q.socket.replies().get(&q.question),
        Some(&2),
        "v1 and v2 announced once each"
    );
    let fault = "regenerate_ten_with_one_key";
    assert_regenerated_once(&env, &q, &replies, &by_status, fault).await;
    env.finish(api, [worker]).await;
}

/// Ten regenerations of one answered question at once without a key, no worker running (so
/// the new reply cannot land in between and make a second regeneration legitimate): exactly
/// one 202, nine 409 "still waiting", one job queued; once a worker runs, one new model call
/// and one new reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_regenerates_without_a_key_make_one_new_reply() {
    let env = Env::start(FakeConfig::default()).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let client = Arc::new(client);
    let first = env.ready_worker(&[]).await;
    let q = answered_question(&api, &client, &env, "regenerate me ten times at once").await;
    first.stop().await;
    let v1_id = q.v1["id"].as_i64().expect("reply id");

    let answers = ten_at_once(&client, &q.alice, q.question, v1_id, None).await;
    let by_status = statuses(&answers);
    assert_eq!(
        by_status,
        BTreeMap::from([(202, 1), (409, 9)]),
        "{:?}",
        answers.iter().map(|a| &a.body).collect::<Vec<_>>()
    );
    for answer in &answers {
        match answer.status {
            StatusCode::ACCEPTED => {
                assert_eq!(answer.body["message"]["id"], q.question, "{}", answer.body);
                assert_eq!(
                    answer.body["message"]["status"], "queued",
                    "{}",
                    answer.body
                );
            }
            _ => assert_eq!(answer.body["error"], STILL_WAITING, "{}", answer.body),
        }
    }
    let queued = env.queue_snapshot().await;
    // apalis files a pushed job as waiting or as scheduled (due now): either is one job.
    assert_eq!(
        (queued.waiting + queued.scheduled, queued.done),
        (1, 1),
        "one job queued: {queued:?}"
    );
    assert_eq!(reply_version(&env, q.question).await, 2, "one regeneration");

    let second = env.ready_worker(&[]).await;
    wait_for_v2_announced(&q).await;
    let replies = answered_with_version(&client, &q.alice, q.chat, q.question, 2).await;
    queue_settled(&env, 2).await;
    let fault = "regenerate_ten_without_key";
    assert_regenerated_once(&env, &q, &replies, &by_status, fault).await;
    env.finish(api, [second]).await;
}

/// A regeneration's `user_message` (the question, `queued` again) reaches the chat's sockets
/// before its new reply, even when the API's link to Redis is slow and the worker's is not:
/// the event is published in the script run that pushes the job, before any worker can take
/// it. Published in a round trip of its own after the push, it came a link's delay after the
/// job was there, and a worker answered first (the web page then showed the question as
/// queued under its own answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regenerations_user_message_comes_before_its_reply_over_a_slow_link_to_redis() {
    let env = Env::start(FakeConfig::default()).await;
    let upstream = env.redis_url.trim_start_matches("redis://");
    let upstream = upstream.split('/').next().unwrap_or(upstream);
    let link = SlowLink::start(upstream, Duration::from_secs(1)).await;
    let api = start_api(api_args(
        &env.db.url,
        &link.redis_url(),
        &env.ns,
        &["--run-migrations", "false", "--send-rate-per-minute", "0"],
    ))
    .await;
    let client = Client::new(&api);
    let worker = env.ready_worker(&[]).await;
    let q = answered_question(&api, &client, &env, "regenerate me over a slow link").await;
    queue_settled(&env, 1).await;

    let answer = regenerate(&client, &q.alice, q.question, None)
        .await
        .expect("the regeneration's answer");
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    wait_for_v2_announced(&q).await;
    let events = q.socket.events();
    // The question's last `user_message` is the regeneration's (the send's came first).
    let requeued = events
        .iter()
        .rposition(|e| e["type"] == "user_message" && e["message"]["id"] == q.question);
    let v2 = events.iter().position(|e| {
        e["type"] == "assistant_message"
            && e["message"]["reply_to"] == q.question
            && e["message"]["version"] == 2
    });
    assert!(
        matches!((requeued, v2), (Some(r), Some(v)) if r < v),
        "the requeued question at {requeued:?}, its new reply at {v2:?}: {events:#?}"
    );
    env.finish(api, [worker]).await;
}
