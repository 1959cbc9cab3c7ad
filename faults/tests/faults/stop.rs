//! Fault 12: a message its user stopped never runs again. Not when the worker that stopped it
//! is SIGKILLed, or dies before acknowledging its job (the orphan hand-over gives the job to
//! another worker), not when the worker answering it died before the stop reached it (the stop
//! is recorded while nobody runs it), not when a duplicate job of it is pushed: the model is
//! asked once, and the message keeps zero or one assistant message.
use std::time::{Duration, Instant};

use aichat_faults::{
    Client, DEFAULT_CONTEXT, Env, FLUSH_AT_ONCE, HEAVY, User, WsCollector, eventually,
    queue_settled, report, secs, slow_long_reply, wait_worker_ready, ws_connect,
};
use aichat_shared::jobs::{CompletionJob, JobQueue};
use aichat_shared::keys::Namespace;
use reqwest::StatusCode;
use serde_json::{Value, json};

const WORKER: &str = env!("CARGO_BIN_EXE_faults-worker");

fn stop_path(message: i64) -> String {
    format!("/api/ai/messages/{message}/stop/")
}

async fn stop(client: &Client, user: &User, message: i64) -> (StatusCode, Value) {
    let answer = client
        .post(&stop_path(message), &user.token, json!({}))
        .await;
    (answer.status, answer.body)
}

/// The user message `id` as the API shows it.
async fn message(client: &Client, user: &User, id: i64) -> Value {
    let answer = client
        .get(&format!("/api/ai/messages/{id}/"), &user.token)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    answer.body
}

/// The assistant messages of `chat` answering `id`.
async fn replies_to(client: &Client, user: &User, chat: i64, id: i64) -> Vec<Value> {
    let answer = client
        .get(&format!("/api/ai/chats/{chat}/messages/"), &user.token)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    answer
        .body
        .as_array()
        .expect("a list of messages")
        .iter()
        .filter(|m| m["reply_to"] == id)
        .cloned()
        .collect()
}

/// Waits until the socket has shown `n` deltas of `message`'s reply: a worker has taken it
/// and the model is streaming.
async fn wait_for_deltas(socket: &WsCollector, message: i64, n: usize) {
    eventually(Duration::from_secs(15), "deltas of the reply", || {
        let seen = socket
            .events()
            .iter()
            .filter(|e| e["type"] == "assistant_delta" && e["message_id"] == message)
            .count();
        async move { (seen >= n).then_some(()) }
    })
    .await;
}

/// Checks that `question` is answered by exactly the stopped reply the stop answered with;
/// its replies.
async fn the_stopped_reply_alone(
    client: &Client,
    user: &User,
    chat: i64,
    question: i64,
    stopped: &Value,
) -> Vec<Value> {
    assert_eq!(message(client, user, question).await["status"], "answered");
    let replies = replies_to(client, user, chat, question).await;
    assert_eq!(replies.len(), 1, "exactly one reply: {replies:?}");
    assert_eq!(replies[0]["id"], stopped["reply"]["id"]);
    assert_eq!(replies[0]["content"], stopped["reply"]["content"]);
    assert_eq!(replies[0]["stopped"], true);
    replies
}

