//! Ingest: authenticated `send_message` per second at 64 clients with no worker running,
//! beside pgbench single-row inserts and redis-benchmark LPUSH; then the backlog is drained
//! by one worker (bounded in time) and the drain rate reported.
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::baselines;
use crate::env::{self, Stack};
use crate::load;
use crate::procs::CpuMeter;
use crate::report::Row;
use crate::scenarios::{Ctx, push_errors, send_load};
use crate::seed;

const CLIENTS: usize = 64;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let secs = ctx.opts.secs;
    let mut stack = Stack::api(&ctx.env, "ingest").await?;
    let accounts = Arc::new(seed::accounts(&ctx.env.db, "ingest", CLIENTS, 2).await?);
    let chats: Vec<i64> = accounts.iter().flat_map(|a| a.chats.clone()).collect();
    let http = load::http_client(CLIENTS)?;
    let api = stack.api_url();

    eprintln!("ingest: warm-up");
    let warm = send_load(
        "ingest warm-up",
        &http,
        &api,
        &accounts,
        CLIENTS,
        ctx.opts.warmup(),
        u64::MAX,
    )
    .await;
    if warm.ok == 0 {
        anyhow::bail!(
            "ingest warm-up: no request succeeded: {:?}",
            warm.first_errors
        );
    }
    eprintln!("ingest: {CLIENTS} clients for {secs}s (API only, no worker)");
    let cpu = CpuMeter::start(&stack.pids());
    let r = send_load(
        "ingest",
        &http,
        &api,
        &accounts,
        CLIENTS,
        Duration::from_secs(secs),
        u64::MAX,
    )
    .await;
    ctx.cpu("ingest", cpu.finish());
    stack.check_alive()?;
    let rps = r.rate();
    let lat = r.samples.summary();
    ctx.ingest_rps = Some(rps);

    eprintln!("ingest: baseline pgbench single-row insert, {CLIENTS} clients, {secs}s");
    let pg = baselines::pgbench_insert(&ctx.env, CLIENTS, secs).await?;
    ctx.pgbench_insert_tps = Some(pg.tps);
    eprintln!("ingest: baseline redis-benchmark LPUSH, {CLIENTS} clients");
    let requests = if ctx.opts.quick { 50_000 } else { 500_000 };
    let rb = baselines::redis_lpush(&ctx.env, CLIENTS, requests).await?;

    let rep = &mut ctx.report;
    rep.push(
        Row::new("ingest", "send_message/s (64 clients)", rps, "req/s")
            .baseline("pgbench insert tps", pg.tps)
            .target(">= 0.40 × pgbench", rps >= 0.40 * pg.tps),
    );
    // (metric, figure, unit, baseline, its figure): each beside pgbench, then redis.
    for (metric, value, unit, baseline, base) in [
        (
            "send_message/s vs redis LPUSH",
            rps,
            "req/s",
            "redis LPUSH rps",
            rb.rps,
        ),
        (
            "send_message p50",
            lat.p50_ms,
            "ms",
            "pgbench insert p50",
            pg.latency_p50_ms,
        ),
        (
            "send_message p50 vs redis",
            lat.p50_ms,
            "ms",
            "redis LPUSH p50",
            rb.p50_ms,
        ),
        (
            "send_message p99",
            lat.p99_ms,
            "ms",
            "pgbench insert p99",
            pg.latency_p99_ms,
        ),
        (
            "send_message p99 vs redis",
            lat.p99_ms,
            "ms",
            "redis LPUSH p99",
            rb.p99_ms,
        ),
    ] {
        rep.push(Row::new("ingest", metric, value, unit).baseline(baseline, base));
    }
    push_errors(rep, "ingest", r.errors, &r.first_errors);

    // Drain the backlog with one worker, bounded in time; whatever is left is deleted (its
    // jobs with the namespace).
    let backlog = env::queued_in(&ctx.env.db, &chats).await?;
    let limit = Duration::from_secs(if ctx.opts.quick { 10 } else { 30 });
    eprintln!("ingest: draining {backlog} queued messages with one worker (at most {limit:?})");
    stack.start_fake(&ctx.env, 0, 100).await?;
    stack.add_worker(&ctx.env, 64).await?;
    let start = Instant::now();
    let before = env::replies_in(&ctx.env.db, &chats).await?;
    let mut left = backlog;
    while start.elapsed() < limit && left > 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        stack.check_alive()?;
        left = env::queued_in(&ctx.env.db, &chats).await?;
        eprintln!(
            "  [drain] {:>5.1}s queued={left}",
            start.elapsed().as_secs_f64()
        );
    }
    let answered = env::replies_in(&ctx.env.db, &chats).await? - before;
    let drain_rate = answered as f64 / start.elapsed().as_secs_f64();
    ctx.report.push(
        Row::new(
            "ingest",
            "drain: replies/s (1 worker, full queue)",
            drain_rate,
            "replies/s",
        )
        .baseline("ingest req/s", rps)
        .target("backlog being drained", answered > 0 || backlog == 0),
    );
    let worker_log = stack
        .workers
        .first()
        .map(|w| std::fs::read_to_string(&w.log).unwrap_or_default())
        .unwrap_or_default();
    if let Some(line) = worker_log.lines().find(|l| l.contains("ERROR")) {
        let failures = worker_log
            .lines()
            .filter(|l| l.contains("queue consumer failed"))
            .count();
        ctx.report.note(format!(
            "ingest drain: the worker's queue consumer failed {failures} times; first error: {}",
            strip_ansi(line)
        ));
    }
    ctx.report.note(format!(
        "ingest drain: {answered} of {backlog} backlog answered in {:.1}s, {left} left (deleted)",
        start.elapsed().as_secs_f64()
    ));
    stack.stop().await;
    env::forget_queued(&ctx.env.db, &chats).await?;
    Ok(())
}

/// A log line without its terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
