//! Concurrency: the fake model answers after 2 s; one worker with WORKER_CONCURRENCY=500 works
//! a backlog of jobs queued beforehand. Reports the most model calls in flight (from the
//! fake's arrival log) and jobs in flight (worker /metrics), and replies per second beside
//! the ideal concurrency ÷ latency.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;

use crate::env::{self, Stack};
use crate::load;
use crate::procs::CpuMeter;
use crate::report::Row;
use crate::scenarios::{Ctx, send_load};
use crate::seed;

const LATENCY_MS: u64 = 2000;

#[derive(Deserialize)]
struct Recorded {
    received_at_ms: u64,
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let jobs = ctx.opts.concurrency_jobs;
    let concurrency = ctx.opts.concurrency;
    let mut stack = Stack::api(&ctx.env, "concurrency").await?;
    stack.start_fake(&ctx.env, LATENCY_MS, 20_000).await?;
    let accounts = Arc::new(seed::accounts(&ctx.env.db, "conc", 50, 10).await?);
    let chats: Vec<i64> = accounts.iter().flat_map(|a| a.chats.clone()).collect();
    let http = load::http_client(64)?;

    eprintln!(
        "concurrency: queueing {jobs} messages over {} chats (no worker yet)",
        chats.len()
    );
    let r = send_load(
        "enqueue",
        &http,
        &stack.api_url(),
        &accounts,
        64,
        Duration::from_secs(120),
        jobs,
    )
    .await;
    if r.errors > 0 {
        ctx.report.note(format!(
            "concurrency enqueue errors: {} {:?}",
            r.errors, r.first_errors
        ));
    }
    let queued = env::queued_in(&ctx.env.db, &chats).await?;
    eprintln!(
        "concurrency: {queued} queued; starting one worker with WORKER_CONCURRENCY={concurrency}, model latency {LATENCY_MS} ms"
    );
    stack.add_worker(&ctx.env, concurrency).await?;
    let cpu = CpuMeter::start(&stack.pids());
    let metrics_url = stack.worker_metrics.first().cloned().unwrap_or_default();
    let ideal = f64::from(concurrency) / (LATENCY_MS as f64 / 1000.0);
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
    stack.stop().await;

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

/// The most arrivals within any window of `window_ms` (arrivals sorted): the calls in flight
/// when each lasts exactly `window_ms`.
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
