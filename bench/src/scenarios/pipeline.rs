//! Pipeline: replies completed per second end to end (REST send → worker → model at 0 ms →
//! reply saved → `assistant_message` received by a WebSocket client of the chat), with one
//! worker and then two, beside the ingest rate.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::dbstats::{DbCost, DbCounters};
use crate::env::Stack;
use crate::load::{self, Counters, Progress};
use crate::procs::{CpuMeter, CpuSpent};
use crate::report::{Report, Row};
use crate::scenarios::{Ctx, accepted_id, ingest, post_send};
use crate::seed;
use crate::stats::{Samples, Summary};

/// Chats of the measured (target) phases: each receives ~1/64 of the sends, so its history,
/// and with it every prompt, grows through the run (to ~175 turns at ~500 replies/s).
const CHATS: usize = 64;
/// Chats of the extra phase: the same load spread so thin that conversations stay short
/// (~10 turns by the end), which shows what a reply costs apart from its history.
const SHORT_CHATS: usize = 1024;
const SENDERS: usize = 64;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    if ctx.ingest_rps.is_none() {
        eprintln!("pipeline: no ingest figure yet; measuring ingest first");
        ingest::run(ctx).await?;
    }
    let ingest_rps = ctx.ingest_rps.unwrap_or(0.0);
    let mut stack = Stack::api(&ctx.env, "pipeline").await?;
    stack.start_fake(&ctx.env, 0, 100).await?;
    let outstanding = if ctx.opts.quick { 128 } else { 256 };
    let mut results = Vec::new();
    for (workers, chats) in [(1usize, CHATS), (2, CHATS), (1, SHORT_CHATS)] {
        for _ in 0..workers {
            stack.add_worker(&ctx.env, 64).await?;
        }
        let phase = format!("pipe{workers}w{chats}");
        let accounts = seed::accounts(&ctx.env.db, &phase, chats, 1).await?;
        eprintln!(
            "pipeline: {workers} worker(s), {outstanding} messages outstanding over {chats} chats, {}s",
            ctx.opts.secs
        );
        let label = format!("pipeline {workers}w {chats} chats");
        let r = measure(ctx, &stack, &accounts, outstanding, &label).await?;
        let cpu_label = if chats == CHATS {
            format!("pipeline{workers}w")
        } else {
            format!("pipeline{workers}w-{chats}chats")
        };
        ctx.cpu(&cpu_label, r.cpu.percentages());
        eprintln!("  {}", r.compact(&cpu_label));
        stack.check_alive()?;
        stack.stop_workers().await;
        // What was still outstanding must not be answered (or swept) in the next phase.
        let chats: Vec<i64> = accounts.iter().map(|a| a.chats[0]).collect();
        crate::env::forget_queued(&ctx.env.db, &chats).await?;
        results.push(r);
    }
    stack.stop().await;

    let (one, two, short) = (&results[0], &results[1], &results[2]);
    let short_label = format!("1w {SHORT_CHATS} chats");
    let rep = &mut ctx.report;
    // Each phase's rate, then beside it what PostgreSQL did per answered message.
    rep.push(
        Row::new(
            "pipeline",
            "replies/s, 1 worker (e2e)",
            one.rate,
            "replies/s",
        )
        .baseline("ingest req/s", ingest_rps)
        .target(">= 0.50 × ingest", one.rate >= 0.5 * ingest_rps),
    );
    push_per_message(rep, "1w", one);
    rep.push(
        Row::new(
            "pipeline",
            "replies/s, 2 workers (e2e)",
            two.rate,
            "replies/s",
        )
        .baseline("1 worker", one.rate)
        .target("> 1 worker", two.rate > one.rate),
    );
    push_per_message(rep, "2w", two);
    rep.push(
        Row::new(
            "pipeline",
            &format!("replies/s, 1 worker, {SHORT_CHATS} chats"),
            short.rate,
            "replies/s",
        )
        .baseline("ingest req/s", ingest_rps),
    );
    push_per_message(rep, &short_label, short);
    // What each process spent per answered message: which one limits the machine.
    for (label, r) in [("1w", one), ("2w", two), (&*short_label, short)] {
        for (name, ms) in r.cpu_ms_per_answer() {
            rep.push(Row::new(
                "pipeline",
                &format!("CPU per answered message: {name}, {label}"),
                ms,
                "ms",
            ));
        }
    }
    for (label, r) in [("1w", one), ("2w", two), (&*short_label, short)] {
        rep.push(Row::new(
            "pipeline",
            &format!("prompt messages (mean of the last 100), {label}"),
            r.prompt_messages,
            "",
        ));
    }
    for (w, r) in [(1, one), (2, two)] {
        rep.push(Row::new(
            "pipeline",
            &format!("send→assistant_message p50, {w}w"),
            r.latency.p50_ms,
            "ms",
        ));
        rep.push(Row::new(
            "pipeline",
            &format!("send→assistant_message p99, {w}w"),
            r.latency.p99_ms,
            "ms",
        ));
        rep.push(
            Row::new("pipeline", &format!("errors, {w}w"), r.errors as f64, "")
                .target("0", r.errors == 0),
        );
        if !r.first_errors.is_empty() {
            rep.note(format!("pipeline {w}w errors: {:?}", r.first_errors));
        }
        if r.unanswered > 0 {
            rep.note(format!(
                "pipeline {w}w: {} sends had no assistant_message within the drain limit",
                r.unanswered
            ));
        }
    }
    rep.note(
        "pipeline: per answered message = over the phase (warm-up, measured window and the drain of the last replies) ÷ the replies it received; CPU from /proc (postgres and redis-server: every such process of the machine, machine: every busy core, so others' work on the machine counts too)".to_owned(),
    );
    rep.note(format!(
        "pipeline: closed loop with {outstanding} messages outstanding (a new send as each reply arrives), {CHATS} chats each watched by one WebSocket; the rate counts replies received after a warm-up; latency includes time queued behind the other outstanding messages; every prompt carries its chat's whole history (up to the 3,000-token budget), so with {CHATS} chats prompts grow through the run; the {SHORT_CHATS}-chat phase spreads the same load so conversations stay short"
    ));
    if short.errors > 0 || short.unanswered > 0 {
        rep.note(format!(
            "pipeline {SHORT_CHATS} chats: {} errors, {} unanswered: {:?}",
            short.errors, short.unanswered, short.first_errors
        ));
    }
    Ok(())
}

