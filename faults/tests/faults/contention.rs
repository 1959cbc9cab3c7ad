//! Contention: many clients on the same rows while workers write. Each scenario ends with the
//! same three checks: no request answered 5xx (nor lost in transport), every message answered
//! 200/202 gets exactly one reply and ends `answered`, and PostgreSQL counted no deadlock in
//! the test's database (`pg_stat_database.deadlocks`, read once every connection to it has
//! closed, since a backend reports its counts when it goes idle or exits).
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aichat_fake_llm::FakeConfig;
use aichat_faults::{
    Api, Audit, Client, Env, HEAVY, InProcessWorker, deadlocks_in, eventually, fake_with_latency,
    report, stop_and_count_deadlocks, with_sweeper,
};
use reqwest::{Method, StatusCode};

use crate::send_load::{Load, Sender, closed_loop};

/// The end of every scenario: waits (at most `settle`) until no message is queued any more,
/// stops the APIs and workers, and counts the deadlocks since `before`; the audit and that count.
async fn settle_and_stop(
    env: &Env,
    settle: Duration,
    apis: Vec<Api>,
    workers: Vec<InProcessWorker>,
    before: i64,
) -> (Audit, i64) {
    let audit = env.settled(settle).await;
    let after = stop_and_count_deadlocks(env, apis, workers).await;
    (audit, after - before)
}

/// The three checks every scenario ends with (see the module's doc): `load` got no 5xx and
/// lost no request, every message of `accepted` is answered exactly once, no deadlock.
fn assert_clean_scenario(load: &Load, audit: &Audit, accepted: &[i64], deadlocks: i64) {
    load.assert_clean();
    audit.assert_answered_once(accepted);
    assert_eq!(deadlocks, 0, "PostgreSQL counted deadlocks");
}

fn no_rate_limits() -> [&'static str; 4] {
    ["--rate-limit-rpm", "0", "--rate-limit-tpm", "0"]
}

/// Sixty-four clients send into **one** AI chat and wait for each reply (`?wait=true`, model
/// 1 s) for 20 s: every send lands in a batch with others to the same chat while replies to
/// that chat are being saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_waiting_on_one_chat_get_no_5xx_and_one_reply_each() {
    let _heavy = HEAVY.lock().await;
    let env = Env::start(fake_with_latency(1000)).await;
    let api = env.api(&["--send-rate-per-minute", "0"]).await;
    let mut flags = vec!["--worker-concurrency", "128"];
    flags.extend(no_rate_limits());
    let worker = env.worker(&flags).await;
    let client = Arc::new(Client::new(&api));
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "busy").await;
    let before = deadlocks_in(&env.db.name).await;

    let senders = vec![
        Sender {
            client: client.clone(),
            user: alice,
            chat,
        };
        64
    ];
    let load = closed_loop(senders, Duration::from_secs(20), usize::MAX, "?wait=true").await;

    let settle = Duration::from_secs(60);
    let (audit, deadlocks) = settle_and_stop(&env, settle, vec![api], vec![worker], before).await;
    report(
        "contention_one_chat",
        &[
            ("requests", load.requests().to_string()),
            ("statuses", format!("{:?}", load.statuses)),
            ("answered", audit.with_status("answered").len().to_string()),
            ("deadlocks", deadlocks.to_string()),
        ],
    );
    assert!(
        load.accepted.len() >= 64,
        "too few sends to mean anything: {:?}",
        load.statuses
    );
    assert_clean_scenario(&load, &audit, &load.accepted, deadlocks);
    env.cleanup().await;
}

