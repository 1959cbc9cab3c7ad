//! Faults 1 and 2: worker processes killed without warning (SIGKILL) or asked to stop
//! (SIGTERM) while they hold jobs. Every message must end answered exactly once.
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use aichat_fake_llm::{FakeConfig, Outcome};
use aichat_faults::{
    Client, Env, HEAVY, WorkerProcess, WsCollector, epoch_now, fake_with_latency, one_decimal,
    quantile, report, secs, wait_worker_ready, worker_metric, worker_metrics_text, ws_connect,
};
use futures::StreamExt;
use rand::Rng;

const WORKER: &str = env!("CARGO_BIN_EXE_faults-worker");

/// 200 messages over 20 chats, 2 s of model latency each, two worker processes of 16 jobs in
/// flight; twice, one of them (at random) is SIGKILLed at a random moment and started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_workers_lose_and_duplicate_no_message() {
    const MESSAGES: usize = 200;
    const CHATS: usize = 20;
    let _heavy = HEAVY.lock().await;
    let env = Env::start(fake_with_latency(2000)).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let events = env.event_counter().await;
    let flags = ["--worker-concurrency", "16"];
    let mut workers = vec![
        env.ready_worker_process(WORKER, &flags).await,
        env.ready_worker_process(WORKER, &flags).await,
    ];
    let mut chats = Vec::new();
    for u in 0..4 {
        let user = client.user(&format!("user{u}")).await;
        for chat in client.ai_chats(&user, CHATS / 4).await {
            chats.push((user.clone(), chat));
        }
    }

    let started = Instant::now();
    // Senders: 4 at a time, round-robin over the chats, every send must be accepted.
    let sender = {
        let base = api.base.clone();
        let chats = chats.clone();
        tokio::spawn(async move {
            let client = Client::for_base(&base, Duration::from_secs(30));
            let client = &client;
            let sends = (0..MESSAGES).map(|i| {
                let (user, chat) = chats[i % chats.len()].clone();
                async move { client.send_ok(&user, chat, &format!("message {i}")).await }
            });
            futures::stream::iter(sends)
                .buffer_unordered(4)
                .collect::<Vec<i64>>()
                .await
        })
    };

    let mut kills = Vec::new();
    for _ in 0..2 {
        let pause = rand::rng().random_range(1500..4000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let victim = rand::rng().random_range(0..workers.len());
        let held = env.held_by_pid(workers[victim].pid).await;
        workers[victim].sigkill();
        let killed_epoch = epoch_now();
        let taken_over = env.watch_takeover(workers[victim].pid);
        workers[victim]
            .wait(Duration::from_secs(10))
            .await
            .expect("the killed worker is gone");
        workers[victim] = env.worker_process(WORKER, &flags);
        kills.push((held, killed_epoch, taken_over));
    }
    let ids = sender.await.expect("sender");
    assert_eq!(ids.len(), MESSAGES);

    let audit = env.settled(Duration::from_secs(120)).await;
    let all_answered = started.elapsed();
    audit.assert_answered_once(&ids);
    let counts = events.drain().await;
    // How long the jobs a killed worker held took to be answered by the others.
    let mut recoveries = Vec::new();
    for (held, killed_epoch, taken_over) in kills {
        let taken_over = taken_over
            .await
            .expect("watcher")
            .map(|d| format!("{}s", secs(d)))
            .unwrap_or_else(|| "never".into());
        let last = env.last_reply_to(&held, killed_epoch).await.unwrap_or(-1.0);
        recoveries.push(format!(
            "{} held, back in the queue after {taken_over}, last answered after {last:.1}s",
            held.len()
        ));
    }
    let delays = env.reply_delays().await;
    let calls = env.fake.requests().len();
    report(
        "sigkill",
        &[
            ("messages", MESSAGES.to_string()),
            ("kills", format!("{recoveries:?}")),
            ("lost", audit.not_answered_once(&ids).len().to_string()),
            ("duplicated", audit.duplicated().len().to_string()),
            (
                "replies_announced_twice",
                counts.announced_twice().len().to_string(),
            ),
            (
                "replies_never_announced",
                counts.never_announced(&ids).len().to_string(),
            ),
            ("model_calls", calls.to_string()),
            ("all_answered_after_s", secs(all_answered)),
            ("reply_delay_p50_s", one_decimal(quantile(&delays, 0.5))),
            ("reply_delay_max_s", one_decimal(quantile(&delays, 1.0))),
        ],
    );
    // A reply saved by a worker killed before it announced it is announced by the run that
    // takes the job over.
    counts.assert_announced_once(&ids);
    for worker in &mut workers {
        worker.kill().await;
    }
    env.finish(api, []).await;
}

