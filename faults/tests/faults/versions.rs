//! Fault 13: exactly one reply per (question, regeneration). A regeneration moves the question
//! back to `queued` and its `reply_version` on by one; the reply is saved with that version
//! under the unique `(reply_to, version)` index, becomes the active one, and the earlier replies
//! stay as they were. Whatever races it (repeats of the request, with or without an
//! `Idempotency-Key`), kills the worker answering it, or writes the same chat meanwhile (sends,
//! edits, other regenerations), each regeneration ends with exactly one new reply, the model is
//! asked once for it (again only when a worker died before saving it), and the chat's active
//! path stays one chain.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aichat_fake_llm::{FakeConfig, Outcome, RecordedRequest};
use aichat_faults::{
    Answer, Api, Client, Env, EventCounter, HEAVY, InProcessWorker, QueueSnapshot, User,
    WsCollector, eventually, fake_with_latency, pg_base, report, secs, wait_worker_ready,
    ws_connect,
};
use aichat_shared::jobs::{JobQueue, NextJob};
use rand::Rng;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

const WORKER: &str = env!("CARGO_BIN_EXE_faults-worker");

/// Every chunk its own delta, at once: the socket shows the stream as the model sends it.
const FLUSH_AT_ONCE: [&str; 4] = ["--delta-flush-ms", "1", "--delta-flush-chars", "1"];

const STILL_WAITING: &str = "This message is still waiting for its reply";
const KEY_IN_USE: &str = "A request with this Idempotency-Key is still being processed";

// ---------------------------------------------------------------------------------------------
// Reading a chat's versions

/// `POST /api/ai/messages/{id}/regenerate/` as `user`, with `key` as its `Idempotency-Key`.
async fn regenerate(
    client: &Client,
    user: &User,
    id: i64,
    key: Option<&str>,
) -> Result<Answer, reqwest::Error> {
    let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
    let path = format!("/api/ai/messages/{id}/regenerate/");
    client
        .try_call(
            Method::POST,
            &path,
            Some(&user.token),
            Some(json!({})),
            &headers,
        )
        .await
}

/// Every version of every turn of `chat` (`?all=true`), oldest first.
async fn all_messages(client: &Client, user: &User, chat: i64) -> Vec<Value> {
    list(
        client,
        user,
        &format!("/api/ai/chats/{chat}/messages/?all=true"),
    )
    .await
}

/// The active path of `chat`: what its user sees.
async fn active_path(client: &Client, user: &User, chat: i64) -> Vec<Value> {
    list(client, user, &format!("/api/ai/chats/{chat}/messages/")).await
}

async fn list(client: &Client, user: &User, path: &str) -> Vec<Value> {
    let answer = client.get(path, &user.token).await;
    assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.body);
    answer.body.as_array().expect("a list of messages").clone()
}

/// The message `id` of `messages`.
fn find(messages: &[Value], id: i64) -> &Value {
    messages
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("message {id} is not in {messages:?}"))
}

/// The replies to `question` among `messages`, by version.
fn replies_of(messages: &[Value], question: i64) -> Vec<Value> {
    let mut replies: Vec<Value> = messages
        .iter()
        .filter(|m| m["reply_to"] == question)
        .cloned()
        .collect();
    replies.sort_by_key(|r| r["version"].as_i64());
    replies
}

/// Waits (through the API) until `question` is answered and has a reply of `version`; its
/// replies then.
async fn answered_with_version(
    client: &Client,
    user: &User,
    chat: i64,
    question: i64,
    version: i64,
) -> Vec<Value> {
    eventually(
        Duration::from_secs(30),
        &format!("reply version {version} of message {question}"),
        || async {
            let messages = all_messages(client, user, chat).await;
            let replies = replies_of(&messages, question);
            let answered = find(&messages, question)["status"] == "answered";
            (answered && replies.iter().any(|r| r["version"] == version)).then_some(replies)
        },
    )
    .await
}

/// The question's hidden `reply_version`: how many regenerations it went through, plus one.
async fn reply_version(env: &Env, question: i64) -> i32 {
    sqlx::query_scalar("select reply_version from ai_messages where id = $1")
        .bind(question)
        .fetch_one(&env.pool)
        .await
        .expect("read reply_version")
}