/// The rows of what one phase cost per answered message: PostgreSQL's transactions and rows,
/// and its CPU.
fn push_per_message(rep: &mut Report, label: &str, r: &PipeResult) {
    let per = |what: &str, value: f64, unit: &str| {
        Row::new(
            "pipeline",
            &format!("{what} per answered message, {label}"),
            value,
            unit,
        )
    };
    rep.push(per("PostgreSQL transactions", r.db.transactions, ""));
    rep.push(per("rows scanned (tup_returned)", r.db.rows_returned, ""));
    rep.push(per("rows fetched (tup_fetched)", r.db.rows_fetched, ""));
    rep.push(per("rows written", r.db.rows_written, ""));
    rep.push(per("PostgreSQL CPU", r.pg_cpu_ms_per_answer(), "ms"));
}

struct PipeResult {
    rate: f64,
    /// Replies received over the whole phase (warm-up and drain included): the unit of the
    /// per-answered-message figures.
    answered: usize,
    /// CPU spent over the same span as `db`.
    cpu: CpuSpent,
    /// Mean length of the prompts the model received last (the fake keeps the last 100).
    prompt_messages: f64,
    /// What PostgreSQL did per answered message (sends, jobs and replies together).
    db: DbCost,
    latency: Summary,
    errors: u64,
    unanswered: usize,
    first_errors: Vec<String>,
}

impl PipeResult {
    /// CPU milliseconds per answered message of `seconds` CPU seconds.
    fn per_answer_ms(&self, seconds: f64) -> f64 {
        seconds * 1000.0 / self.answered.max(1) as f64
    }

