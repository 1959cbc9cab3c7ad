//! How the fault tests load the API with sends: a steady stream at a fixed rate whatever the
//! answers (open loop, for outages: a slow answer never delays the next send), and clients
//! that each send, wait for the answer and send again (closed loop, for contention).
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aichat_faults::{Api, Client, User};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// Open loop: a steady stream of sends

/// What one send came to.
#[derive(Debug, Clone)]
pub struct Sent {
    /// When it started, from the start of the load.
    pub at: Duration,
    pub took: Duration,
    pub outcome: Result<(StatusCode, Value), String>,
}

impl Sent {
    pub fn accepted_id(&self) -> Option<i64> {
        match &self.outcome {
            Ok((StatusCode::ACCEPTED, body)) => body["message"]["id"].as_i64(),
            _ => None,
        }
    }

    fn label(&self) -> String {
        match &self.outcome {
            Ok((status, _)) => status.as_u16().to_string(),
            Err(err) => err.clone(),
        }
    }
}

/// How often the steady load sends.
const EVERY: Duration = Duration::from_millis(100);

/// Starts sending one message every [`EVERY`] as `user` through `api`, `count` sends,
/// round-robin over `chats`, each on its own task (a slow answer never delays the next send;
/// one slower than `timeout` counts as timed out); the task answers every outcome.
pub fn steady_load(
    api: &Api,
    user: &User,
    chats: &[i64],
    count: usize,
    timeout: Duration,
) -> JoinHandle<Vec<Sent>> {
    let client = Arc::new(Client::for_base(&api.base, timeout));
    let (user, chats) = (user.clone(), chats.to_vec());
    tokio::spawn(async move {
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(count);
        let mut tick = tokio::time::interval(EVERY);
        for i in 0..count {
            tick.tick().await;
            let (client, user) = (client.clone(), user.clone());
            let chat = chats[i % chats.len()];
            tasks.push(tokio::spawn(async move {
                let at = started.elapsed();
                let begun = Instant::now();
                let outcome = client
                    .send(&user, chat, &format!("load {i}"))
                    .await
                    .map(|a| (a.status, a.body));
                Sent {
                    at,
                    took: begun.elapsed(),
                    outcome,
                }
            }));
        }
        let mut sent = Vec::with_capacity(count);
        for task in tasks {
            sent.push(task.await.expect("send task"));
        }
        sent
    })
}

/// What the sends of a load came to.
pub struct Tally<'a> {
    /// How many sends got each status (or transport error).
    pub by_status: BTreeMap<String, usize>,
    /// The ids of the messages accepted (202).
    pub accepted: Vec<i64>,
    pub slowest: Duration,
    /// Sends answered with neither 202 nor 503, or not answered at all: an outage must
    /// never show as a 500 or a hang.
    pub unexpected: Vec<&'a Sent>,
}

impl Tally<'_> {
    /// Every send was answered, and only with 202 or 503.
    pub fn assert_202_or_503(&self) {
        let (by_status, unexpected) = (&self.by_status, &self.unexpected);
        assert!(unexpected.is_empty(), "{by_status:?}: {unexpected:?}");
    }
}

pub fn tally(sent: &[Sent]) -> Tally<'_> {
    let mut by_status = BTreeMap::new();
    for s in sent {
        *by_status.entry(s.label()).or_default() += 1;
    }
    Tally {
        by_status,
        accepted: sent.iter().filter_map(Sent::accepted_id).collect(),
        slowest: sent.iter().map(|s| s.took).max().unwrap_or_default(),
        unexpected: sent
            .iter()
            .filter(|s| {
                !matches!(
                    &s.outcome,
                    Ok((StatusCode::ACCEPTED | StatusCode::SERVICE_UNAVAILABLE, _))
                )
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Closed loop: each client sends, waits, sends again

/// What a closed loop of clients saw.
#[derive(Debug, Default)]
pub struct Load {
    /// Answers by status code.
    pub statuses: BTreeMap<u16, usize>,
    /// Requests that got no answer at all (timeout, connection refused or reset).
    pub transport_errors: Vec<String>,
    /// Ids of the user messages the API accepted (200 with their reply, or 202).
    pub accepted: Vec<i64>,
}

impl Load {
    fn merge(&mut self, other: Load) {
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.transport_errors.extend(other.transport_errors);
        self.accepted.extend(other.accepted);
    }

    fn server_errors(&self) -> usize {
        self.statuses
            .iter()
            .filter(|(status, _)| **status >= 500)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn requests(&self) -> usize {
        self.statuses.values().sum::<usize>() + self.transport_errors.len()
    }

    pub fn assert_clean(&self) {
        assert_eq!(self.server_errors(), 0, "5xx answers: {:?}", self.statuses);
        assert!(
            self.transport_errors.is_empty(),
            "{} request(s) got no answer: {:?}",
            self.transport_errors.len(),
            &self.transport_errors[..self.transport_errors.len().min(5)]
        );
        let refused: usize = self
            .statuses
            .iter()
            .filter(|(status, _)| !matches!(**status, 200 | 202))
            .map(|(_, n)| n)
            .sum();
        assert_eq!(refused, 0, "sends not accepted: {:?}", self.statuses);
    }
}

/// One client of the loop: who sends, into which chat, through which API.
#[derive(Clone)]
pub struct Sender {
    pub client: Arc<Client>,
    pub user: User,
    pub chat: i64,
}

/// Each sender sends, waits for the answer and sends again, until `run_for` has passed
/// (`sends`: at most that many each). `query` is appended to `send_message/`.
pub async fn closed_loop(
    senders: Vec<Sender>,
    run_for: Duration,
    sends: usize,
    query: &'static str,
) -> Load {
    let deadline = Instant::now() + run_for;
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(n, sender)| {
            tokio::spawn(async move {
                let mut load = Load::default();
                let path = format!("/api/ai/chats/{}/send_message/{query}", sender.chat);
                for i in 0..sends {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let content = json!({"content": format!("client {n} message {i}")});
                    let answer = sender
                        .client
                        .try_call(
                            Method::POST,
                            &path,
                            Some(&sender.user.token),
                            Some(content),
                            &[],
                        )
                        .await;
                    match answer {
                        Ok(answer) => {
                            *load.statuses.entry(answer.status.as_u16()).or_default() += 1;
                            let id = match answer.status {
                                StatusCode::OK => answer.body["reply_to"].as_i64(),
                                StatusCode::ACCEPTED => answer.body["message"]["id"].as_i64(),
                                _ => None,
                            };
                            load.accepted.extend(id);
                        }
                        Err(err) => load.transport_errors.push(err.to_string()),
                    }
                }
                load
            })
        })
        .collect();
    let mut load = Load::default();
    for task in tasks {
        load.merge(task.await.expect("client task"));
    }
    load
}
