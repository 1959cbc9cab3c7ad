//! Concurrency: the fake model answers after 2 s; one worker with WORKER_CONCURRENCY=500 works
//! a backlog of jobs queued beforehand. Reports the most model calls in flight (from the
//! fake's arrival log) and jobs in flight (worker /metrics), and replies per second beside
//! the ideal concurrency ÷ latency. Then, with that drain measured alone, a second backlog is
//! queued, and while the worker drains it 64 closed-loop clients send into other chats for
//! 10 s: that ingest rate beside the run's first pgbench single-row insert (the ingest
//! scenario's baseline, or measured here when it did not run), and beside pgbench run for as
//! long just before this scenario.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;

use crate::baselines;
use crate::env::{self, Stack};
use crate::load::{self, LoadResult};
use crate::procs::CpuMeter;
use crate::report::Row;
use crate::scenarios::{Ctx, send_load};
use crate::seed;

const LATENCY_MS: u64 = 2000;
/// Clients of the ingest during the drain (as many as the ingest scenario's).
const INGEST_CLIENTS: usize = 64;

#[derive(Deserialize)]
struct Recorded {
    received_at_ms: u64,
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let jobs = ctx.opts.concurrency_jobs;
    let concurrency = ctx.opts.concurrency;
    let pgbench_tps = match ctx.pgbench_insert_tps {
        Some(tps) => tps,
        None => {
            let secs = ctx.opts.secs;
            eprintln!(
                "concurrency: no pgbench figure yet; pgbench single-row insert, {INGEST_CLIENTS} clients, {secs}s"
            );
            let pg = baselines::pgbench_insert(&ctx.env, INGEST_CLIENTS, secs).await?;
            ctx.pgbench_insert_tps = Some(pg.tps);
            pg.tps
        }
    };
    // The ingest while a worker drains is also shown beside pgbench in its own minute, just
    // before this scenario's stack starts: the machine's speed drifts by tens of percent over
    // the minutes of a run (BENCHMARKS.md), and that ingest comes minutes after the run's first
    // pgbench, which its target is measured against (as on every machine before). Not while
    // the stack is up (64 more connections may pass PostgreSQL's `max_connections`), nor after
    // it (PostgreSQL is then still busy with the scenario's writes: 8,000–10,800 tps after
    // against 11,600–12,400 before in 3 of 4 runs). It follows the ingest scenario's cleanup,
    // and is as low as 0.71 of the first pgbench in one run of seven.
    let drain_ingest_secs = drain_ingest_secs(ctx.opts.quick);
    eprintln!(
        "concurrency: pgbench single-row insert, {INGEST_CLIENTS} clients, {}s, before the scenario",
        drain_ingest_secs.0.as_secs()
    );
    let pgbench_before =
        baselines::pgbench_insert(&ctx.env, INGEST_CLIENTS, drain_ingest_secs.0.as_secs())
            .await?
            .tps;
    let mut stack = Stack::api(&ctx.env, "concurrency").await?;
    stack.start_fake(&ctx.env, LATENCY_MS, 20_000).await?;
    let accounts = Arc::new(seed::accounts(&ctx.env.db, "conc", 50, 10).await?);
    let chats: Vec<i64> = accounts.iter().flat_map(|a| a.chats.clone()).collect();
    let ingest_accounts =
        Arc::new(seed::accounts(&ctx.env.db, "conc-ingest", INGEST_CLIENTS, 2).await?);
    let ingest_chats: Vec<i64> = ingest_accounts
        .iter()
        .flat_map(|a| a.chats.clone())
        .collect();
    let http = load::http_client(64)?;

