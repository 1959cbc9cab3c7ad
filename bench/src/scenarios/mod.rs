//! The scenarios. Each starts its own stack of children under its own namespace, seeds its
//! own users and chats, measures, and adds rows (figure, baseline, ratio, target) to the report.
use std::sync::Arc;
use std::time::Duration;

use crate::env::Env;
use crate::report::{CpuRow, Report, Row};
use crate::seed::Account;

pub mod concurrency;
pub mod fanout;
pub mod ingest;
pub mod pipeline;
pub mod reads;
pub mod soak;
pub mod wait;

pub const ALL: [&str; 7] = [
    "ingest",
    "pipeline",
    "wait",
    "concurrency",
    "fanout",
    "reads",
    "soak",
];

/// Sizes and durations of a run.
#[derive(Debug, Clone)]
pub struct Opts {
    pub quick: bool,
    /// Length of each measured phase.
    pub secs: u64,
    pub soak_secs: u64,
    pub fanout_clients: usize,
    pub fanout_chats: usize,
    pub fanout_rate: u64,
    pub concurrency_jobs: u64,
    pub concurrency: u32,
}

impl Opts {
    pub fn new(
        quick: bool,
        soak_minutes: Option<f64>,
        fanout_clients: Option<usize>,
        fanout_chats: Option<usize>,
    ) -> Self {
        let soak_secs = match (quick, soak_minutes) {
            (_, Some(m)) => (m * 60.0).round().max(5.0) as u64,
            (true, None) => 20,
            // The worker's memory warms up for ~9 minutes: the second half must start after it.
            (false, None) => 960,
        };
        let fanout_clients = fanout_clients.unwrap_or(if quick { 500 } else { 10_000 });
        Opts {
            quick,
            secs: if quick { 4 } else { 20 },
            soak_secs,
            fanout_clients,
            // An AI chat is private: by default each socket watches a chat of its own, so an
            // event is one frame. `--fanout-chats 100` is the broadcast stress (each event to
            // ~100 sockets, 100 frames per event).
            fanout_chats: fanout_chats
                .unwrap_or(fanout_clients)
                .clamp(1, fanout_clients.max(1)),
            fanout_rate: if quick { 200 } else { 1000 },
            concurrency_jobs: if quick { 1000 } else { 3000 },
            concurrency: 500,
        }
    }

    pub fn warmup(&self) -> Duration {
        Duration::from_secs(if self.quick { 1 } else { 2 })
    }
}

/// Everything the scenarios share.
pub struct Ctx {
    pub env: Env,
    pub opts: Opts,
    pub report: Report,
    /// Ingest rate of this run (the pipeline's baseline).
    pub ingest_rps: Option<f64>,
    /// pgbench single-row inserts per second with 64 clients, measured in this run (the
    /// baseline of the ingest scenario, and of the ingest during the concurrency drain).
    pub pgbench_insert_tps: Option<f64>,
}

impl Ctx {
    pub fn cpu(&mut self, scenario: &str, usage: Vec<(String, f64)>) {
        let text: Vec<String> = usage.iter().map(|(n, p)| format!("{n} {p:.0}%")).collect();
        eprintln!("  cpu [{scenario}]: {}", text.join(", "));
        self.report.cpu.push(CpuRow {
            scenario: scenario.to_owned(),
            usage,
        });
    }
}

/// The `errors` row of `scenario` (target 0), then, if there were any, a note with the first.
pub fn push_errors(rep: &mut Report, scenario: &str, errors: u64, first_errors: &[String]) {
    rep.push(Row::new(scenario, "errors", errors as f64, "").target("0", errors == 0));
    if !first_errors.is_empty() {
        rep.note(format!("{scenario} errors: {first_errors:?}"));
    }
}

/// `POST send_message` of `content` into `chat`, as the holder of `token`.
pub async fn post_send(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    chat: i64,
    content: String,
) -> reqwest::Result<reqwest::Response> {
    http.post(format!("{api}/api/ai/chats/{chat}/send_message/"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "content": content }))
        .send()
        .await
}

/// What a send came to: on 202, the id of the stored message (`None` if the body does not
/// say); otherwise the error as the scenarios report it, a non-2xx status counted.
pub async fn accepted_id(resp: reqwest::Result<reqwest::Response>) -> Result<Option<i64>, String> {
    match resp {
        Ok(r) if r.status().as_u16() == 202 => Ok(r
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["message"]["id"].as_i64())),
        Ok(r) => {
            crate::load::count_status(r.status().as_u16());
            Err(format!("send: HTTP {}", r.status()))
        }
        Err(e) => Err(format!("send: {e}")),
    }
}

/// `POST send_message` from `clients` closed-loop clients spread over the accounts' chats.
pub async fn send_load(
    label: &str,
    http: &reqwest::Client,
    api: &str,
    accounts: &Arc<Vec<Account>>,
    clients: usize,
    duration: Duration,
    max_ops: u64,
) -> crate::load::LoadResult {
    let http = http.clone();
    let api: Arc<str> = Arc::from(api);
    let accounts = accounts.clone();
    crate::load::closed_loop(label, clients, duration, max_ops, move |client, seq| {
        let http = http.clone();
        let api = api.clone();
        let accounts = accounts.clone();
        async move {
            let n = accounts.len().max(1);
            let account = &accounts[client % n];
            let chats = account.chats.len().max(1);
            let chat = account.chats[(seq as usize / n) % chats];
            let content = format!("bench message {seq}");
            let resp = post_send(&http, &api, &account.token, chat, content).await;
            crate::load::expect_status(resp, 202).await.map(|_| ())
        }
    })
    .await
}
