//! Reads: the latest 50 messages of a 10,000-message chat
//! (`GET /api/ai/chats/{id}/messages/?after_id=<last-50>&limit=50`) at 64 clients, beside
//! pgbench running the same query at 64 clients.
use std::sync::Arc;
use std::time::Duration;

use crate::baselines;
use crate::env::Stack;
use crate::load;
use crate::procs::CpuMeter;
use crate::report::Row;
use crate::scenarios::{Ctx, push_errors};
use crate::seed;

const CLIENTS: usize = 64;
const MESSAGES: i64 = 10_000;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let secs = ctx.opts.secs;
    let mut stack = Stack::api(&ctx.env, "reads").await?;
    let account = seed::accounts(&ctx.env.db, "reads", 1, 1).await?.remove(0);
    let chat = account.chats[0];
    eprintln!("reads: seeding {MESSAGES} messages");
    seed::history(&ctx.env.db, chat, MESSAGES).await?;
    let after = seed::latest_50_after(&ctx.env.db, chat).await?;
    let url: Arc<str> = Arc::from(format!(
        "{}/api/ai/chats/{chat}/messages/?after_id={after}&limit=50",
        stack.api_url()
    ));
    let http = load::http_client(CLIENTS)?;
    let first: serde_json::Value = http
        .get(&*url)
        .bearer_auth(&account.token)
        .send()
        .await?
        .json()
        .await?;
    let n = first.as_array().map(|a| a.len()).unwrap_or(0);
    if n != 50 {
        anyhow::bail!("reads: expected 50 messages, got {n}: {first}");
    }
    let token: Arc<str> = Arc::from(account.token.as_str());
    let op = {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        move |_client: usize, _seq: u64| {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            async move {
                let resp = http.get(&*url).bearer_auth(&*token).send().await;
                load::expect_status(resp, 200).await.map(|_| ())
            }
        }
    };
    eprintln!("reads: warm-up");
    load::closed_loop(
        "reads warm-up",
        CLIENTS,
        ctx.opts.warmup(),
        u64::MAX,
        op.clone(),
    )
    .await;
    eprintln!("reads: {CLIENTS} clients for {secs}s");
    let cpu = CpuMeter::start(&stack.pids());
    let r = load::closed_loop("reads", CLIENTS, Duration::from_secs(secs), u64::MAX, op).await;
    ctx.cpu("reads", cpu.finish());
    stack.check_alive()?;
    let rps = r.rate();
    let lat = r.samples.summary();

    eprintln!("reads: baseline pgbench with the same query, {CLIENTS} clients, {secs}s");
    let sql = format!(
        "select m.id, m.ai_chat_id, m.role, m.content, m.timestamp, m.prompt_tokens, m.completion_tokens, m.total_tokens, m.status, m.error, m.model, m.reply_to from ai_messages m where m.ai_chat_id = {chat} and m.id > {after} order by m.id limit 50;"
    );
    let pg = baselines::pgbench(&ctx.env, "read", &sql, CLIENTS, secs).await?;
    stack.stop().await;

    let rep = &mut ctx.report;
    rep.push(
        Row::new("reads", "latest-50 GETs/s (64 clients)", rps, "req/s")
            .baseline("pgbench same query tps", pg.tps),
    );
    rep.push(Row::new("reads", "p50", lat.p50_ms, "ms").baseline("pgbench p50", pg.latency_p50_ms));
    rep.push(
        Row::new(
            "reads",
            "mean (clients ÷ rate)",
            CLIENTS as f64 * 1000.0 / rps.max(f64::MIN_POSITIVE),
            "ms",
        )
        .baseline("pgbench avg latency", pg.latency_avg_ms),
    );
    rep.push(
        Row::new("reads", "p99", lat.p99_ms, "ms")
            .baseline("pgbench p99", pg.latency_p99_ms)
            .target("<= 10 ms", lat.p99_ms <= 10.0),
    );
    push_errors(rep, "reads", r.errors, &r.first_errors);
    Ok(())
}