    /// CPU milliseconds of every `postgres` process per answered message.
    fn pg_cpu_ms_per_answer(&self) -> f64 {
        self.per_answer_ms(self.cpu.secs("postgres"))
    }

    /// (process or group, CPU ms per answered message): the children, PostgreSQL, Redis, the
    /// bench, and the whole machine.
    fn cpu_ms_per_answer(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .cpu
            .by_name
            .iter()
            .map(|(name, secs)| (name.clone(), self.per_answer_ms(*secs)))
            .collect();
        out.push((
            "machine (all processes)".to_owned(),
            self.per_answer_ms(self.cpu.machine_busy_secs),
        ));
        out
    }

    /// One line: the rate, and beside it what PostgreSQL did per answered message.
    fn compact(&self, label: &str) -> String {
        format!(
            "[{label}] {:.0} replies/s; per answered message: {:.2} transactions, {:.1} rows scanned, {:.1} rows fetched, {:.3} ms PostgreSQL CPU ({} answered)",
            self.rate,
            self.db.transactions,
            self.db.rows_returned,
            self.db.rows_fetched,
            self.pg_cpu_ms_per_answer(),
            self.answered,
        )
    }
}

enum Slot {
    Sent(Instant),
    Arrived(Instant),
}

#[derive(Default)]
struct Shared {
    pending: Mutex<HashMap<i64, Slot>>,
    /// (arrival, latency) of every completed reply.
    done: Mutex<Vec<(Instant, Duration)>>,
}

impl Shared {
    /// Pairs a send with its reply, whichever is seen first. Returns true when completed.
    fn meet(&self, id: i64, slot: Slot) -> bool {
        let Ok(mut pending) = self.pending.lock() else {
            return false;
        };
        let pair = match (pending.remove(&id), slot) {
            (Some(Slot::Sent(t)), Slot::Arrived(a)) | (Some(Slot::Arrived(a)), Slot::Sent(t)) => {
                Some((a, a.saturating_duration_since(t)))
            }
            (_, slot) => {
                pending.insert(id, slot);
                None
            }
        };
        drop(pending);
        match pair {
            Some(p) => {
                if let Ok(mut done) = self.done.lock() {
                    done.push(p);
                }
                true
            }
            None => false,
        }
    }

    fn sent_waiting(&self) -> usize {
        self.pending
            .lock()
            .map(|p| p.values().filter(|s| matches!(s, Slot::Sent(_))).count())
            .unwrap_or(0)
    }
}