/// Stop acknowledged with the stopped reply, then the worker that stopped it SIGKILLed at
/// once, and another worker started: after the orphan window the message is still answered by
/// the one stopped reply, announced once, and the model was asked once. The worker has usually
/// acknowledged the job by the time the 200 arrives (`held_at_kill` says); the next test kills
/// it while it still holds the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_stopped_then_its_worker_sigkilled_is_not_asked_again() {
    let _heavy = HEAVY.lock().await;
    let started = Instant::now();
    let env = Env::start(slow_long_reply()).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let events = env.event_counter().await;
    let mut stopping = env.ready_worker_process(WORKER, &FLUSH_AT_ONCE).await;
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "stopped").await;
    let socket = WsCollector::start(ws_connect(&api, chat, &alice.token).await);
    let question = client.send_ok(&alice, chat, "tell me a long story").await;
    wait_for_deltas(&socket, question, 3).await;

    let (status, stopped) = stop(&client, &alice, question).await;
    stopping.sigkill();
    let killed = Instant::now();
    assert_eq!(status, StatusCode::OK, "{stopped}");
    assert_eq!(stopped["message"]["status"], "answered", "{stopped}");
    assert_eq!(stopped["reply"]["stopped"], true, "{stopped}");
    assert_eq!(stopped["reply"]["reply_to"], question, "{stopped}");
    let taken_over = env.watch_takeover(stopping.pid);
    stopping
        .wait(Duration::from_secs(10))
        .await
        .expect("the killed worker is gone");
    // No live worker can hand its jobs over yet: what it held when it died.
    let held_at_kill = env.held_by_pid(stopping.pid).await;

    let mut rescuer = env.ready_worker_process(WORKER, &FLUSH_AT_ONCE).await;
    let taken_over = taken_over
        .await
        .expect("watcher")
        .expect("the killed worker's jobs handed over within 30 s");
    queue_settled(&env, 1).await;
    let settled_after = killed.elapsed();

    let calls = env.fake.requests();
    assert_eq!(calls.len(), 1, "the model was asked again: {calls:?}");
    assert!(
        calls[0].client_hung_up && calls[0].chunks_sent < 400,
        "the one call was cut by the stop: {:?}",
        calls[0]
    );
    let replies = the_stopped_reply_alone(&client, &alice, chat, question, &stopped).await;
    let audit = env.audit().await;
    assert_eq!(
        (audit.messages.len(), audit.stray_replies),
        (1, 0),
        "{audit:?}"
    );
    let counts = events.drain().await;
    assert_eq!(counts.replies.get(&question), Some(&1), "{counts:?}");
    report(
        "stop_then_sigkill",
        &[
            ("held_at_kill", held_at_kill.len().to_string()),
            ("taken_over_after_s", secs(taken_over)),
            ("settled_after_kill_s", secs(settled_after)),
            ("model_calls", calls.len().to_string()),
            ("chunks_before_stop", calls[0].chunks_sent.to_string()),
            ("replies", replies.len().to_string()),
            ("test_s", secs(started.elapsed())),
        ],
    );
    rescuer.kill().await;
    env.finish(api, []).await;
}

/// The worker stopping a reply dies right after committing it, before announcing it or
/// acknowledging its job (the fault binary exits there, as a SIGKILL at that moment would
/// leave it): the stop still answers 200 with the stopped reply (read after
/// `--stop-wait-secs 1`), and the worker that takes the job over after the orphan window
/// finds the message answered: it announces the stopped reply once and does not ask the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_reply_whose_worker_died_holding_the_job_is_not_asked_again() {
    let _heavy = HEAVY.lock().await;
    let started = Instant::now();
    let env = Env::start(slow_long_reply()).await;
    let (api, client) = env
        .api_client(&["--send-rate-per-minute", "0", "--stop-wait-secs", "1"])
        .await;
    let events = env.event_counter().await;
    let mut dying =
        env.worker_process_env(WORKER, &FLUSH_AT_ONCE, &[("FAULTS_DIE_AFTER_SAVE", "1")]);
    wait_worker_ready(dying.port, Duration::from_secs(30)).await;
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "died stopping").await;
    let socket = WsCollector::start(ws_connect(&api, chat, &alice.token).await);
    let question = client.send_ok(&alice, chat, "tell me a long story").await;
    wait_for_deltas(&socket, question, 3).await;

    let taken_over = env.watch_takeover(dying.pid);
    let (status, stopped) = stop(&client, &alice, question).await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    assert_eq!(stopped["reply"]["stopped"], true, "{stopped}");
    let exit = dying
        .wait(Duration::from_secs(10))
        .await
        .expect("the worker dies after saving the stopped reply");
    assert!(!exit.success(), "{exit:?}");
    let died = Instant::now();
    let held_at_death = env.held_by_pid(dying.pid).await;
    assert_eq!(held_at_death, vec![question], "it died holding the job");
    assert_eq!(
        socket.replies().get(&question),
        None,
        "announced before the death"
    );

    let mut rescuer = env.ready_worker_process(WORKER, &FLUSH_AT_ONCE).await;
    let taken_over = taken_over
        .await
        .expect("watcher")
        .expect("the dead worker's job handed over within 30 s");
    socket
        .reply_to(
            question,
            Duration::from_secs(10),
            "the stopped reply announced",
        )
        .await;
    queue_settled(&env, 1).await;
    let settled_after = died.elapsed();

    let calls = env.fake.requests();
    assert_eq!(calls.len(), 1, "the model was asked again: {calls:?}");
    let replies = the_stopped_reply_alone(&client, &alice, chat, question, &stopped).await;
    let counts = events.drain().await;
    assert_eq!(counts.replies.get(&question), Some(&1), "{counts:?}");
    report(
        "stop_then_death_before_ack",
        &[
            ("held_at_death", held_at_death.len().to_string()),
            ("taken_over_after_s", secs(taken_over)),
            ("settled_after_death_s", secs(settled_after)),
            ("model_calls", calls.len().to_string()),
            ("replies", replies.len().to_string()),
            ("test_s", secs(started.elapsed())),
        ],
    );
    rescuer.kill().await;
    env.finish(api, []).await;
}

