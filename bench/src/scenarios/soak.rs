//! Soak: minutes of mixed load (paced sends answered by one worker, reads, open sockets
//! receiving the chats' events); samples the RSS of every child and counts errors.
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::env::{self, Stack};
use crate::load::{self, Counters, Progress};
use crate::procs::{self, CpuMeter};
use crate::report::Row;
use crate::scenarios::{Ctx, accepted_id, post_send};
use crate::seed;
use crate::stats::{self, Samples};

const CHATS: usize = 20;
const SENDERS: usize = 8;
const READERS: usize = 8;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let secs = ctx.opts.soak_secs;
    let sockets_n = if ctx.opts.quick { 50 } else { 200 };
    let sample_every = Duration::from_secs(if ctx.opts.quick { 2 } else { 5 });
    let mut stack = Stack::api(&ctx.env, "soak").await?;
    stack.start_fake(&ctx.env, 0, 100).await?;
    stack.add_worker(&ctx.env, 64).await?;
    let accounts = Arc::new(seed::accounts(&ctx.env.db, "soak", CHATS, 1).await?);
    let chats: Vec<i64> = accounts.iter().map(|a| a.chats[0]).collect();
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let half = start + Duration::from_secs(secs / 2);
    eprintln!(
        "soak: {secs}s: {SENDERS} senders (10/s each), {READERS} readers (20/s each), {sockets_n} sockets over {CHATS} chats"
    );
    let _progress = Progress::start("soak".into(), counters.clone());
    let cpu = CpuMeter::start(&stack.pids());

    let mut sockets = Vec::new();
    for i in 0..sockets_n {
        let a = &accounts[i % CHATS];
        let mut ws = load::ws_connect(stack.api_port, a.chats[0], &a.token)
            .await
            .map_err(|e| anyhow::anyhow!("soak ws: {e}"))?;
        let counters = counters.clone();
        sockets.push(tokio::spawn(async move {
            loop {
                match tokio::time::timeout_at(end.into(), ws.next()).await {
                    Err(_) => return,
                    Ok(Some(Ok(Message::Text(t)))) => {
                        if t.as_str().contains("\"type\":\"error\"") {
                            counters.error(format!("error event: {}", t.as_str()));
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => return counters.error(format!("ws: {e}")),
                    Ok(None) => return counters.error("ws: stream ended".into()),
                }
            }
        }));
    }

    let clients = Arc::new(Clients {
        http: load::http_client(SENDERS + READERS)?,
        api: stack.api_url(),
        accounts: accounts.clone(),
        last_ids: (0..CHATS).map(|_| AtomicI64::new(0)).collect(),
        end,
        half,
        counters: counters.clone(),
    });
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let clients = clients.clone();
        tasks.push(tokio::spawn(async move {
            let every = Duration::from_millis(100);
            let send = |c, seq| clients.send(s, c, seq);
            (clients.paced(s, SENDERS, every, send).await, true)
        }));
    }
    for r in 0..READERS {
        let clients = clients.clone();
        tasks.push(tokio::spawn(async move {
            let every = Duration::from_millis(50);
            let read = |c, _seq| clients.read(c);
            (clients.paced(r, READERS, every, read).await, false)
        }));
    }

    // RSS samples of every child.
    let pids = stack.pids();
    let mut rss: Vec<Vec<(f64, f64)>> = vec![Vec::new(); pids.len()];
    while Instant::now() < end {
        let t = start.elapsed().as_secs_f64();
        for (i, (_, pid)) in pids.iter().enumerate() {
            rss[i].push((t, procs::rss_kib(*pid) as f64));
        }
        stack.check_alive()?;
        tokio::time::sleep(
            sample_every
                .min(end.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(10)),
        )
        .await;
    }
    let t = start.elapsed().as_secs_f64();
    for (i, (_, pid)) in pids.iter().enumerate() {
        rss[i].push((t, procs::rss_kib(*pid) as f64));
    }
    let mut send_lat = [Samples::default(), Samples::default()];
    let mut read_lat = [Samples::default(), Samples::default()];
    for task in tasks {
        if let Ok(([a, b], is_send)) = task.await {
            let dst = if is_send {
                &mut send_lat
            } else {
                &mut read_lat
            };
            dst[0].merge(a);
            dst[1].merge(b);
        }
    }
    for s in sockets {
        let _ = s.await;
    }
    ctx.cpu("soak", cpu.finish());
    // Let the last replies land, then count what is still unanswered.
    let drain_end = Instant::now() + Duration::from_secs(15);
    let mut unanswered = env::queued_in(&ctx.env.db, &chats).await?;
    while unanswered > 0 && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        unanswered = env::queued_in(&ctx.env.db, &chats).await?;
    }
    stack.check_alive()?;
    // Replies in progress and announcement markers live only while a reply is pending: once
    // every message is answered, none of the namespace's is left (Redis back to its size).
    let leftover = leftover_reply_keys(&mut ctx.env.redis.clone(), &stack.ns).await?;
    stack.stop().await;

    let errors = counters.errors.load(Ordering::Relaxed);
    let rep = &mut ctx.report;
    for (i, (name, _)) in pids.iter().enumerate() {
        let points = &rss[i];
        let first = points.first().map(|p| p.1).unwrap_or(0.0);
        let last = points.last().map(|p| p.1).unwrap_or(0.0);
        let max = points.iter().map(|p| p.1).fold(0.0, f64::max);
        let mid = points.len() / 2;
        let second_half = &points[mid..];
        let mid_v = second_half.first().map(|p| p.1).unwrap_or(0.0);
        // KiB per minute over the second half (the first holds the warm-up growth).
        let slope = stats::slope(second_half) * 60.0;
        let growth = if mid_v > 0.0 {
            (last - mid_v) / mid_v
        } else {
            0.0
        };
        let mib = |what: &str, kib: f64| {
            Row::new("soak", &format!("{name} RSS {what}"), kib / 1024.0, "MiB")
        };
        rep.push(mib("start", first));
        rep.push(mib("max", max));
        rep.push(
            mib("end", last)
                .baseline("RSS at half time", mid_v / 1024.0)
                .target("flat: second half +<= 5%", growth <= 0.05),
        );
        rep.push(Row::new(
            "soak",
            &format!("{name} RSS slope, 2nd half"),
            slope,
            "KiB/min",
        ));
    }
    let [s1, s2] = send_lat;
    let [r1, r2] = read_lat;
    let (s1, s2, r1, r2) = (s1.summary(), s2.summary(), r1.summary(), r2.summary());
    rep.push(
        Row::new("soak", "send p99, 2nd half", s2.p99_ms, "ms")
            .baseline("send p99, 1st half", s1.p99_ms),
    );
    rep.push(
        Row::new("soak", "read p99, 2nd half", r2.p99_ms, "ms")
            .baseline("read p99, 1st half", r1.p99_ms),
    );
    rep.push(Row::new(
        "soak",
        "requests ok",
        (s1.count + s2.count + r1.count + r2.count) as f64,
        "",
    ));
    rep.push(Row::new("soak", "errors", errors as f64, "").target("0", errors == 0));
    rep.push(
        Row::new(
            "soak",
            "Redis keys of pending replies left after the end",
            leftover as f64,
            "",
        )
        .target("0", leftover == 0 || unanswered > 0),
    );
    rep.push(
        Row::new(
            "soak",
            "messages unanswered 15 s after the end",
            unanswered as f64,
            "",
        )
        .target("0", unanswered == 0),
    );
    if errors > 0 {
        rep.note(format!("soak errors: {:?}", counters.first_errors()));
    }
    Ok(())
}