/// A worker dies right after committing a reply, before publishing it (the fault binary aborts
/// there). A socket open throughout still gets that reply's `assistant_message`, exactly once:
/// the run that takes the job over finds the message answered and the announcement pending.
/// No announcement marker is left in Redis afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_saved_by_a_worker_that_died_before_announcing_it_is_announced_once() {
    let _heavy = HEAVY.lock().await;
    let env = Env::start(FakeConfig::default()).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "one").await;
    let socket = WsCollector::start(ws_connect(&api, chat, &alice.token).await);

    let mut dying = env.worker_process_env(WORKER, &[], &[("FAULTS_DIE_AFTER_SAVE", "1")]);
    wait_worker_ready(dying.port, Duration::from_secs(30)).await;
    let first = client.send_ok(&alice, chat, "first").await;
    let status = dying
        .wait(Duration::from_secs(30))
        .await
        .expect("the worker dies after saving its first reply");
    assert!(!status.success(), "{status:?}");
    let audit = env.audit().await;
    assert_eq!(audit.not_answered_once(&[first]), Vec::<i64>::new());
    assert_eq!(
        socket.replies().get(&first),
        None,
        "announced before the death"
    );

    let mut healthy = env.ready_worker_process(WORKER, &[]).await;
    let limit = Duration::from_secs(30);
    socket
        .reply_to(first, limit, "the saved reply announced")
        .await;
    // Events of one chat arrive in order: once a later reply is in, any second announcement
    // of the first would be too.
    let second = client.send_ok(&alice, chat, "second").await;
    socket
        .reply_to(second, limit, "the next reply announced")
        .await;
    let replies = socket.replies();
    assert_eq!(replies.get(&first), Some(&1), "{:?}", socket.events());
    assert_eq!(replies.get(&second), Some(&1), "{:?}", socket.events());
    assert_eq!(
        worker_metric(healthy.port, "aichat_worker_late_announcements_total").await,
        1.0
    );
    let mut redis = env.redis().await;
    let markers: Vec<String> = redis::AsyncCommands::keys(
        &mut redis,
        aichat_shared::keys::Namespace::new(env.ns.clone()).all_pending_announcements(),
    )
    .await
    .expect("keys");
    assert_eq!(markers, Vec::<String>::new());

    healthy.kill().await;
    env.finish(api, []).await;
}

/// Model calls made with `key` (each worker gets its own API key, so calls tell who made them).
fn calls_by(env: &Env, key: &str) -> usize {
    env.fake
        .requests()
        .iter()
        .filter(|r| r.api_key.as_deref() == Some(key))
        .count()
}

/// The worker process a SIGTERM test stops: `grace_secs` of shutdown grace, its model calls
/// made with the API key `stopping`, `extra` flags; ready to take jobs.
async fn stopping_worker(env: &Env, grace_secs: u64, extra: &[&str]) -> WorkerProcess {
    let grace = grace_secs.to_string();
    let mut flags = vec![
        "--worker-shutdown-grace-secs",
        &grace,
        "--openai-api-key",
        "stopping",
    ];
    flags.extend_from_slice(extra);
    env.ready_worker_process(WORKER, &flags).await
}

/// Waits for `worker`, sent SIGTERM at `signalled`, to exit (at most its grace and 10 s more)
/// and insists on status 0; the status, and how long after the signal it came.
async fn exits_cleanly(
    worker: &mut WorkerProcess,
    signalled: Instant,
    grace_secs: u64,
) -> (ExitStatus, Duration) {
    let status = worker
        .wait(Duration::from_secs(grace_secs + 10))
        .await
        .expect("the worker exits after SIGTERM");
    let exited_after = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}");
    (status, exited_after)
}