/// The worker answering a message SIGKILLed mid-stream: the message stays `answering` with
/// nobody to stop it, so a stop only records the request (202 after `--stop-wait-secs 1`).
/// The worker that takes the orphaned job over finds the request and cancels the message
/// without asking the model: no reply, one model call (the dead worker's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_worker_died_mid_stream_is_cancelled_not_asked_again_after_a_stop() {
    let _heavy = HEAVY.lock().await;
    let started = Instant::now();
    let env = Env::start(slow_long_reply()).await;
    let (api, client) = env
        .api_client(&["--send-rate-per-minute", "0", "--stop-wait-secs", "1"])
        .await;
    let events = env.event_counter().await;
    let mut dying = env.ready_worker_process(WORKER, &FLUSH_AT_ONCE).await;
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "orphaned").await;
    let socket = WsCollector::start(ws_connect(&api, chat, &alice.token).await);
    let question = client.send_ok(&alice, chat, "tell me a long story").await;
    wait_for_deltas(&socket, question, 3).await;

    dying.sigkill();
    let taken_over = env.watch_takeover(dying.pid);
    dying
        .wait(Duration::from_secs(10))
        .await
        .expect("the killed worker is gone");
    let held_at_kill = env.held_by_pid(dying.pid).await;
    assert_eq!(held_at_kill, vec![question], "it died holding the job");
    assert_eq!(
        message(&client, &alice, question).await["status"],
        "answering"
    );

    let (stop_status, stopped) = stop(&client, &alice, question).await;
    assert_eq!(
        stop_status,
        StatusCode::ACCEPTED,
        "no worker to stop it: {stopped}"
    );
    assert_eq!(stopped["message"]["status"], "answering", "{stopped}");
    assert_eq!(stopped["reply"], Value::Null, "{stopped}");
    let stopped_at = Instant::now();

    let mut rescuer = env.ready_worker_process(WORKER, &FLUSH_AT_ONCE).await;
    // Ended, or asked again (what a run that ignored the stop does at once): whichever comes
    // first, so a missing protection fails here rather than after a 20 s reply.
    let status = eventually(
        Duration::from_secs(30),
        "the message ended or the model was asked again",
        || async {
            let status = message(&client, &alice, question).await["status"].clone();
            (status != "answering" || env.fake.requests().len() > 1).then_some(status)
        },
    )
    .await;
    let ended_after = stopped_at.elapsed();
    let calls = env.fake.requests();
    assert_eq!(
        calls.len(),
        1,
        "the model was asked again after the stop: {calls:?}"
    );
    assert_eq!(status, "cancelled");
    socket
        .wait_for(Duration::from_secs(10), "message_cancelled", |e| {
            e["type"] == "message_cancelled" && e["message_id"] == question
        })
        .await;
    let taken_over = taken_over
        .await
        .expect("watcher")
        .expect("the killed worker's jobs handed over within 30 s");
    queue_settled(&env, 1).await;

    assert_eq!(env.fake.requests().len(), 1, "{:?}", env.fake.requests());
    assert!(
        calls[0].client_hung_up,
        "the dead worker's call: {:?}",
        calls[0]
    );
    let replies = replies_to(&client, &alice, chat, question).await;
    assert_eq!(
        replies,
        Vec::<Value>::new(),
        "a cancelled message has no reply"
    );
    let audit = env.audit().await;
    assert_eq!(
        (audit.with_status("cancelled"), audit.stray_replies),
        (vec![question], 0),
        "{audit:?}"
    );
    let counts = events.drain().await;
    assert_eq!(counts.replies.get(&question), None, "{counts:?}");
    report(
        "sigkill_then_stop",
        &[
            ("held_at_kill", held_at_kill.len().to_string()),
            ("stop_status", stop_status.as_u16().to_string()),
            ("taken_over_after_s", secs(taken_over)),
            ("cancelled_after_stop_s", secs(ended_after)),
            ("model_calls", env.fake.requests().len().to_string()),
            ("replies", replies.len().to_string()),
            ("test_s", secs(started.elapsed())),
        ],
    );
    rescuer.kill().await;
    env.finish(api, []).await;
}