/// What the soak's HTTP clients share: the API, the chats (one per account) and the newest
/// message id sent into each, when to stop, where the second half starts, the counters.
struct Clients {
    http: reqwest::Client,
    api: String,
    accounts: Arc<Vec<seed::Account>>,
    last_ids: Vec<AtomicI64>,
    end: Instant,
    half: Instant,
    counters: Arc<Counters>,
}

impl Clients {
    /// Client `client` of `clients`: every `every` until the end, `op(chat, seq)` on chat
    /// `(client + seq × clients) mod CHATS` (`seq` counts from 1); the latencies of its
    /// successes, those of the first half apart from those of the second.
    async fn paced<F, Fut>(
        &self,
        client: usize,
        clients: usize,
        every: Duration,
        op: F,
    ) -> [Samples; 2]
    where
        F: Fn(usize, usize) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let mut lat = [Samples::default(), Samples::default()];
        let mut tick = tokio::time::interval(every);
        let mut seq = 0usize;
        while Instant::now() < self.end {
            tick.tick().await;
            let c = (client + seq * clients) % CHATS;
            seq += 1;
            let t = Instant::now();
            match op(c, seq).await {
                Ok(()) => {
                    lat[usize::from(Instant::now() >= self.half)].record(t.elapsed());
                    self.counters.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => self.counters.error(e),
            }
        }
        lat
    }

    /// Sender `s` sends its `seq`th message into chat `c` (202 expected) and notes its id.
    async fn send(&self, s: usize, c: usize, seq: usize) -> Result<(), String> {
        let a = &self.accounts[c];
        let content = format!("soak {s}-{seq}");
        let resp = post_send(&self.http, &self.api, &a.token, a.chats[0], content).await;
        if let Some(id) = accepted_id(resp).await? {
            self.last_ids[c].fetch_max(id, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads the 50 messages of chat `c` after its newest sent id less 100 (200 expected).
    async fn read(&self, c: usize) -> Result<(), String> {
        let a = &self.accounts[c];
        let after = (self.last_ids[c].load(Ordering::Relaxed) - 100).max(0);
        let resp = self
            .http
            .get(format!(
                "{}/api/ai/chats/{}/messages/?after_id={after}&limit=50",
                self.api, a.chats[0]
            ))
            .bearer_auth(&a.token)
            .send()
            .await;
        match load::expect_status(resp, 200).await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

/// Keys of the namespace that exist only while a reply is pending: replies in progress
/// (`partial`) and announcement markers (`announce`).
async fn leftover_reply_keys(
    redis: &mut redis::aio::MultiplexedConnection,
    ns: &str,
) -> anyhow::Result<usize> {
    let mut left = 0;
    for kind in ["partial", "announce"] {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{ns}:{kind}:*"))
            .query_async(redis)
            .await?;
        left += keys.len();
    }
    Ok(left)
}