/// SIGTERM while 8 jobs are in flight, with a second worker running: the stopping worker takes
/// no new job, keeps its registration alive so the other one does not take its jobs over
/// (the orphan window is 2 s, the jobs take 4 s), finishes the 8, settles them and exits 0
/// long before its grace period ends. The messages sent after the signal go to the other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_running_jobs_takes_no_new_ones_and_exits_zero() {
    const LATENCY: Duration = Duration::from_secs(4);
    const GRACE_SECS: u64 = 10;
    let _heavy = HEAVY.lock().await;
    let env = Env::start(fake_with_latency(LATENCY.as_millis() as u64)).await;
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let events = env.event_counter().await;
    let mut worker = stopping_worker(&env, GRACE_SECS, &["--worker-concurrency", "8"]).await;
    let alice = client.user("alice").await;
    let chats = client.ai_chats(&alice, 2).await;
    let before = client.send_round(&alice, &chats, "before", 8).await;
    env.fake.wait_for_requests(8, Duration::from_secs(20)).await;
    let other = env.ready_worker(&["--openai-api-key", "other"]).await;

    worker.sigterm();
    let signalled = Instant::now();
    let after = client.send_round(&alice, &chats, "after", 8).await;
    let (status, exited_after) = exits_cleanly(&mut worker, signalled, GRACE_SECS).await;
    let audit = env.audit().await;
    assert!(
        audit.not_answered_once(&before).is_empty(),
        "in-flight jobs not finished before the exit: {:?}",
        audit.messages
    );
    assert!(
        exited_after < LATENCY + Duration::from_secs(3),
        "it should exit once its jobs are done, not at the end of the grace: {exited_after:?}"
    );
    let snapshot = env.queue_snapshot().await;
    assert_eq!(
        snapshot.in_flight.len(),
        1,
        "the stopped worker left the workers set: {snapshot:?}"
    );

    let audit = env.settled(Duration::from_secs(30)).await;
    let all: Vec<i64> = before.iter().chain(&after).copied().collect();
    audit.assert_answered_once(&all);
    events.drain().await.assert_announced_once(&all);
    let (stopping_calls, other_calls) = (calls_by(&env, "stopping"), calls_by(&env, "other"));
    report(
        "sigterm_graceful",
        &[
            ("in_flight_at_sigterm", "8".into()),
            ("sent_after_sigterm", "8".into()),
            ("exit_code", format!("{:?}", status.code())),
            ("exited_after_s", secs(exited_after)),
            ("grace_s", GRACE_SECS.to_string()),
            ("lost", audit.not_answered_once(&all).len().to_string()),
            ("duplicated", audit.duplicated().len().to_string()),
            ("model_calls_stopping_worker", stopping_calls.to_string()),
            ("model_calls_other_worker", other_calls.to_string()),
        ],
    );
    assert_eq!(
        stopping_calls, 8,
        "the stopping worker made no call after SIGTERM"
    );
    assert_eq!(
        other_calls, 8,
        "the other worker re-ran none of the stopping one's jobs"
    );
    env.finish(api, [other]).await;
}