    eprintln!(
        "concurrency: queueing {jobs} messages over {} chats (no worker yet)",
        chats.len()
    );
    enqueue(ctx, &http, &stack, &accounts, jobs, "enqueue").await;
    let queued = env::queued_in(&ctx.env.db, &chats).await?;
    eprintln!(
        "concurrency: {queued} queued; starting one worker with WORKER_CONCURRENCY={concurrency}, model latency {LATENCY_MS} ms"
    );
    stack.add_worker(&ctx.env, concurrency).await?;
    let cpu = CpuMeter::start(&stack.pids());
    let metrics_url = stack.worker_metrics.first().cloned().unwrap_or_default();
    let ideal = ideal_rate(concurrency);
    let limit = Duration::from_secs_f64(queued as f64 / ideal * 3.0 + 30.0);
    let start = Instant::now();
    let mut max_worker_in_flight = 0.0f64;
    let mut replies = 0;
    let mut last_print = Instant::now();
    while start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(n) = env::worker_in_flight(&ctx.env.http, &metrics_url).await {
            max_worker_in_flight = max_worker_in_flight.max(n);
        }
        replies = env::replies_in(&ctx.env.db, &chats).await?;
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            stack.check_alive()?;
            eprintln!(
                "  [concurrency] {:>5.1}s replies={replies}/{queued} worker in flight max={max_worker_in_flight}",
                start.elapsed().as_secs_f64()
            );
        }
        if replies >= queued {
            break;
        }
    }
    ctx.cpu("concurrency", cpu.finish());

    let recorded: Vec<Recorded> = ctx
        .env
        .http
        .get(format!("{}/_fake/requests", stack.fake_url()))
        .send()
        .await?
        .json()
        .await
        .context("reading the fake's request log")?;
    let mut arrivals: Vec<u64> = recorded.iter().map(|r| r.received_at_ms).collect();
    arrivals.sort_unstable();
    let max_model_in_flight = max_in_window(&arrivals, LATENCY_MS);
    // How long the worker took to fill its slots: the first `concurrency` model calls.
    let fill_ms = arrivals
        .get(concurrency as usize - 1)
        .zip(arrivals.first())
        .map(|(last, first)| last - first);
    let last_reply_ms: Option<f64> = sqlx::query_scalar(
        "select (extract(epoch from max(timestamp)) * 1000)::float8 from ai_messages where ai_chat_id = any($1) and role = 'assistant'",
    )
    .bind(&chats)
    .fetch_one(&ctx.env.db)
    .await?;
    let first_call = arrivals.first().copied().unwrap_or(0) as f64;
    let span_s = (last_reply_ms.unwrap_or(first_call) - first_call) / 1000.0;
    let rate = if span_s > 0.0 {
        replies as f64 / span_s
    } else {
        0.0
    };

    // Then a second backlog, and the ingest while the worker drains it (the drain above is
    // measured alone, as ever).
    let ingest = ingest_while_draining(
        ctx,
        &mut stack,
        &http,
        &accounts,
        &ingest_accounts,
        &chats,
        &metrics_url,
    )
    .await?;
    stack.stop().await;
    // The ingest's messages (and whatever of the backlog is left) are not answered now: their
    // jobs went with the namespace, and the next scenarios' sweepers would queue them again.
    env::forget_queued(&ctx.env.db, &ingest_chats).await?;
    env::forget_queued(&ctx.env.db, &chats).await?;

    let rep = &mut ctx.report;
    rep.push(
        Row::new(
            "concurrency",
            "replies/s (2 s model, 500 slots)",
            rate,
            "replies/s",
        )
        .baseline("ideal 500 ÷ 2 s", ideal)
        .target(">= 0.90 × ideal", rate >= 0.9 * ideal),
    );
    rep.push(
        Row::new(
            "concurrency",
            "max model calls in flight (fake log)",
            max_model_in_flight as f64,
            "calls",
        )
        .baseline("WORKER_CONCURRENCY", f64::from(concurrency))
        .target(">= 500", max_model_in_flight as u32 >= concurrency),
    );
    if let Some(fill) = fill_ms {
        rep.push(
            Row::new(
                "concurrency",
                "time to fill the 500 slots",
                fill as f64,
                "ms",
            )
            .baseline("model latency", LATENCY_MS as f64),
        );
    }
    rep.push(
        Row::new(
            "concurrency",
            "max jobs in flight (worker /metrics)",
            max_worker_in_flight,
            "jobs",
        )
        .baseline("WORKER_CONCURRENCY", f64::from(concurrency)),
    );
    let i = &ingest;
    let rps = i.load.rate();
    rep.push(
        Row::new(
            "concurrency",
            "ingest while a worker drains at concurrency 500",
            rps,
            "req/s",
        )
        .baseline("pgbench insert tps", pgbench_tps)
        .target(">= 0.40 × pgbench", rps >= 0.40 * pgbench_tps),
    );
    rep.push(
        Row::new(
            "concurrency",
            "ingest while draining, vs pgbench in its minute",
            rps,
            "req/s",
        )
        .baseline("pgbench insert tps, its minute", pgbench_before),
    );
    rep.push(
        Row::new(
            "concurrency",
            "ingest while draining: errors",
            i.load.errors as f64,
            "",
        )
        .target("0", i.load.errors == 0),
    );
    if !i.load.first_errors.is_empty() {
        rep.note(format!(
            "concurrency ingest errors: {:?}",
            i.load.first_errors
        ));
    }
    rep.note(format!(
        "concurrency: ingest while draining = a second backlog of {} messages queued into the backlog chats once the first was drained; when the worker held {} jobs, {INGEST_CLIENTS} closed-loop clients sent into {} other chats (accounts of their own) for {:.1}s after a {:.1}s warm-up; {} sends ok; {} backlog replies meanwhile ({:.0}/s; the replies come in waves of 500 every 2 s, so a short window counts whole waves), {} backlog messages still waiting at its end (above 0: the ingest ran within the drain); the ingest's messages queue behind the backlog and are deleted unanswered",
        i.backlog,
        i.in_flight_at_start,
        ingest_chats.len(),
        i.load.elapsed.as_secs_f64(),
        i.warm.as_secs_f64(),
        i.load.ok,
        i.replies,
        i.drain_rate,
        i.backlog_left,
    ));
    rep.note(format!(
        "concurrency: {replies} of {queued} replies; rate = replies ÷ (last reply saved − first model call) = {replies} ÷ {span_s:.2}s; in-flight from the fake = most arrivals within any {LATENCY_MS} ms window"
    ));
    if replies < queued {
        rep.note(format!(
            "concurrency: only {replies} of {queued} answered within {limit:?}"
        ));
    }
    Ok(())
}

