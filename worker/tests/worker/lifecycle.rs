//! A job's life: queued twice, undecodable, its message deleted, a busy worker's heartbeats,
//! Redis restarting, a graceful stop; a push waking a worker that found the queue empty.

use crate::common::{SYSTEM_PROMPT, TestEnv, WAIT, fake_with_latency};
use aichat_fake_llm::FakeConfig;
use aichat_shared::db;
use aichat_shared::jobs::CompletionJob;
use aichat_shared::keys::Namespace;
use aichat_testkit::{DEFAULT_CONTEXT, PrivateRedis};
use apalis::prelude::TaskBuilder;
use futures::StreamExt;
use redis::AsyncCommands;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_job_queued_twice_is_answered_exactly_once() {
    let env = TestEnv::start(fake_with_latency(300)).await;
    let (chat, mut events) = env.watched_chat().await;
    let sent = env.ask(chat, "only once please").await;
    // The same job again under another de-duplication key, as a re-drive or a relay might.
    let job = CompletionJob::new(sent.id, chat, DEFAULT_CONTEXT, None);
    assert!(
        env.queue
            .enqueue_completion(&job, "redrive:1")
            .await
            .expect("enqueue")
    );
    // Started after both pushes, the worker takes both in one fetch and runs them together.
    let worker = env.spawn_worker(&[]).await;

    env.wait_queue_set("done", 2, WAIT).await;
    events.drain(&env, chat).await;
    assert_eq!(env.fake.requests().len(), 2, "both runs called the model");
    assert_eq!(events.of_type("assistant_message").len(), 1);
    env.assert_answered_once(chat, sent.id).await;

    env.finish([worker]).await;
}

#[tokio::test]
async fn an_undecodable_job_is_killed_and_the_worker_keeps_going() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let worker = env.spawn_worker(&[]).await;
    let config = aichat_shared::jobs::queue_config(&Namespace::new(env.ns.clone()));
    let task = TaskBuilder::new(br#"{"not":"a completion job"}"#.to_vec()).build();
    let mut conn = env.redis.clone();
    apalis_redis::queries::push_tasks(&mut conn, &config, &[task])
        .await
        .expect("push a malformed job");
    env.wait_queue_set("dead", 1, WAIT).await;

    let (chat, mut events) = env.watched_chat().await;
    let sent = env.ask(chat, "still there?").await;
    events.reply_to(sent.id, WAIT).await;

    env.finish([worker]).await;
}

#[tokio::test]
async fn a_deleted_message_ends_its_job_quietly() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let sent = env.ask(chat, "never mind").await;
    db::ai_chats::delete_ai_chat(&env.db, chat, alice.id)
        .await
        .expect("delete chat");
    let worker = env.spawn_worker(&[]).await;
    env.wait_queue_set("done", 1, WAIT).await;
    assert!(env.fake.requests().is_empty());
    assert!(env.queue_set("dead").await.is_empty());
    let _ = sent;
    env.finish([worker]).await;
}

#[tokio::test]
async fn a_busy_worker_keeps_heart_beating_so_its_jobs_are_not_run_twice() {
    let env = TestEnv::start(fake_with_latency(3000)).await;
    let (chat, mut events) = env.watched_chat().await;
    // One job at a time, and each takes longer than the 2 s orphan window.
    let busy = env.spawn_worker(&["--worker-concurrency", "1"]).await;
    env.wait_ready(busy.port).await;
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(env.ask(chat, &format!("slow {i}")).await);
    }
    env.fake.wait_for_requests(1, WAIT).await;
    let idle = env.spawn_worker(&[]).await;

    let ids: Vec<i64> = sent.iter().map(|m| m.id).collect();
    events.replies_to_all(&ids, WAIT).await;
    env.wait_queue_set("done", 3, WAIT).await;
    // Nothing left anywhere in the queue that could still run.
    let mut conn = env.redis.clone();
    let active: usize = redis::AsyncCommands::llen(&mut conn, env.queue_key("active"))
        .await
        .expect("active list");
    assert_eq!(active, 0);
    events.drain(&env, chat).await;
    assert_eq!(
        env.fake.requests().len(),
        3,
        "a job of the busy worker was taken over while it was still alive"
    );
    assert_eq!(events.of_type("assistant_message").len(), 3);

    env.finish([busy, idle]).await;
}

