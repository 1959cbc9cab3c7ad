//! A backlog far larger than one Lua `unpack` can carry: due jobs in apalis-redis' scheduled set
//! (where published apalis-redis puts every push, and retries wait), and the first fetch used
//! to promote them all in one call
//! ("too many results to unpack" above ~8,000), wedging the queue for good (BENCHMARKS.md,
//! finding 1). The vendored apalis-redis promotes them in bounded chunks.
//!
//! The same backlog showed a second cost: taking a job removed its id from the waiting list
//! with `LREM`, which found nothing there (the fetch had already moved it) and so read the
//! whole list — every job paid for the length of the queue behind it (BENCHMARKS.md, finding
//! 14). The drain counts the list scans Redis served.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::common::{MODEL, SYSTEM_PROMPT, TestEnv};
use aichat_fake_llm::FakeConfig;
use aichat_shared::db;
use aichat_shared::db::ai_chats::NewAiChat;
use aichat_shared::db::ai_messages::NewUserMessage;
use aichat_shared::domain::{MessageStatus, Role};
use aichat_shared::jobs::CompletionJob;
use aichat_testkit::DEFAULT_CONTEXT;
use futures::StreamExt;
use redis::AsyncCommands;

/// Well above the ~8,000 values Lua's `unpack` takes.
const BACKLOG: usize = 10_000;
/// Ten messages a chat: short histories keep the per-job work (and the test) small.
const CHATS: usize = 1_000;
/// How long one worker may take to answer the whole backlog (60-80 s on a busy 2-core host).
const DRAIN: Duration = Duration::from_secs(150);
/// No job finished for this long: the queue is stuck.
const STALL: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_ten_thousand_jobs_queued_with_no_worker_is_answered_exactly_once() {
    let env = TestEnv::start(FakeConfig {
        // Every request kept, so the model calls can be counted.
        max_recorded: 2 * BACKLOG,
        ..FakeConfig::default()
    })
    .await;
    let setup_started = Instant::now();
    let alice = env.user("alice").await;

    // Stored and queued as the API does it (message, then job), with no worker
    // running; the database writes go in one transaction each to keep the setup short.
    let options = DEFAULT_CONTEXT;
    let mut tx = env.db.begin().await.expect("begin");
    let mut chats = Vec::with_capacity(CHATS);
    for _ in 0..CHATS {
        let chat = NewAiChat {
            user_id: alice.id,
            title: "backlog",
            system_prompt: SYSTEM_PROMPT,
            related_chat: None,
            model: MODEL,
        };
        chats.push(
            db::ai_chats::insert_ai_chat(&mut *tx, &chat)
                .await
                .expect("insert ai chat"),
        );
    }
    // The API's send statement, as one batch.
    let batch: Vec<NewUserMessage> = (0..BACKLOG)
        .map(|i| NewUserMessage {
            ai_chat_id: chats[i % CHATS],
            user_id: alice.id,
            content: format!("backlog message {i}"),
            options,
            budget: None,
        })
        .collect();
    let sent: Vec<(i64, i64)> = db::ai_messages::insert_owned_user_messages(&mut *tx, &batch)
        .await
        .expect("insert user messages")
        .into_iter()
        .map(|m| {
            let m = m.expect("alice owns the chat");
            (m.ai_chat, m.id)
        })
        .collect();
    tx.commit().await.expect("commit messages");
    futures::stream::iter(&sent)
        .for_each_concurrent(32, |&(chat, id)| {
            let job = CompletionJob::new(id, chat, options, Some("test".into()));
            let queue = &env.queue;
            async move {
                let queued = queue
                    .enqueue_completion(&job, &queue.message_job_key(id))
                    .await
                    .expect("enqueue");
                assert!(queued, "job queued");
            }
        })
        .await;

    // A push puts a due job straight on the waiting list.
    let mut redis = env.redis.clone();
    let waiting: Vec<String> = redis
        .lrange(env.queue_key("active"), 0, -1)
        .await
        .expect("read the waiting list");
    assert_eq!(
        waiting.len(),
        BACKLOG,
        "pushed jobs wait in the active list"
    );
    // The trap this test is about: a backlog in the scheduled set, all due (retries due
    // together, or jobs pushed by apalis-redis as published, which schedules every push).
    let now = chrono::Utc::now().timestamp();
    let mut move_all = redis::pipe();
    move_all.del(env.queue_key("active")).ignore();
    for chunk in waiting.chunks(1_000) {
        let members: Vec<(i64, &String)> = chunk.iter().map(|task| (now, task)).collect();
        move_all
            .zadd_multiple(env.queue_key("scheduled"), &members)
            .ignore();
    }
    let () = move_all
        .query_async(&mut redis)
        .await
        .expect("move the backlog to the scheduled set");
    let scheduled: usize = redis
        .zcard(env.queue_key("scheduled"))
        .await
        .expect("count scheduled jobs");
    assert_eq!(scheduled, BACKLOG, "the backlog waits in the scheduled set");

    let setup = setup_started.elapsed();
    let scans_before = list_scans(&mut redis).await;
    let started = Instant::now();
    let worker = env
        .spawn_worker(&[
            "--worker-concurrency",
            "32",
            // Only the queue may answer these messages: no rescue pushes.
            "--worker-sweep-interval-secs",
            "0",
            // This measures the queue, not the model's rate limits.
            "--rate-limit-rpm",
            "0",
            "--rate-limit-tpm",
            "0",
        ])
        .await;
    let deadline = started + DRAIN;
    let (mut last_done, mut last_progress) = (0, Instant::now());
    let wedged = loop {
        let done: usize = redis
            .scard(env.queue_key("done"))
            .await
            .expect("count done jobs");
        let depth = env.queue.depth().await.expect("queue depth");
        if done >= BACKLOG && depth.dead == 0 {
            break None;
        }
        if done > last_done {
            (last_done, last_progress) = (done, Instant::now());
        }
        let now = Instant::now();
        if depth.dead > 0 || now >= deadline || now - last_progress >= STALL {
            break Some(format!(
                "{done} of {BACKLOG} jobs done after {:?} (queue: {depth:?}): stuck, or jobs died",
                started.elapsed()
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if let Some(failure) = wedged {
        // Ten thousand jobs' keys are worth removing even when the test fails.
        drop(worker);
        env.cleanup().await;
        panic!("{failure}");
    }
    let drained_in = started.elapsed();
    // Counted server-wide: no code of this workspace sends these commands, so another test
    // running meanwhile adds none either.
    let scans = list_scans(&mut redis).await.saturating_sub(scans_before);
    eprintln!("{BACKLOG} jobs answered by one worker in {drained_in:?} (setup took {setup:?})");
    worker.stop().await;

    // Exactly once: every message has one reply and is marked answered, nothing else was
    // written, the model was asked once per message, and no job is left anywhere.
    let depth = env.queue.depth().await.expect("queue depth");
    assert_eq!((depth.waiting, depth.in_flight, depth.dead), (0, 0, 0));
    let done: usize = redis.scard(env.queue_key("done")).await.expect("done");
    assert_eq!(done, BACKLOG);

    let expected: HashMap<i64, HashSet<i64>> =
        sent.iter().fold(HashMap::new(), |mut by_chat, (chat, id)| {
            by_chat.entry(*chat).or_default().insert(*id);
            by_chat
        });
    for chat in &chats {
        let messages = env.messages(*chat).await;
        let users: HashSet<i64> = messages
            .iter()
            .filter(|m| m.role == Role::User)
            .map(|m| {
                assert_eq!(
                    m.status,
                    MessageStatus::Answered,
                    "message {} answered",
                    m.id
                );
                m.id
            })
            .collect();
        assert_eq!(Some(&users), expected.get(chat));
        let replies: Vec<i64> = messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .map(|m| m.reply_to.expect("a reply answers a message"))
            .collect();
        assert_eq!(replies.len(), users.len(), "one reply per message");
        assert_eq!(replies.into_iter().collect::<HashSet<_>>(), users);
    }
    assert_eq!(
        env.fake.requests().len(),
        BACKLOG,
        "one model call per message"
    );
    env.cleanup().await;
    // Checked after the cleanup: ten thousand jobs' keys are removed whatever it says.
    assert_eq!(
        scans, 0,
        "jobs were taken with commands that read the waiting list element by element"
    );
}

/// How many commands that walk a list element by element (`LREM`, `LPOS`, `LINSERT`) Redis
/// has served since it started or its statistics were reset (`INFO commandstats`).
async fn list_scans(redis: &mut redis::aio::ConnectionManager) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .expect("INFO commandstats");
    info.lines()
        .filter(|line| {
            ["cmdstat_lrem:", "cmdstat_lpos:", "cmdstat_linsert:"]
                .iter()
                .any(|name| line.starts_with(name))
        })
        .filter_map(|line| {
            line.split([':', ','])
                .find_map(|field| field.strip_prefix("calls="))
                .and_then(|calls| calls.parse::<u64>().ok())
        })
        .sum()
}