/// Queues a second backlog (at least `opts.concurrency_jobs` messages into the backlog chats,
/// enough to last through the ingest) for the running worker; once it holds its `concurrency`
/// jobs (or after one model latency), runs the ingest into the ingest accounts' chats.
async fn ingest_while_draining(
    ctx: &mut Ctx,
    stack: &mut Stack,
    http: &reqwest::Client,
    accounts: &Arc<Vec<seed::Account>>,
    ingest_accounts: &Arc<Vec<seed::Account>>,
    chats: &[i64],
    metrics_url: &str,
) -> anyhow::Result<IngestDuringDrain> {
    let concurrency = f64::from(ctx.opts.concurrency);
    let (secs, warm) = drain_ingest_secs(ctx.opts.quick);
    // Enough for the worker to drain through the whole ingest: the jobs it holds when the
    // ingest begins, then its ideal rate over the warm-up and the window, and half again.
    let ideal = ideal_rate(ctx.opts.concurrency);
    let through = concurrency + ideal * (warm + secs).as_secs_f64() * 1.5;
    let jobs = ctx.opts.concurrency_jobs.max(through.ceil() as u64);
    eprintln!(
        "concurrency: queueing {jobs} more messages into the backlog chats for the worker, then ingest into other chats while it drains them"
    );
    let r = enqueue(ctx, http, stack, accounts, jobs, "second enqueue").await;
    let backlog = r.ok;
    let filling = Instant::now();
    let mut in_flight = 0.0f64;
    while filling.elapsed() < Duration::from_millis(LATENCY_MS) {
        in_flight = env::worker_in_flight(&ctx.env.http, metrics_url)
            .await
            .unwrap_or(0.0);
        if in_flight >= concurrency {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.check_alive()?;
    eprintln!(
        "concurrency: {backlog} queued, {in_flight} jobs in flight: ingest with {INGEST_CLIENTS} clients, warm-up {warm:?}, then {secs:?}"
    );
    let cpu = CpuMeter::start(&stack.pids());
    let warm_up = send_load(
        "drain ingest warm-up",
        http,
        &stack.api_url(),
        ingest_accounts,
        INGEST_CLIENTS,
        warm,
        u64::MAX,
    )
    .await;
    let before = env::replies_in(&ctx.env.db, chats).await?;
    let t = Instant::now();
    let mut load = send_load(
        "drain ingest",
        http,
        &stack.api_url(),
        ingest_accounts,
        INGEST_CLIENTS,
        secs,
        u64::MAX,
    )
    .await;
    let elapsed = t.elapsed().as_secs_f64().max(1e-3);
    let replies = env::replies_in(&ctx.env.db, chats).await? - before;
    let backlog_left = env::queued_in(&ctx.env.db, chats).await?;
    ctx.cpu("concurrency+ingest", cpu.finish());
    stack.check_alive()?;
    // The warm-up's errors count too.
    load.errors += warm_up.errors;
    let mut first = warm_up.first_errors;
    first.extend(load.first_errors);
    first.truncate(5);
    load.first_errors = first;
    Ok(IngestDuringDrain {
        load,
        warm,
        backlog,
        in_flight_at_start: in_flight,
        replies,
        drain_rate: replies as f64 / elapsed,
        backlog_left,
    })
}

/// Replies per second of a worker whose `concurrency` slots are always full: each call lasts
/// the model's latency.
fn ideal_rate(concurrency: u32) -> f64 {
    f64::from(concurrency) / (LATENCY_MS as f64 / 1000.0)
}

/// How long the ingest while draining runs, and its warm-up. The worker's replies come in
/// waves of 500 every 2 s: 10 s holds five, where 5 s held two or three and the figure moved
/// with where they fell.
fn drain_ingest_secs(quick: bool) -> (Duration, Duration) {
    if quick {
        (Duration::from_secs(2), Duration::from_millis(500))
    } else {
        (Duration::from_secs(10), Duration::from_secs(1))
    }
}

/// What the ingest during the drain did, and the drain meanwhile.
struct IngestDuringDrain {
    load: LoadResult,
    warm: Duration,
    /// Messages of the second backlog, and the worker's jobs in flight when the ingest began.
    backlog: u64,
    in_flight_at_start: f64,
    /// Backlog replies saved during the measured ingest, and their rate.
    replies: i64,
    drain_rate: f64,
    /// Backlog messages still waiting when the ingest ended (above 0: it ran within the drain).
    backlog_left: i64,
}

/// The most arrivals within any window of `window_ms` (arrivals sorted): the calls in flight
/// when each lasts exactly `window_ms`.
/// Queues `jobs` messages over the accounts' chats (64 senders, at most 2 minutes); errors go
/// to the report's notes under `what`.
async fn enqueue(
    ctx: &mut Ctx,
    http: &reqwest::Client,
    stack: &Stack,
    accounts: &Arc<Vec<seed::Account>>,
    jobs: u64,
    what: &str,
) -> load::LoadResult {
    let r = send_load(
        what,
        http,
        &stack.api_url(),
        accounts,
        64,
        Duration::from_secs(120),
        jobs,
    )
    .await;
    if r.errors > 0 {
        ctx.report.note(format!(
            "concurrency {what} errors: {} {:?}",
            r.errors, r.first_errors
        ));
    }
    r
}

fn max_in_window(arrivals: &[u64], window_ms: u64) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..arrivals.len() {
        while arrivals[hi] - arrivals[lo] >= window_ms {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::max_in_window;

    #[test]
    fn window_counts_overlapping_calls() {
        assert_eq!(max_in_window(&[], 2000), 0);
        assert_eq!(max_in_window(&[0, 100, 1999, 2000, 2001], 2000), 4);
        assert_eq!(max_in_window(&[0, 3000, 6000], 2000), 1);
    }
}