/// A queue consumer that fails and starts again (its Redis connections were cut) leaves the
/// job it was running to finish here, under the failed consumer's name: the process keeps
/// that name registered while the job runs, so no consumer takes the job over after the 2 s
/// orphan window, and the model is asked once.
#[tokio::test]
async fn a_job_running_through_a_consumer_restart_is_not_run_twice() {
    let redis = PrivateRedis::start().await;
    let env = TestEnv::start_with_redis(fake_with_latency(8000), redis.url()).await;
    let worker = env.spawn_worker(&[]).await;
    env.wait_ready(worker.port).await;
    let (chat, mut events) = env.watched_chat().await;
    let sent = env.ask(chat, "through a restart").await;
    env.fake.wait_for_requests(1, WAIT).await;

    // Every plain connection cut (not the subscriptions): the consumer's next poll fails and
    // it starts again, under a name ending its restart count (`test-{pid}-1-…`).
    let workers_set =
        aichat_shared::jobs::queue_config(&Namespace::new(env.ns.clone())).workers_set();
    let mut conn = env.redis.clone();
    let deadline = Instant::now() + WAIT;
    loop {
        let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
            .query_async(&mut conn)
            .await;
        let names: Vec<String> = conn.zrange(&workers_set, 0, -1).await.unwrap_or_default();
        if names
            .iter()
            .any(|n| n.contains(&format!("-{}-1-", std::process::id())))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no consumer restart: {names:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    events.reply_to(sent.id, WAIT).await;
    env.wait_queue_set("done", 1, WAIT).await;
    let active: usize = conn
        .llen(env.queue_key("active"))
        .await
        .expect("active list");
    assert_eq!(active, 0, "a job is queued again");
    assert_eq!(
        env.fake.requests().len(),
        1,
        "the job running through the restart was taken over and run again"
    );
    events.drain(&env, chat).await;
    assert_eq!(events.of_type("assistant_message").len(), 1);
    env.assert_answered_once(chat, sent.id).await;
    env.finish([worker]).await;
    drop(redis);
}

#[tokio::test]
async fn the_worker_comes_back_after_redis_restarts() {
    let mut redis = PrivateRedis::start().await;
    let env = TestEnv::start_with_redis(FakeConfig::default(), redis.url()).await;
    let worker = env.spawn_worker(&[]).await;
    env.wait_ready(worker.port).await;
    let (chat, mut events) = env.watched_chat().await;
    let before = env.ask(chat, "before").await;
    events.reply_to(before.id, WAIT).await;

    redis.stop();
    env.wait_unready(worker.port).await;
    redis.restart().await;
    env.wait_ready(worker.port).await;

    let mut events = env.events(chat).await;
    let after = env.ask(chat, "after").await;
    let reply = events.reply_to(after.id, WAIT).await;
    assert_eq!(reply["message"]["content"], "Echo: after");

    env.finish([worker]).await;
    drop(redis);
}

#[tokio::test]
async fn a_graceful_stop_finishes_the_running_job_first() {
    let env = TestEnv::start(fake_with_latency(1500)).await;
    let worker = env.spawn_worker(&[]).await;
    let (chat, mut events) = env.watched_chat().await;
    let sent = env.ask(chat, "finish me").await;
    env.fake.wait_for_requests(1, WAIT).await;

    worker.stop().await;
    events.reply_to(sent.id, WAIT).await;
    assert_eq!(env.message(chat, sent.id).await.status, "answered");
    assert_eq!(
        env.queue_set("done").await.len(),
        1,
        "acknowledged before exit"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_push_wakes_a_worker_that_found_the_queue_empty() {
    let env = TestEnv::start(FakeConfig::default()).await;
    // Without the wake-up on a push, this worker would look at the queue again only after ten
    // minutes: its poll interval and its heartbeat (apalis also fetches at each heartbeat).
    let worker = env
        .spawn_worker(&[
            "--worker-poll-interval-ms",
            "600000",
            "--worker-heartbeat-secs",
            "600",
        ])
        .await;
    env.wait_ready(worker.port).await;
    let (chat, mut events) = env.watched_chat().await;
    // Each message is sent once the one before is answered and its job acknowledged: the
    // worker looked at the queue again right after taking that job (and after its
    // acknowledgement) and found it empty.
    for round in 1..=3 {
        let sent = env.ask(chat, &format!("round {round}")).await;
        events.reply_to(sent.id, WAIT).await;
        env.wait_queue_set("done", round, WAIT).await;
    }
    env.finish([worker]).await;
}

#[tokio::test]
async fn a_push_behind_a_waiting_job_wakes_nobody() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let channel = Namespace::new(env.ns.clone()).jobs_pushed();
    let client = redis::Client::open(env.redis_url.as_str()).expect("redis client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
    pubsub.subscribe(&channel).await.expect("subscribe");
    let (_sink, mut wakes) = pubsub.split();

    // No worker runs: the first job still waits when the next two are pushed.
    let (chat, _events) = env.watched_chat().await;
    for content in ["first", "second", "third"] {
        env.ask(chat, content).await;
    }
    let mut conn = env.redis.clone();
    let _: usize = conn
        .publish(&channel, "marker")
        .await
        .expect("publish marker");
    let mut before_marker = Vec::new();
    loop {
        let message = tokio::time::timeout(WAIT, wakes.next())
            .await
            .expect("the marker in time")
            .expect("subscription open");
        let payload: String = message.get_payload().expect("text payload");
        if payload == "marker" {
            break;
        }
        before_marker.push(payload);
    }
    assert_eq!(
        before_marker,
        vec![String::new()],
        "only the first push wakes"
    );
    env.cleanup().await;
}