/// A duplicate job of a stopped message (its reply saved with `stopped`) and of a cancelled
/// one (stopped while queued), pushed under keys of their own: both acknowledged done, the
/// model not asked, nothing saved or announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_job_of_a_stopped_or_cancelled_message_does_not_reach_the_model() {
    let env = Env::start(slow_long_reply()).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "duplicates").await;
    let socket = WsCollector::start(ws_connect(&api, chat, &alice.token).await);

    // Stopped while no worker runs: cancelled on the spot; its job ends without the model.
    let cancelled = client.send_ok(&alice, chat, "never mind").await;
    let (status, body) = stop(&client, &alice, cancelled).await;
    assert_eq!(
        (status, &body["message"]["status"]),
        (StatusCode::OK, &json!("cancelled"))
    );
    let worker = env.ready_worker(&FLUSH_AT_ONCE).await;
    queue_settled(&env, 1).await;

    let answered = client.send_ok(&alice, chat, "tell me a long story").await;
    wait_for_deltas(&socket, answered, 3).await;
    let (status, stopped) = stop(&client, &alice, answered).await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    assert_eq!(stopped["reply"]["stopped"], true, "{stopped}");
    queue_settled(&env, 2).await;
    let events = env.event_counter().await;

    let queue = JobQueue::new(
        aichat_shared::redis_conn::connect(&env.redis_url)
            .await
            .expect("redis"),
        &Namespace::new(env.ns.clone()),
    );
    for id in [cancelled, answered] {
        let job = CompletionJob::new(id, chat, DEFAULT_CONTEXT, Some("duplicate".into()));
        // A key no earlier job of the message used: a second job, not a de-duplicated push.
        let key = queue.rescue_job_key(id, "duplicate");
        let pushed = queue.enqueue_completion(&job, &key).await.expect("push");
        assert!(pushed, "the duplicate of {id} is queued");
    }
    queue_settled(&env, 4).await;

    let calls = env.fake.requests();
    assert_eq!(
        calls.len(),
        1,
        "only the stopped message's first run: {calls:?}"
    );
    assert_eq!(
        message(&client, &alice, cancelled).await["status"],
        "cancelled"
    );
    assert_eq!(
        message(&client, &alice, answered).await["status"],
        "answered"
    );
    assert_eq!(replies_to(&client, &alice, chat, cancelled).await.len(), 0);
    let replies = replies_to(&client, &alice, chat, answered).await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["id"], stopped["reply"]["id"]);
    let counts = events.drain().await;
    assert!(
        counts.replies.is_empty() && counts.errors.is_empty(),
        "nothing announced again: {counts:?}"
    );
    env.finish(api, [worker]).await;
}