/// SIGTERM while 4 jobs wait on a model that will not answer within the grace period: the
/// worker exits 0 when the grace ends and hands the 4 jobs back at once, so another worker
/// answers them without waiting for the orphan window (here 5 s × 2 = 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_back_jobs_it_cannot_finish_within_the_grace() {
    const GRACE_SECS: u64 = 2;
    let _heavy = HEAVY.lock().await;
    let env = Env::start(FakeConfig::default()).await;
    // The first four calls would take a minute; every later one answers at once.
    env.fake
        .push_script(vec![Outcome::Slow { latency_ms: 60_000 }; 4]);
    let (api, client) = env.api_client(&["--send-rate-per-minute", "0"]).await;
    let events = env.event_counter().await;
    let slow_heartbeats = [
        "--worker-heartbeat-secs",
        "5",
        "--worker-missed-heartbeats",
        "2",
    ];
    let mut worker = stopping_worker(&env, GRACE_SECS, &slow_heartbeats).await;
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "slow").await;
    let ids = client.send_round(&alice, &[chat], "slow", 4).await;
    env.fake.wait_for_requests(4, Duration::from_secs(20)).await;
    let mut rescuer_flags = slow_heartbeats.to_vec();
    rescuer_flags.extend(["--openai-api-key", "other"]);
    let rescuer = env.ready_worker(&rescuer_flags).await;

    worker.sigterm();
    let signalled = Instant::now();
    let (status, exited_after) = exits_cleanly(&mut worker, signalled, GRACE_SECS).await;
    let audit = env.settled(Duration::from_secs(30)).await;
    let answered_after = signalled.elapsed();
    audit.assert_answered_once(&ids);
    let counts = events.drain().await;
    assert!(counts.announced_twice().is_empty());
    let calls = env.fake.requests().len();
    report(
        "sigterm_handback",
        &[
            ("in_flight_at_sigterm", "4".into()),
            ("grace_s", GRACE_SECS.to_string()),
            ("exit_code", format!("{:?}", status.code())),
            ("exited_after_s", secs(exited_after)),
            ("all_answered_after_s", secs(answered_after)),
            ("orphan_window_s", "10".into()),
            ("lost", "0".into()),
            ("duplicated", "0".into()),
            ("model_calls", calls.to_string()),
        ],
    );
    assert!(
        answered_after < Duration::from_secs(GRACE_SECS + 6),
        "handed-back jobs answered {answered_after:?} after SIGTERM: they waited for the \
         orphan window instead of going back to the queue when the worker stopped"
    );
    assert_eq!(calls_by(&env, "stopping"), 4, "4 abandoned calls");
    assert_eq!(calls_by(&env, "other"), 4, "4 answered by the other worker");
    env.finish(api, [rescuer]).await;
}

/// The first scrape of a worker process that has run no job lists every metric with its
/// `# HELP` and `# TYPE`, counters at 0: an alert on a rate or on absence works from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_lists_every_metric_at_zero_on_its_first_scrape() {
    let env = Env::start(FakeConfig::default()).await;
    let worker = env.ready_worker_process(WORKER, &[]).await;
    let text = worker_metrics_text(worker.port).await;
    for (name, kind) in [
        ("aichat_worker_jobs_started_total", "counter"),
        ("aichat_worker_jobs_succeeded_total", "counter"),
        ("aichat_worker_jobs_failed_total", "counter"),
        ("aichat_worker_jobs_skipped_total", "counter"),
        ("aichat_worker_jobs_requeued_total", "counter"),
        ("aichat_worker_job_duration_seconds", "histogram"),
        ("aichat_worker_model_latency_seconds", "histogram"),
        ("aichat_worker_model_retries_total", "counter"),
        ("aichat_worker_rate_limit_waits_total", "counter"),
        ("aichat_worker_rate_limit_wait_seconds", "histogram"),
        ("aichat_worker_tokens_total", "counter"),
        ("aichat_worker_duplicate_replies_total", "counter"),
        ("aichat_worker_restarts_total", "counter"),
        ("aichat_worker_db_retries_total", "counter"),
        ("aichat_worker_swept_messages_total", "counter"),
        ("aichat_worker_reply_batch_size", "summary"),
        ("aichat_worker_claim_batch_size", "summary"),
        ("aichat_db_conflict_retries_total", "counter"),
    ] {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no help for {name} in:\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "no {kind} type for {name} in:\n{text}"
        );
    }
    for series in [
        "aichat_worker_jobs_started_total 0",
        "aichat_worker_jobs_failed_total{reason=\"model\"} 0",
        "aichat_db_conflict_retries_total{path=\"reply_batch\"} 0",
        "aichat_worker_tokens_total{model=\"gpt-test\",kind=\"prompt\"} 0",
    ] {
        assert!(
            text.lines().any(|line| line == series),
            "no `{series}` in:\n{text}"
        );
    }
    drop(worker);
    env.cleanup().await;
}