/// Sixty-four clients over eight AI chats keep sending while one worker at concurrency 500
/// (model 2 s) drains a backlog into the same chats: batched sends and batched reply saves
/// write to the same chats at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sends_into_eight_chats_while_a_worker_drains_at_concurrency_500_get_no_5xx() {
    let _heavy = HEAVY.lock().await;
    let env = Env::start(fake_with_latency(2000)).await;
    // Eight writers: up to eight batches into the same chats at once, the hardest case.
    let api = env
        .api(&["--send-rate-per-minute", "0", "--send-batch-writers", "8"])
        .await;
    let client = Arc::new(Client::new(&api));
    let alice = client.user("alice").await;
    let chats = client.ai_chats(&alice, 8).await;
    let senders: Vec<Sender> = (0..64)
        .map(|n| Sender {
            client: client.clone(),
            user: alice.clone(),
            chat: chats[n % chats.len()],
        })
        .collect();
    let before = deadlocks_in(&env.db.name).await;

    // The backlog the worker starts on: 8 sends from each client.
    let backlog = closed_loop(senders.clone(), Duration::from_secs(60), 8, "").await;
    backlog.assert_clean();
    let mut flags = vec!["--worker-concurrency", "500"];
    flags.extend(no_rate_limits());
    let worker = env.worker(&flags).await;
    // Its first replies are being saved while the clients go on sending.
    eventually(
        Duration::from_secs(30),
        "the worker's first replies",
        || async {
            let audit = env.audit().await;
            (!audit.with_status("answered").is_empty()).then_some(())
        },
    )
    .await;
    let load = closed_loop(senders, Duration::from_secs(10), 32, "").await;

    let settle = Duration::from_secs(120);
    let (audit, deadlocks) = settle_and_stop(&env, settle, vec![api], vec![worker], before).await;
    report(
        "contention_draining_worker",
        &[
            ("backlog", backlog.accepted.len().to_string()),
            ("requests", load.requests().to_string()),
            ("statuses", format!("{:?}", load.statuses)),
            ("deadlocks", deadlocks.to_string()),
        ],
    );
    let mut accepted = backlog.accepted;
    accepted.extend(&load.accepted);
    assert_clean_scenario(&load, &audit, &accepted, deadlocks);
    env.cleanup().await;
}

/// Two APIs and two workers; 256 clients, each in an AI chat of its own, half on each API,
/// wait for their replies, while staff page through every message and both workers' sweepers
/// look for lost jobs every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_apis_and_two_workers_with_256_clients_staff_reads_and_sweeps_get_no_5xx() {
    let _heavy = HEAVY.lock().await;
    let env = Env::start(fake_with_latency(500)).await;
    let apis = [
        env.api(&["--send-rate-per-minute", "0"]).await,
        env.api(&["--send-rate-per-minute", "0"]).await,
    ];
    let clients = [
        Arc::new(Client::new(&apis[0])),
        Arc::new(Client::new(&apis[1])),
    ];
    // Sixteen accounts with sixteen chats each: 256 chats, none shared.
    let mut senders = Vec::new();
    for u in 0..16 {
        let client = &clients[u % 2];
        let user = client.user(&format!("user{u}")).await;
        for c in 0..16 {
            senders.push(Sender {
                client: clients[(u * 16 + c) % 2].clone(),
                user: user.clone(),
                chat: client.ai_chat(&user, &format!("chat {c}")).await,
            });
        }
    }
    let staff = clients[0].staff(&env, "staff").await;
    let mut flags = with_sweeper("1", "1", &["--worker-concurrency", "256"]);
    flags.extend(no_rate_limits());
    let workers = [env.worker(&flags).await, env.worker(&flags).await];
    let before = deadlocks_in(&env.db.name).await;

    let run_for = Duration::from_secs(15);
    let readers: Vec<_> = (0..4)
        .map(|n| {
            let client = clients[n % 2].clone();
            let token = staff.token.clone();
            tokio::spawn(async move {
                let deadline = Instant::now() + run_for;
                let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
                while Instant::now() < deadline {
                    let answer = client
                        .try_call(
                            Method::GET,
                            "/api/admin/messages/?limit=200",
                            Some(&token),
                            None,
                            &[],
                        )
                        .await;
                    let status = answer.map_or(0, |a| a.status.as_u16());
                    *statuses.entry(status).or_default() += 1;
                }
                statuses
            })
        })
        .collect();
    let load = closed_loop(senders, run_for, usize::MAX, "?wait=true").await;
    let mut reads: BTreeMap<u16, usize> = BTreeMap::new();
    for reader in readers {
        for (status, n) in reader.await.expect("reader task") {
            *reads.entry(status).or_default() += n;
        }
    }

    let settle = Duration::from_secs(60);
    let (audit, deadlocks) =
        settle_and_stop(&env, settle, apis.into(), workers.into(), before).await;
    report(
        "contention_two_apis_two_workers",
        &[
            ("requests", load.requests().to_string()),
            ("statuses", format!("{:?}", load.statuses)),
            ("staff_reads", format!("{reads:?}")),
            ("deadlocks", deadlocks.to_string()),
        ],
    );
    assert_eq!(
        reads.keys().copied().collect::<Vec<_>>(),
        [200],
        "staff reads: {reads:?}"
    );
    assert_clean_scenario(&load, &audit, &load.accepted, deadlocks);
    env.cleanup().await;
}

