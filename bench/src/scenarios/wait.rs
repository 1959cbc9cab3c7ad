//! Wait: `send_message?wait=true` end to end. 64 clients, each with an account and a chat of
//! its own, each in a closed loop: send, be held until the reply is stored and answered 200
//! with it, send again. The fake model answers after 1 s; one worker with concurrency 128.
//! Reports answers per second (after a warm-up) beside the limit clients ÷ model latency, the
//! errors (any answer but a 200 with the reply, or a timeout) and the latency.
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::env::{self, Stack};
use crate::load::{self, Counters, Progress};
use crate::procs::CpuMeter;
use crate::report::Row;
use crate::scenarios::{Ctx, push_errors};
use crate::seed;
use crate::stats::Samples;

const CLIENTS: usize = 64;
const LATENCY_MS: u64 = 1000;
const WORKER_CONCURRENCY: u32 = 128;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let secs = ctx.opts.secs;
    // Long enough for every client to have started (they start spread over one model
    // latency, so their answers do not arrive in step) and to have had an answer.
    let warm = Duration::from_secs(if ctx.opts.quick { 2 } else { 3 });
    let mut stack = Stack::api(&ctx.env, "wait").await?;
    stack.start_fake(&ctx.env, LATENCY_MS, 100).await?;
    stack.add_worker(&ctx.env, WORKER_CONCURRENCY).await?;
    let accounts = seed::accounts(&ctx.env.db, "wait", CLIENTS, 1).await?;
    let chats: Vec<i64> = accounts.iter().map(|a| a.chats[0]).collect();
    // One connection per client, each held for the whole wait (the pool keeps them all).
    let http = load::http_client(CLIENTS)?;
    let api = stack.api_url();
    eprintln!(
        "wait: {CLIENTS} clients, each its own chat, closed loop of send_message?wait=true; model {LATENCY_MS} ms, one worker (concurrency {WORKER_CONCURRENCY}); warm-up {warm:?}, then {secs}s"
    );

    let counters = Arc::new(Counters::default());
    let progress = Progress::start("wait".into(), counters.clone());
    let start = Instant::now();
    let window_start = start + warm;
    let end = window_start + Duration::from_secs(secs);
    let mut tasks = Vec::with_capacity(CLIENTS);
    for (client, account) in accounts.into_iter().enumerate() {
        let (http, api, counters) = (http.clone(), api.clone(), counters.clone());
        let stagger = Duration::from_millis(LATENCY_MS * client as u64 / CLIENTS as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(stagger).await;
            // (when answered, latency) of every answer.
            let mut done = Vec::new();
            let mut seq = 0u64;
            // A request started before the end is waited for: it counts as an error if it
            // fails, but its answer, after the end, not toward the rate.
            while Instant::now() < end {
                seq += 1;
                let content = format!("wait {client}-{seq}");
                let t = Instant::now();
                let result =
                    send_wait(&http, &api, &account.token, account.chats[0], content).await;
                let at = Instant::now();
                match result {
                    Ok(()) => {
                        counters.ok.fetch_add(1, Ordering::Relaxed);
                        done.push((at, at - t));
                    }
                    Err(e) => {
                        counters.error(e);
                        // Not a tight loop of failures.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            done
        }));
    }
    tokio::time::sleep_until(window_start.into()).await;
    let cpu = CpuMeter::start(&stack.pids());
    tokio::time::sleep_until(end.into()).await;
    ctx.cpu("wait", cpu.finish());
    let mut done = Vec::new();
    for task in tasks {
        match task.await {
            Ok(d) => done.extend(d),
            Err(e) => counters.error(format!("client task: {e}")),
        }
    }
    drop(progress);
    stack.check_alive()?;
    stack.stop().await;
    // Nothing should be left waiting; whatever is (after errors) must not be swept later.
    env::forget_queued(&ctx.env.db, &chats).await?;

    let mut samples = Samples::with_capacity(done.len());
    for (at, latency) in &done {
        if *at >= window_start && *at <= end {
            samples.record(*latency);
        }
    }
    let lat = samples.summary();
    let rate = lat.count as f64 / secs.max(1) as f64;
    let limit = CLIENTS as f64 / (LATENCY_MS as f64 / 1000.0);
    let errors = counters.errors.load(Ordering::Relaxed);
    let rep = &mut ctx.report;
    rep.push(
        Row::new(
            "wait",
            "answers/s (64 clients, send_message?wait=true, 1 s model)",
            rate,
            "answers/s",
        )
        .baseline("limit: clients ÷ model latency", limit)
        .target(">= 0.95 × limit", rate >= 0.95 * limit),
    );
    push_errors(rep, "wait", errors, &counters.first_errors());
    rep.push(
        Row::new("wait", "send_message?wait p50", lat.p50_ms, "ms")
            .baseline("model latency", LATENCY_MS as f64),
    );
    rep.push(
        Row::new("wait", "send_message?wait p99", lat.p99_ms, "ms")
            .baseline("model latency", LATENCY_MS as f64),
    );
    rep.note(format!(
        "wait: {} answers in the {secs}s window ({} in all); each client starts {} ms after the one before, so answers do not arrive in step; latency = send to the 200 with the reply, mean {:.0} ms (clients ÷ mean = {:.1}/s)",
        lat.count,
        done.len(),
        LATENCY_MS / CLIENTS as u64,
        lat.mean_ms,
        CLIENTS as f64 * 1000.0 / lat.mean_ms.max(1e-3),
    ));
    Ok(())
}

/// `POST send_message?wait=true`: Ok when answered 200 with the reply (an assistant message
/// answering a question); any other answer, a timeout or a body without the reply is an error.
async fn send_wait(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    chat: i64,
    content: String,
) -> Result<(), String> {
    let resp = http
        .post(format!("{api}/api/ai/chats/{chat}/send_message/?wait=true"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "content": content }))
        .send()
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    load::count_status(status);
    let body = resp.bytes().await.map_err(|e| format!("body: {e}"))?;
    let excerpt = || String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    if status != 200 {
        return Err(format!("HTTP {status}: {}", excerpt()));
    }
    let reply: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("200 body: {e}: {}", excerpt()))?;
    let is_reply =
        reply["role"] == "assistant" && reply["content"].is_string() && reply["reply_to"].is_i64();
    if is_reply {
        Ok(())
    } else {
        Err(format!("200 without the reply: {}", excerpt()))
    }
}
