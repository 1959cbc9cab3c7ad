//! Fan-out: N idle WebSockets on one API process (resident memory per socket), then events
//! published straight on the chat channels at a fixed rate, each carrying its publish time;
//! the clients measure publish → receive latency. Baselines: a plain Redis subscriber of the
//! same channels (latency), and the bench's own memory per client socket.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aichat_shared::keys::Namespace;
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::env::{REDIS_URL, Stack};
use crate::load::{self, Counters, Progress, now_us};
use crate::procs::{self, CpuMeter};
use crate::report::Row;
use crate::scenarios::Ctx;
use crate::seed;
use crate::stats::Samples;

const MARK: &str = "\"bench_t\":";

/// The publish time carried by a bench event.
fn stamp(text: &str) -> Option<u64> {
    let rest = &text[text.find(MARK)? + MARK.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let n = ctx.opts.fanout_clients;
    let chats_n = ctx.opts.fanout_chats.max(1);
    let rate = ctx.opts.fanout_rate;
    let secs = ctx.opts.secs;
    let mut stack = Stack::api(&ctx.env, "fanout").await?;
    let accounts = seed::accounts(&ctx.env.db, "fan", chats_n, 1).await?;
    let api_pid = stack.api_pid();

    // Warm the API (pools, allocator) with a few sockets, then measure from there.
    for a in accounts.iter().take(4) {
        let mut ws = load::ws_connect(stack.api_port, a.chats[0], &a.token)
            .await
            .map_err(|e| anyhow::anyhow!("fanout warm-up: {e}"))?;
        let _ = ws.close(None).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let api_before = procs::rss_kib(api_pid);
    let own_before = procs::rss_kib(std::process::id());

    eprintln!("fanout: connecting {n} WebSockets over {chats_n} chats");
    let counters = Arc::new(Counters::default());
    let connect_start = Instant::now();
    let conns: Vec<(usize, Result<load::Ws, String>)> = {
        let _progress = Progress::start("fanout connect".into(), counters.clone());
        let port = stack.api_port;
        let accounts = &accounts;
        let counters = &counters;
        futures::stream::iter(0..n)
            .map(|i| async move {
                let a = &accounts[i % chats_n];
                let r = load::ws_connect(port, a.chats[0], &a.token).await;
                match &r {
                    Ok(_) => counters.ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        counters.error(e.clone());
                        0
                    }
                };
                (i % chats_n, r)
            })
            .buffer_unordered(128)
            .collect()
            .await
    };
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let mut sockets = Vec::with_capacity(n);
    let mut per_chat = vec![0u64; chats_n];
    for (chat, r) in conns {
        if let Ok(ws) = r {
            per_chat[chat] += 1;
            sockets.push((chat, ws));
        }
    }
    let connected = sockets.len();
    let connect_errors = counters.errors.load(Ordering::Relaxed);
    if connected == 0 {
        anyhow::bail!("fanout: no socket connected: {:?}", counters.first_errors());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.check_alive()?;
    let api_after = procs::rss_kib(api_pid);
    let own_after = procs::rss_kib(std::process::id());
    let kib_per_socket = api_after.saturating_sub(api_before) as f64 / connected as f64;
    let own_kib_per_socket = own_after.saturating_sub(own_before) as f64 / connected as f64;
    eprintln!(
        "fanout: {connected} connected in {connect_secs:.1}s; API RSS {api_before} → {api_after} KiB"
    );

    // Receivers.
    let publish_end = Instant::now() + Duration::from_secs(secs);
    let read_end = publish_end + Duration::from_secs(3);
    let received = Arc::new(AtomicU64::new(0));
    let closes = Arc::new(Counters::default());
    let mut readers = Vec::with_capacity(connected);
    for (_, mut ws) in sockets {
        let received = received.clone();
        let closes = closes.clone();
        readers.push(tokio::spawn(async move {
            let mut samples = Samples::with_capacity(256);
            loop {
                match tokio::time::timeout_at(read_end.into(), ws.next()).await {
                    Err(_) => break,
                    Ok(Some(Ok(Message::Text(t)))) => {
                        if let Some(sent) = stamp(t.as_str()) {
                            samples.record_us(now_us().saturating_sub(sent));
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Some(Ok(Message::Close(f)))) => {
                        closes.error(format!("closed by server: {f:?}"));
                        break;
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => {
                        closes.error(format!("ws: {e}"));
                        break;
                    }
                    Ok(None) => {
                        closes.error("ws: stream ended".into());
                        break;
                    }
                }
            }
            drop(ws);
            samples
        }));
    }

    // Baseline: one plain Redis subscriber of every chat channel.
    let pattern = Namespace::new(stack.ns.clone()).all_chat_channels();
    let client = redis::Client::open(REDIS_URL)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.psubscribe(&pattern).await?;
    let direct = tokio::spawn(async move {
        let mut samples = Samples::with_capacity(32_768);
        let mut stream = pubsub.on_message();
        while let Ok(Some(msg)) = tokio::time::timeout_at(read_end.into(), stream.next()).await {
            if let Ok(text) = msg.get_payload::<String>()
                && let Some(sent) = stamp(&text)
            {
                samples.record_us(now_us().saturating_sub(sent));
            }
        }
        samples
    });

    eprintln!("fanout: publishing {rate} events/s for {secs}s on {chats_n} chat channels");
    let cpu = CpuMeter::start(&stack.pids());
    let mut conn = ctx.env.redis.clone();
    let channels: Vec<String> = accounts
        .iter()
        .map(|a| Namespace::new(stack.ns.clone()).chat_channel(a.chats[0]))
        .collect();
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published = 0u64;
    let mut expected = 0u64;
    let mut last_print = Instant::now();
    while Instant::now() < publish_end {
        tick.tick().await;
        let mut pipe = redis::pipe();
        for _ in 0..per_tick {
            let chat = (published as usize) % chats_n;
            let payload = format!(
                "{{\"type\":\"bench\",{MARK}{},\"seq\":{published}}}",
                now_us()
            );
            pipe.cmd("PUBLISH")
                .arg(&channels[chat])
                .arg(payload)
                .ignore();
            expected += per_chat[chat];
            published += 1;
        }
        pipe.query_async::<()>(&mut conn).await?;
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "  [fanout] published={published} received={} closes={}",
                received.load(Ordering::Relaxed),
                closes.errors.load(Ordering::Relaxed)
            );
        }
    }
    let mut samples = Samples::with_capacity(expected as usize);
    for r in readers {
        if let Ok(s) = r.await {
            samples.merge(s);
        }
    }
    ctx.cpu("fanout", cpu.finish());
    let direct = direct.await.unwrap_or_default().summary();
    let got = samples.len() as u64;
    let lat = samples.summary();
    let closed = closes.errors.load(Ordering::Relaxed);
    stack.check_alive()?;
    stack.stop().await;

    let rep = &mut ctx.report;
    rep.push(
        Row::new(
            "fanout",
            &format!("API memory per idle socket ({connected} sockets)"),
            kib_per_socket,
            "KiB",
        )
        .baseline("bench memory per client socket", own_kib_per_socket)
        .target("<= 16 KiB", kib_per_socket <= 16.0),
    );
    rep.push(
        Row::new(
            "fanout",
            "events published/s (achieved)",
            published as f64 / secs as f64,
            "ev/s",
        )
        .baseline("requested", rate as f64),
    );
    rep.push(Row::new(
        "fanout",
        "connect rate",
        connected as f64 / connect_secs,
        "sockets/s",
    ));
    rep.push(
        Row::new(
            "fanout",
            &format!("publish→receive p50 ({rate} ev/s)"),
            lat.p50_ms,
            "ms",
        )
        .baseline("plain Redis subscriber p50", direct.p50_ms),
    );
    rep.push(
        Row::new(
            "fanout",
            &format!("publish→receive p99 ({rate} ev/s)"),
            lat.p99_ms,
            "ms",
        )
        .baseline("plain Redis subscriber p99", direct.p99_ms)
        .target("<= 20 ms", lat.p99_ms <= 20.0),
    );
    rep.push(
        Row::new("fanout", "publish→receive max", lat.max_ms, "ms")
            .baseline("plain Redis subscriber max", direct.max_ms),
    );
    rep.push(
        Row::new("fanout", "deliveries received", got as f64, "msgs")
            .baseline("expected (events × sockets of the chat)", expected as f64)
            .target("all", got == expected),
    );
    rep.push(
        Row::new(
            "fanout",
            "errors (connect failures + closes)",
            (connect_errors + closed) as f64,
            "",
        )
        .target("0", connect_errors + closed == 0),
    );
    rep.note(format!(
        "fanout: {connected} sockets over {chats_n} chats (~{} per chat); {published} events published ({rate}/s over {secs}s, round-robin over the chats), so each event reaches ~{} sockets and the API writes ~{} frames/s; latency = receive time − publish time, one clock (the bench's); API RSS {api_before} → {api_after} KiB",
        connected / chats_n,
        connected / chats_n,
        rate as usize * connected / chats_n
    ));
    if connect_errors + closed > 0 {
        rep.note(format!(
            "fanout errors: {:?} {:?}",
            counters.first_errors(),
            closes.first_errors()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::stamp;

    #[test]
    fn reads_the_publish_stamp() {
        assert_eq!(
            stamp("{\"type\":\"bench\",\"bench_t\":12345,\"seq\":1}"),
            Some(12345)
        );
        assert_eq!(stamp("{\"type\":\"user_message\"}"), None);
    }
}