/// The model calls whose last message is `content`: the calls made to answer that question.
fn calls_for(env: &Env, content: &str) -> Vec<RecordedRequest> {
    env.fake
        .requests()
        .into_iter()
        .filter(|r| r.messages.last().is_some_and(|m| m["content"] == content))
        .collect()
}

/// Insists that `replies` are the untouched first reply `v1` (only its `active` turned false)
/// and one active second version: exactly one new reply, and no third.
fn assert_one_new_reply(replies: &[Value], v1: &Value) {
    assert_eq!(
        replies.len(),
        2,
        "v1 and exactly one new reply: {replies:?}"
    );
    let mut kept = v1.clone();
    kept["active"] = json!(false);
    assert_eq!(replies[0], kept, "the first reply changed");
    let v2 = &replies[1];
    assert_eq!(
        (
            &v2["version"],
            &v2["active"],
            &v2["reply_to"],
            &v2["parent_id"]
        ),
        (&json!(2), &json!(true), &v1["reply_to"], &v1["reply_to"]),
        "{v2}"
    );
    assert!(v2["id"].as_i64() > v1["id"].as_i64(), "{v2}");
}

/// Waits until the queue holds nothing waiting, scheduled or in any worker's hands and `ended`
/// jobs have ended; insists that all were acknowledged done (none dead). Also in
/// `stop.rs`: a helper for the test kit.
async fn queue_settled(env: &Env, ended: u64) -> QueueSnapshot {
    let snapshot = eventually(Duration::from_secs(30), "the queue settled", || async {
        let s = env.queue_snapshot().await;
        let idle =
            s.waiting == 0 && s.scheduled == 0 && s.in_flight.iter().all(|(_, jobs)| *jobs == 0);
        (idle && s.done + s.dead >= ended).then_some(s)
    })
    .await;
    assert_eq!(
        (snapshot.done, snapshot.dead),
        (ended, 0),
        "every job acknowledged done, none dead, no job more: {snapshot:?}"
    );
    snapshot
}

/// One answered question in a chat of alice's, watched by a socket.
struct Answered {
    alice: User,
    chat: i64,
    question: i64,
    content: String,
    /// Its one reply, as `?all=true` lists it.
    v1: Value,
    socket: WsCollector,
    /// Counts the namespace's events from the moment the first reply was announced.
    events: EventCounter,
}

/// Sends `content` as alice and waits until it is answered and the answer announced (a worker
/// must be running).
async fn answered_question(api: &Api, client: &Client, env: &Env, content: &str) -> Answered {
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "versions").await;
    let socket = WsCollector::start(ws_connect(api, chat, &alice.token).await);
    let question = client.send_ok(&alice, chat, content).await;
    socket
        .reply_to(question, Duration::from_secs(30), "the first reply")
        .await;
    // The first reply was published before this subscribes: the counter sees only what follows.
    let events = env.event_counter().await;
    let replies = answered_with_version(client, &alice, chat, question, 1).await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    Answered {
        alice,
        chat,
        question,
        content: content.to_owned(),
        v1: replies[0].clone(),
        socket,
        events,
    }
}

/// Waits until the socket has shown the question's second reply.
async fn wait_for_v2_announced(q: &Answered) {
    q.socket
        .wait_for(Duration::from_secs(30), "v2 announced", |e| {
            e["type"] == "assistant_message"
                && e["message"]["reply_to"] == q.question
                && e["message"]["version"] == 2
        })
        .await;
}