async fn measure(
    ctx: &Ctx,
    stack: &Stack,
    accounts: &[seed::Account],
    outstanding: usize,
    label: &str,
) -> anyhow::Result<PipeResult> {
    let shared = Arc::new(Shared::default());
    let counters = Arc::new(Counters::default());
    let permits = Arc::new(Semaphore::new(outstanding));
    let secs = ctx.opts.secs;
    let warm = Duration::from_secs(if ctx.opts.quick { 1 } else { 3 });
    let drain = Duration::from_secs(20);
    // One WebSocket per chat, connected before the first send.
    let connect_start = Instant::now();
    let mut sockets = Vec::new();
    for account in accounts {
        let chat = account.chats[0];
        let ws = load::ws_connect(stack.api_port, chat, &account.token)
            .await
            .map_err(|e| anyhow::anyhow!("pipeline ws: {e}"))?;
        sockets.push((chat, ws));
    }
    eprintln!(
        "  {} sockets connected in {:.2}s",
        sockets.len(),
        connect_start.elapsed().as_secs_f64()
    );
    let db_before = DbCounters::read(&ctx.env.db).await?;
    let cpu = CpuMeter::start(&stack.pids());
    let start = Instant::now();
    let send_end = start + warm + Duration::from_secs(secs);
    let read_end = send_end + drain;
    let mut readers = Vec::new();
    for (chat, mut ws) in sockets {
        let shared = shared.clone();
        let counters = counters.clone();
        let permits = permits.clone();
        readers.push(tokio::spawn(async move {
            loop {
                let text = match tokio::time::timeout_at(read_end.into(), load::next_text(&mut ws))
                    .await
                {
                    Err(_) => return,
                    Ok(Err(e)) => {
                        counters.error(format!("chat {chat}: {e}"));
                        return;
                    }
                    Ok(Ok(t)) => t,
                };
                if !text.contains("\"assistant_message\"") && !text.contains("\"error\"") {
                    continue;
                }
                let arrived = Instant::now();
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                    continue;
                };
                match v["type"].as_str() {
                    Some("assistant_message") => {
                        if let Some(id) = v["message"]["reply_to"].as_i64()
                            && shared.meet(id, Slot::Arrived(arrived))
                        {
                            counters.ok.fetch_add(1, Ordering::Relaxed);
                            permits.add_permits(1);
                        }
                    }
                    Some("error") => counters.error(format!("error event: {text}")),
                    _ => {}
                }
            }
        }));
    }

    let _progress = Progress::start(label.to_owned(), counters.clone());
    let http = load::http_client(SENDERS)?;
    let accounts = Arc::new(accounts.to_vec());
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (http, shared, counters, permits, accounts) = (
            http.clone(),
            shared.clone(),
            counters.clone(),
            permits.clone(),
            accounts.clone(),
        );
        let api = stack.api_url();
        senders.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while Instant::now() < send_end {
                let Ok(Ok(permit)) =
                    tokio::time::timeout_at(send_end.into(), permits.acquire()).await
                else {
                    break;
                };
                permit.forget();
                // Round robin: with as many chats as senders, each sender keeps to one chat.
                let account = &accounts[(s + SENDERS * seq as usize) % accounts.len()];
                let chat = account.chats[0];
                seq += 1;
                let t = Instant::now();
                let content = format!("pipeline {s}-{seq}");
                let resp = post_send(&http, &api, &account.token, chat, content).await;
                let id = accepted_id(resp).await.unwrap_or_else(|e| {
                    counters.error(e);
                    None
                });
                match id {
                    Some(id) => {
                        if shared.meet(id, Slot::Sent(t)) {
                            counters.ok.fetch_add(1, Ordering::Relaxed);
                            permits.add_permits(1);
                        }
                    }
                    None => permits.add_permits(1),
                }
            }
        }));
    }
    for s in senders {
        let _ = s.await;
    }
    // Let the outstanding replies arrive (bounded), then stop the readers.
    while Instant::now() < read_end && shared.sent_waiting() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for r in &readers {
        r.abort();
    }
    let unanswered = shared.sent_waiting();
    let done = shared.done.lock().map(|d| d.clone()).unwrap_or_default();
    let cpu = cpu.spent();
    let db = db_before.per(&DbCounters::read(&ctx.env.db).await?, done.len());
    let window_start = start + warm;
    let in_window = done
        .iter()
        .filter(|(a, _)| *a >= window_start && *a <= send_end)
        .count();
    let mut samples = Samples::with_capacity(done.len());
    for (a, l) in &done {
        if *a >= window_start && *a <= send_end {
            samples.record(*l);
        }
    }
    let prompt_messages = mean_prompt_messages(&http, &stack.fake_url()).await?;
    Ok(PipeResult {
        rate: in_window as f64 / (send_end - window_start).as_secs_f64(),
        answered: done.len(),
        cpu,
        prompt_messages,
        db,
        latency: samples.summary(),
        errors: counters.errors.load(Ordering::Relaxed),
        unanswered,
        first_errors: counters.first_errors(),
    })
}

/// Mean number of messages in the prompts the fake model recorded (its last 100).
async fn mean_prompt_messages(http: &reqwest::Client, fake: &str) -> anyhow::Result<f64> {
    let log: Vec<serde_json::Value> = http
        .get(format!("{fake}/_fake/requests"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let lengths: Vec<usize> = log
        .iter()
        .filter_map(|r| r["messages"].as_array().map(|m| m.len()))
        .collect();
    Ok(lengths.iter().sum::<usize>() as f64 / lengths.len().max(1) as f64)
}