/// What PostgreSQL asks to retry is retried: a trigger of this test's database aborts chosen
/// writes with a real `40P01` (deadlock detected). A send aborted twice is stored on its third
/// try (202); a send aborted every time gets 503 with `Retry-After` while the sends batched
/// with it are stored; a reply aborted twice is saved once; each retry is counted by path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicts_are_retried_and_a_send_that_cannot_be_stored_fails_alone_with_503() {
    const SCRAPER: &str = "contention-scraper-token";
    let _heavy = HEAVY.lock().await;
    let env = Env::start(FakeConfig::default()).await;
    for statement in [
        "create sequence flaky_send_attempts",
        "create sequence reply_attempts",
        r#"create function abort_planned_writes() returns trigger language plpgsql as $$
           begin
               if new.content = 'doomed'
                  or (new.content = 'flaky' and nextval('flaky_send_attempts') <= 2)
                  or (new.role = 'assistant' and nextval('reply_attempts') <= 2) then
                   raise exception 'planned conflict' using errcode = '40P01';
               end if;
               return new;
           end $$"#,
        "create trigger abort_planned_writes before insert on ai_messages
         for each row execute function abort_planned_writes()",
    ] {
        sqlx::query(statement)
            .execute(&env.pool)
            .await
            .expect("plant the conflicts");
    }
    let api = env
        .api(&[
            "--send-rate-per-minute",
            "0",
            "--send-batch-writers",
            "1",
            "--metrics-token",
            SCRAPER,
        ])
        .await;
    let client = Arc::new(Client::new(&api));
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "planned").await;
    // The API's conflict retries on `paths`, summed (a path not retried yet counts 0).
    let retries = |paths: [&'static str; 2]| {
        let client = client.clone();
        async move {
            let text = client.metrics(SCRAPER).await;
            let count = |path: &str| {
                let series = format!("aichat_db_conflict_retries_total{{path=\"{path}\"}} ");
                text.lines()
                    .find_map(|line| line.strip_prefix(&series)?.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            paths.map(count).iter().sum::<f64>()
        }
    };
    let send_paths = ["send_batch", "send"];
    let reply_paths = ["reply_batch", "reply"];
    let before = retries(send_paths).await;
    let reply_before = retries(reply_paths).await;

    // Twenty sends at once through one writer, so they are stored in batches.
    let contents: Vec<String> = (0..18)
        .map(|n| format!("neighbour {n}"))
        .chain(["flaky".to_owned(), "doomed".to_owned()])
        .collect();
    let sends = contents
        .iter()
        .map(|content| client.send(&alice, chat, content));
    let answers = futures::future::join_all(sends).await;
    let mut accepted = Vec::new();
    for (content, answer) in contents.iter().zip(answers) {
        let answer = answer.expect("an answer");
        if content == "doomed" {
            assert_eq!(
                answer.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{}",
                answer.body
            );
            assert!(answer.body["error"].is_string(), "{}", answer.body);
            assert_eq!(answer.retry_after.as_deref(), Some("1"));
        } else {
            assert_eq!(
                answer.status,
                StatusCode::ACCEPTED,
                "{content}: {}",
                answer.body
            );
            accepted.extend(answer.body["message"]["id"].as_i64());
        }
    }
    let after = retries(send_paths).await;
    assert!(
        after - before >= 2.0,
        "send conflicts retried: {before} → {after}"
    );

    let worker = env.worker(&no_rate_limits()).await;
    let audit = env.settled(Duration::from_secs(60)).await;
    audit.assert_answered_once(&accepted);
    let reply_after = retries(reply_paths).await;
    assert!(
        reply_after - reply_before >= 2.0,
        "reply conflicts retried: {reply_before} → {reply_after}"
    );
    env.finish(api, [worker]).await;
}
