//! Sends, edits and regenerations racing in one chat: the active path stays one chain after
//! every operation, and every question ends with exactly one reply per regeneration.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aichat_faults::{
    Client, Env, HEAVY, User, deadlocks_in, fake_with_latency, report, secs,
    stop_and_count_deadlocks,
};
use aichat_shared::jobs::{JobQueue, NextJob};
use rand::Rng;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::{
    STILL_WAITING, active_path, all_messages, answered_with_version, chain_problems, tree,
};

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
    let deadlocks = stop_and_count_deadlocks(&env, vec![api], vec![worker]).await - before;

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