// ---------------------------------------------------------------------------------------------
// Ten regenerations at once

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
    // gets no job of its own (a known defect, see the race below), which is not this test's.
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
    assert_one_new_reply(&replies, &q.v1);
    assert_eq!(reply_version(&env, q.question).await, 2, "one regeneration");
    let calls = calls_for(&env, &q.content);
    assert_eq!(
        calls.len(),
        2,
        "one model call for the new reply: {calls:?}"
    );
    let counts = q.events.drain().await;
    assert_eq!(counts.user_messages, 1, "one requeue announced: {counts:?}");
    assert_eq!(counts.replies.get(&q.question), Some(&1), "{counts:?}");
    assert_eq!(
        q.socket.replies().get(&q.question),
        Some(&2),
        "v1 and v2 announced once each"
    );
    let audit = env.audit().await;
    assert_eq!(
        (audit.messages.len(), audit.stray_replies),
        (1, 0),
        "{audit:?}"
    );
    assert_eq!(audit.messages[0].replies, 2, "{audit:?}");
    report(
        "regenerate_ten_with_one_key",
        &[
            ("statuses", format!("{by_status:?}")),
            ("model_calls_for_the_question", calls.len().to_string()),
            ("replies", replies.len().to_string()),
        ],
    );
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
    assert_one_new_reply(&replies, &q.v1);
    let calls = calls_for(&env, &q.content);
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
        "regenerate_ten_without_key",
        &[
            ("statuses", format!("{by_status:?}")),
            ("model_calls_for_the_question", calls.len().to_string()),
            ("replies", replies.len().to_string()),
        ],
    );
    env.finish(api, [second]).await;
}

// ---------------------------------------------------------------------------------------------
// The worker answering a regeneration dies

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

/// A long reply streamed slowly: 400 words, one every 50 ms (20 s in all), so a SIGKILL always
/// lands mid-stream.
fn slow_long_reply() -> FakeConfig {
    FakeConfig {
        reply_words: Some(400),
        chunk_delay_ms: 50,
        ..FakeConfig::default()
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

// ---------------------------------------------------------------------------------------------
// Sends, edits and regenerations racing in one chat

const CLIENTS: usize = 4;
const OPERATIONS: usize = 10;
/// What the loser of two concurrent regenerations is told when the winner's reply is already
/// saved by the time it reads the question again (`send::retry::not_retriable`).
const ANSWERED: &str = "This message has been answered";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Send,
    Regenerate,
    Edit,
}

/// What one operation of a racing client came to.
#[derive(Debug)]
struct Done {
    client: usize,
    op: Op,
    target: Option<i64>,
    status: StatusCode,
    body: Value,
}

/// One client of the race: `OPERATIONS` operations into `chat`, one after the other: half of
/// them sends, the rest regenerations and edits of a user message answered at that moment
/// (chosen at random among every version; a send when there is none). After each it reads the
/// active path, which must be one chain at every moment; what it found wrong, with the chat's
/// messages as they were then.
async fn racing_client(
    client: Arc<Client>,
    user: User,
    chat: i64,
    n: usize,
) -> (Vec<Done>, Vec<String>) {
    let mut done = Vec::with_capacity(OPERATIONS);
    let mut problems = Vec::new();
    for i in 0..OPERATIONS {
        let mut op = match (n + i) % 4 {
            1 => Op::Regenerate,
            3 => Op::Edit,
            _ => Op::Send,
        };
        let mut target = None;
        if op != Op::Send {
            let answered: Vec<i64> = all_messages(&client, &user, chat)
                .await
                .iter()
                .filter(|m| m["role"] == "user" && m["status"] == "answered")
                .filter_map(|m| m["id"].as_i64())
                .collect();
            if answered.is_empty() {
                op = Op::Send;
            } else {
                target = Some(answered[rand::rng().random_range(0..answered.len())]);
            }
        }
        let (path, body) = match (op, target) {
            (Op::Regenerate, Some(id)) => (format!("/api/ai/messages/{id}/regenerate/"), json!({})),
            (Op::Edit, Some(id)) => (
                format!("/api/ai/messages/{id}/edit/"),
                json!({"content": format!("client {n} edit {i}")}),
            ),
            _ => (
                format!("/api/ai/chats/{chat}/send_message/"),
                json!({"content": format!("client {n} message {i}")}),
            ),
        };
        let answer = client
            .try_call(Method::POST, &path, Some(&user.token), Some(body), &[])
            .await
            .unwrap_or_else(|err| panic!("{op:?} {path} got no answer: {err}"));
        done.push(Done {
            client: n,
            op,
            target,
            status: answer.status,
            body: answer.body,
        });
        let seen = chain_problems(&active_path(&client, &user, chat).await);
        if !seen.is_empty() && problems.is_empty() {
            let all = all_messages(&client, &user, chat).await;
            problems.push(format!(
                "after client {n}'s operation {i} ({op:?} {target:?}), the active path: {seen:?}\n{}",
                tree(&all)
            ));
        }
    }
    (done, problems)
}

/// What breaks the active path `path` being one chain: its user messages each follow the one
/// before (the first follows nothing), each of its replies answers one of them, each question
/// shows at most one reply, and exactly one once it is answered.
fn chain_problems(path: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let questions: Vec<&Value> = path.iter().filter(|m| m["role"] == "user").collect();
    let mut previous = Value::Null;
    for question in &questions {
        if question["parent_id"] != previous || question["active"] != true {
            problems.push(format!(
                "message {} (parent {}, active {}) follows {previous} on the path",
                question["id"], question["parent_id"], question["active"]
            ));
        }
        previous = question["id"].clone();
    }
    let on_path: HashSet<i64> = questions.iter().filter_map(|q| q["id"].as_i64()).collect();
    let mut shown: HashMap<i64, usize> = HashMap::new();
    for reply in path.iter().filter(|m| m["role"] == "assistant") {
        let question = reply["reply_to"].as_i64().unwrap_or(0);
        if reply["parent_id"] != reply["reply_to"] || !on_path.contains(&question) {
            problems.push(format!(
                "reply {} answers {question}, off the path",
                reply["id"]
            ));
        }
        *shown.entry(question).or_default() += 1;
    }
    for question in &questions {
        let id = question["id"].as_i64().unwrap_or(0);
        let n = shown.get(&id).copied().unwrap_or(0);
        if n > 1 || (question["status"] == "answered" && n != 1) {
            problems.push(format!(
                "{} question {id} shows {n} replies",
                question["status"]
            ));
        }
    }
    problems
}

/// Messages of one role following one message: (role, parent_id).
type Siblings = (String, Option<i64>);

/// Siblings numbered other than 1, 2, …: user messages by parent, replies by question.
fn sibling_problems(all: &[Value]) -> Vec<String> {
    // (version, id) of each sibling.
    let mut siblings: BTreeMap<Siblings, Vec<(i64, i64)>> = BTreeMap::new();
    for m in all {
        let key = (
            m["role"].as_str().unwrap_or("").to_owned(),
            m["parent_id"].as_i64(),
        );
        let version = m["version"].as_i64().unwrap_or(0);
        siblings
            .entry(key)
            .or_default()
            .push((version, m["id"].as_i64().unwrap_or(0)));
    }
    let mut problems = Vec::new();
    for ((role, parent), mut numbered) in siblings {
        numbered.sort_unstable();
        let versions: Vec<i64> = numbered.iter().map(|(v, _)| *v).collect();
        if versions != (1..=versions.len() as i64).collect::<Vec<_>>() {
            problems.push(format!(
                "{role} messages following {parent:?} are numbered (version, id) {numbered:?}"
            ));
        }
    }
    problems
}

/// The chat's messages one a line (id, role, parent, version, active, status, content): what
/// a failed check shows.
fn tree(all: &[Value]) -> String {
    all.iter()
        .map(|m| {
            format!(
                "{} {} parent={} v{} active={} {} {:?}",
                m["id"],
                m["role"],
                m["parent_id"],
                m["version"],
                m["active"],
                m["status"],
                m["content"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(40)
                    .collect::<String>()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits (at most `limit`) until no user message waits for its reply; the audit then, and
/// the messages still waiting if some still do.
async fn settled_within(env: &Env, limit: Duration) -> (aichat_faults::Audit, Vec<i64>) {
    let deadline = Instant::now() + limit;
    loop {
        let audit = env.audit().await;
        let waiting = audit.queued();
        if waiting.is_empty() || Instant::now() > deadline {
            return (audit, waiting);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where the chain of jobs of each of `messages` ends (`JobQueue::next_job_key`, with the
/// API's own queue handle: its keys carry the installation): `Alive`, or the key the next job
/// would take after the last one.
async fn job_chains(queue: &JobQueue, messages: &[i64]) -> Vec<(i64, NextJob)> {
    let mut chains = Vec::new();
    for &id in messages {
        chains.push((id, queue.next_job_key(id).await.expect("job chain")));
    }
    chains
}

/// A connection to the server's maintenance database, for what the test database's own
/// connections must not see or hold. As in `contention.rs`: a helper for the test kit.
async fn maintenance() -> PgConnection {
    PgConnection::connect(&format!("{}/postgres", pg_base()))
        .await
        .expect("connect to postgres")
}

/// Deadlocks PostgreSQL counted in `database`.
async fn deadlocks_in(database: &str) -> i64 {
    let mut conn = maintenance().await;
    sqlx::query_scalar("select deadlocks from pg_stat_database where datname = $1")
        .bind(database)
        .fetch_one(&mut conn)
        .await
        .expect("read pg_stat_database")
}

/// Stops the API and the worker, closes every pool to the test database, and answers the
/// deadlocks PostgreSQL counted in it once nothing is connected any more (a backend reports
/// its counts when it exits). As in `contention.rs`.
async fn stop_and_count_deadlocks(env: &Env, api: Api, worker: InProcessWorker) -> i64 {
    let db = api.state.db.clone();
    api.stop().await;
    db.close().await;
    worker.stop().await;
    env.pool.close().await;
    let database = env.db.name.as_str();
    eventually(
        Duration::from_secs(30),
        "every connection to the test database closed",
        || async move {
            let mut conn = maintenance().await;
            let open: i64 =
                sqlx::query_scalar("select count(*) from pg_stat_activity where datname = $1")
                    .bind(database)
                    .fetch_one(&mut conn)
                    .await
                    .expect("read pg_stat_activity");
            (open == 0).then_some(())
        },
    )
    .await;
    deadlocks_in(database).await
}

/// Every user message with its status, `reply_version` and the versions of its replies,
/// straight from the database: a regeneration's exactly-once audit (`Env::audit` counts
/// replies, not regenerations).
async fn versions_audit(env: &Env) -> Vec<(i64, String, i32, Vec<i32>)> {
    sqlx::query_as(
        "select u.id, u.status, u.reply_version,
                coalesce(array_agg(r.version order by r.version)
                         filter (where r.id is not null), '{}')
         from ai_messages u left join ai_messages r on r.reply_to = u.id
         where u.role = 'user' group by u.id order by u.id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("versions audit")
}

/// Four clients each make ten operations in **one** chat (sends, regenerations and edits of
/// answered questions, picked at random) while a worker saves replies to it (model 50 ms).
/// No answer is 5xx; sends are 202 and stored; edits and regenerations are 202 or 409 (and
/// store nothing when refused); the active path is one chain after every operation and at the
/// end; siblings are numbered 1, 2, …; within 20 s every question has exactly one reply per
/// regeneration; PostgreSQL counts no deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sends_edits_and_regenerations_racing_in_one_chat_keep_one_chain_and_one_reply_each() {
    let _heavy = HEAVY.lock().await;
    let env = Env::start(fake_with_latency(50)).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let client = Arc::new(client);
    let worker = env.ready_worker(&["--worker-concurrency", "8"]).await;
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "racing").await;
    let before = deadlocks_in(&env.db.name).await;
    let mut stored = vec![
        client.send_ok(&alice, chat, "seed 0").await,
        client.send_ok(&alice, chat, "seed 1").await,
    ];
    answered_with_version(&client, &alice, chat, stored[1], 1).await;

    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|n| tokio::spawn(racing_client(client.clone(), alice.clone(), chat, n)))
        .collect();
    let (mut done, mut problems) = (Vec::new(), Vec::new());
    for task in tasks {
        let (d, p) = task.await.expect("client task");
        done.extend(d);
        problems.extend(p);
    }
    let raced_for = started.elapsed();

    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for d in &done {
        let error = d.body["error"].as_str().unwrap_or("");
        *tally
            .entry(format!("{:?} {} {error}", d.op, d.status.as_u16()))
            .or_default() += 1;
        match (d.op, d.status) {
            (Op::Send | Op::Edit, StatusCode::ACCEPTED) => {
                stored.extend(d.body["message"]["id"].as_i64());
            }
            (Op::Regenerate, StatusCode::ACCEPTED)
                if d.body["message"]["id"].as_i64() == d.target => {}
            (Op::Regenerate | Op::Edit, StatusCode::CONFLICT)
                if error == STILL_WAITING || (d.op == Op::Regenerate && error == ANSWERED) => {}
            _ => problems.push(format!("unexpected answer: {d:?}")),
        }
    }

    // The model answers in 50 ms: 20 s is ample for every question queued at the end.
    let (audit, waiting) = settled_within(&env, Duration::from_secs(20)).await;
    let settled_after = started.elapsed() - raced_for;
    let queue = env.queue_snapshot().await;
    let path = active_path(&client, &alice, chat).await;
    let all = all_messages(&client, &alice, chat).await;
    let versions = versions_audit(&env).await;
    let jobs = api.state.queue.clone();
    let deadlocks = stop_and_count_deadlocks(&env, api, worker).await - before;

    if !waiting.is_empty() {
        problems.push(format!(
            "still waiting for their reply 20 s after the race: {waiting:?} (queue: {queue:?}; \
             where each one's chain of jobs ends: {:?})",
            job_chains(&jobs, &waiting).await
        ));
    }
    stored.sort_unstable();
    let audited: Vec<i64> = audit.messages.iter().map(|m| m.id).collect();
    if audited != stored {
        problems.push(format!(
            "user messages stored {audited:?}, accepted sends and edits {stored:?}"
        ));
    }
    if audit.stray_replies != 0 {
        problems.push(format!("{} replies answer nothing", audit.stray_replies));
    }
    for (id, status, reply_version, replies) in &versions {
        let expected: Vec<i32> = (1..=*reply_version).collect();
        if (status.as_str(), replies) != ("answered", &expected) {
            problems.push(format!(
                "message {id}: {status}, reply_version {reply_version}, replies of versions {replies:?}"
            ));
        }
    }
    let active_of_all: Vec<&Value> = all.iter().filter(|m| m["active"] == true).collect();
    if path.iter().collect::<Vec<_>>() != active_of_all {
        problems.push("the active path is not the active messages of ?all=true".into());
    }
    problems.extend(
        chain_problems(&path)
            .into_iter()
            .map(|p| format!("at the end: {p}")),
    );
    problems.extend(sibling_problems(&all));
    if deadlocks != 0 {
        problems.push(format!("PostgreSQL counted {deadlocks} deadlock(s)"));
    }
    let regenerations: i32 = versions.iter().map(|(_, _, v, _)| v - 1).sum();
    report(
        "versions_race",
        &[
            ("operations", done.len().to_string()),
            ("answers", format!("{tally:?}")),
            ("raced_for_s", secs(raced_for)),
            ("settled_after_s", secs(settled_after)),
            ("user_messages", audit.messages.len().to_string()),
            ("regenerations", regenerations.to_string()),
            ("active_path", path.len().to_string()),
            ("deadlocks", deadlocks.to_string()),
            ("problems", problems.len().to_string()),
        ],
    );
    done.sort_by_key(|d| d.client);
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}\n\nat the end:\n{}\n\noperations: {done:?}",
        problems.len(),
        problems.join("\n"),
        tree(&all)
    );
    env.cleanup().await;
}

/// Backends of the test's database waiting for a lock while running a statement containing
/// `fragment`.
async fn blocked_on_a_lock(env: &Env, fragment: &str) -> i64 {
    let mut conn = maintenance().await;
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity
         where datname = $1 and wait_event_type = 'Lock' and query like $2",
    )
    .bind(&env.db.name)
    .bind(format!("%{fragment}%"))
    .fetch_one(&mut conn)
    .await
    .expect("read pg_stat_activity")
}

/// Waits (at most 10 s) until a statement containing `fragment` waits for a lock.
async fn wait_until_blocked(env: &Env, fragment: &str, what: &str) {
    eventually(Duration::from_secs(10), what, || async {
        (blocked_on_a_lock(env, fragment).await > 0).then_some(())
    })
    .await;
}

/// The interleaving the race above finds now and then, made to happen every time: a
/// regenerated reply is saved while a branch switch that brings its question back onto the
/// active path holds the chat. The save (`completions::save_replies`) takes its statement's
/// snapshot, waits for the chat, then marks its reply active and the question's other active
/// replies inactive: the question must end with exactly one active reply, the new one.
///
/// How: Q1 → Q2 (reply R2), Q2 edited into Q2' (reply R2'). Q2 is regenerated (its branch
/// becomes the active one) and the model holds that call for 5 s; meanwhile Q2' is activated
/// (Q2 and R2 leave the path), then Q2 is activated again while the test holds R2''s row, so
/// that switch stops after taking the chat, with R2 made active but not committed. The model
/// answers, the save waits for the chat; the test lets the switch commit, then the save runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reply_saved_while_a_branch_switch_holds_the_chat_is_the_one_active_reply() {
    let _heavy = HEAVY.lock().await;
    let env = Env::start(FakeConfig::default()).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let worker = env.ready_worker(&[]).await;
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "switching").await;
    let q1 = client.send_ok(&alice, chat, "first question").await;
    answered_with_version(&client, &alice, chat, q1, 1).await;
    let q2 = client.send_ok(&alice, chat, "second question").await;
    let r2 = answered_with_version(&client, &alice, chat, q2, 1).await[0].clone();
    let edited = client
        .post(
            &format!("/api/ai/messages/{q2}/edit/"),
            &alice.token,
            json!({"content": "second question, edited"}),
        )
        .await;
    assert_eq!(edited.status, StatusCode::ACCEPTED, "{}", edited.body);
    let q2e = edited.body["message"]["id"].as_i64().expect("edit id");
    let r2e = answered_with_version(&client, &alice, chat, q2e, 1).await[0]["id"]
        .as_i64()
        .expect("reply id");

    let calls_before = env.fake.requests().len();
    env.fake.push_script([Outcome::Slow { latency_ms: 5000 }]);
    let answer = regenerate(&client, &alice, q2, None)
        .await
        .expect("regenerate");
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    env.fake
        .wait_for_requests(calls_before + 1, Duration::from_secs(10))
        .await;
    let activate = |id: i64| format!("/api/ai/messages/{id}/activate/");
    let away = client.post(&activate(q2e), &alice.token, json!({})).await;
    assert_eq!(away.status, StatusCode::OK, "{}", away.body);

    let mut hold = env.pool.begin().await.expect("begin");
    sqlx::query("select id from ai_messages where id = $1 for update")
        .bind(r2e)
        .execute(&mut *hold)
        .await
        .expect("lock R2'");
    let back = {
        let (base, token, path) = (api.base.clone(), alice.token.clone(), activate(q2));
        tokio::spawn(async move {
            let client = Client::for_base(&base, Duration::from_secs(30));
            client.post(&path, &token, json!({})).await
        })
    };
    wait_until_blocked(
        &env,
        "with recursive target",
        "the switch back holds the chat",
    )
    .await;
    let call = env.fake.requests().pop().expect("the regeneration's call");
    assert!(
        !call.stream_ended,
        "the set-up took longer than the model's 5 s: {call:?}"
    );
    wait_until_blocked(
        &env,
        // PostgreSQL shows a statement's first 1 kB: the opening of `save_replies`'s.
        "select distinct on (t.question_id)",
        "the new reply's save waits for the chat",
    )
    .await;
    hold.rollback().await.expect("release R2'");
    let back = back.await.expect("switch task");
    assert_eq!(back.status, StatusCode::OK, "{}", back.body);
    let replies = answered_with_version(&client, &alice, chat, q2, 2).await;

    let path = active_path(&client, &alice, chat).await;
    let all = all_messages(&client, &alice, chat).await;
    let shown: Vec<&Value> = path.iter().filter(|m| m["reply_to"] == q2).collect();
    report(
        "versions_save_during_switch",
        &[
            ("replies", replies.len().to_string()),
            ("shown_on_the_path", shown.len().to_string()),
        ],
    );
    assert_eq!(
        shown.iter().map(|m| &m["id"]).collect::<Vec<_>>(),
        vec![&replies[1]["id"]],
        "question {q2} shows other than its one new reply (R2 = {}); the chat:\n{}",
        r2["id"],
        tree(&all)
    );
    assert!(
        chain_problems(&path).is_empty(),
        "{:?}",
        chain_problems(&path)
    );
    env.finish(api, [worker]).await;
}
