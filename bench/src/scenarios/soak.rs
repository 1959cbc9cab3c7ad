//! Soak: minutes of mixed load (paced sends answered by one worker, reads, open sockets
//! receiving the chats' events); samples the RSS of every child and Redis's `used_memory`, and
//! counts errors.
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::env::{self, Stack};
use crate::load::{self, Counters, Progress};
use crate::procs::{self, CpuMeter};
use crate::report::{Report, Row};
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

    // RSS samples of every child, and Redis's used_memory (KiB) with them.
    let pids = stack.pids();
    let mut rss: Vec<Vec<(f64, f64)>> = vec![Vec::new(); pids.len()];
    let mut redis_mem: Vec<(f64, f64)> = Vec::new();
    let mut redis = ctx.env.redis.clone();
    // What the namespace's keys hold (used_memory is the whole server's), at half time.
    let mut ns_at_half: Option<KeyUsage> = None;
    while Instant::now() < end {
        let t = start.elapsed().as_secs_f64();
        for (i, (_, pid)) in pids.iter().enumerate() {
            rss[i].push((t, procs::rss_kib(*pid) as f64));
        }
        redis_mem.push((t, redis_used_memory(&mut redis).await? as f64 / 1024.0));
        if ns_at_half.is_none() && Instant::now() >= half {
            ns_at_half = Some(namespace_usage(&mut redis, &stack.ns).await?);
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
    redis_mem.push((t, redis_used_memory(&mut redis).await? as f64 / 1024.0));
    let ns_at_end = namespace_usage(&mut redis, &stack.ns).await?;
    let ns_at_half = ns_at_half.unwrap_or_default();
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
        push_memory_rows(rep, &format!("{name} RSS"), "RSS at half time", &rss[i]);
    }
    push_memory_rows(
        rep,
        "Redis used_memory",
        "used_memory at half time",
        &redis_mem,
    );
    let total = |u: &KeyUsage| u.values().map(|(_, bytes)| *bytes).sum::<u64>() as f64;
    rep.push(
        Row::new(
            "soak",
            "Redis memory of the soak namespace's keys, end",
            total(&ns_at_end) / (1024.0 * 1024.0),
            "MiB",
        )
        .baseline("at half time", total(&ns_at_half) / (1024.0 * 1024.0)),
    );
    rep.note(format!(
        "soak: Redis used_memory is the whole server's (other users of it count too); the soak namespace's keys by kind (MEMORY USAGE), half time → end: {}",
        usage_growth(&ns_at_half, &ns_at_end)
    ));
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

/// The window whose peak stands for a memory series at one time: a minute, two of the
/// sweeper's 30 s periods, so that Redis's sawtooth (finished jobs and their keys pile up, then
/// a sweep trims them) is compared peak to peak rather than at whatever phase two single
/// samples fell; half the soak when it is shorter than two minutes (`--quick`).
const PEAK_WINDOW_SECS: f64 = 60.0;

/// The rows of one memory series of `(seconds, KiB)` points: start, max and end; the peak of
/// the last window beside the peak of the window up to half time (target: the second half grows
/// by at most 5%); and the second half's slope.
fn push_memory_rows(rep: &mut Report, what: &str, at_half: &str, points: &[(f64, f64)]) {
    let first = points.first().map(|p| p.1).unwrap_or(0.0);
    let last = points.last().map(|p| p.1).unwrap_or(0.0);
    let max = points.iter().map(|p| p.1).fold(0.0, f64::max);
    let second_half = &points[points.len() / 2..];
    // KiB per minute over the second half (the first holds the warm-up growth).
    let slope = stats::slope(second_half) * 60.0;
    let (at_half_peak, end_peak) = peaks(points);
    let growth = if at_half_peak > 0.0 {
        (end_peak - at_half_peak) / at_half_peak
    } else {
        0.0
    };
    let mib =
        |when: &str, kib: f64| Row::new("soak", &format!("{what} {when}"), kib / 1024.0, "MiB");
    rep.push(mib("start", first));
    rep.push(mib("max", max));
    rep.push(mib("end", last));
    rep.push(
        mib("peak, last minute", end_peak)
            .baseline(
                &format!("{at_half}, peak of its minute"),
                at_half_peak / 1024.0,
            )
            .target("flat: second half +<= 5%", growth <= 0.05),
    );
    rep.push(Row::new(
        "soak",
        &format!("{what} slope, 2nd half"),
        slope,
        "KiB/min",
    ));
}

/// The peaks of `points` in the window up to half time and in the last window
/// ([`PEAK_WINDOW_SECS`], or half the series' span when that is shorter).
fn peaks(points: &[(f64, f64)]) -> (f64, f64) {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return (0.0, 0.0);
    };
    let half = first.0 + (last.0 - first.0) / 2.0;
    let window = PEAK_WINDOW_SECS.min(half - first.0);
    let peak_in = |from: f64, to: f64| {
        points
            .iter()
            .filter(|p| p.0 >= from && p.0 <= to)
            .map(|p| p.1)
            .fold(0.0, f64::max)
    };
    (
        peak_in(half - window, half),
        peak_in(last.0 - window, last.0),
    )
}

/// Redis's `used_memory` (bytes) from `INFO memory`: the whole server's, so other users of the
/// same Redis count too.
async fn redis_used_memory(redis: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(redis).await?;
    parse_used_memory(&info).ok_or_else(|| anyhow::anyhow!("no used_memory in INFO memory"))
}

/// Keys of a namespace by kind (the key less the namespace, its ids written `*`): how many,
/// and their bytes (`MEMORY USAGE`).
type KeyUsage = std::collections::BTreeMap<String, (u64, u64)>;

/// The namespace's keys by kind, from a SCAN of `{ns}:*` and `MEMORY USAGE` of each key.
async fn namespace_usage(
    redis: &mut redis::aio::MultiplexedConnection,
    ns: &str,
) -> anyhow::Result<KeyUsage> {
    let mut usage = KeyUsage::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{ns}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        if !keys.is_empty() {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("MEMORY").arg("USAGE").arg(key);
            }
            let sizes: Vec<Option<u64>> = pipe.query_async(redis).await?;
            for (key, size) in keys.iter().zip(sizes) {
                let entry = usage.entry(key_kind(ns, key)).or_default();
                entry.0 += 1;
                entry.1 += size.unwrap_or(0);
            }
        }
        if next == 0 {
            return Ok(usage);
        }
        cursor = next;
    }
}

/// A key's kind: the key less `{ns}:`, with each segment that is an id (all digits, or longer
/// than 16 characters: task ids, hashes) written `*`.
fn key_kind(ns: &str, key: &str) -> String {
    let rest = key
        .strip_prefix(ns)
        .and_then(|r| r.strip_prefix(':'))
        .unwrap_or(key);
    let segments: Vec<&str> = rest
        .split(':')
        .map(|seg| {
            if (!seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit())) || seg.len() > 16 {
                "*"
            } else {
                seg
            }
        })
        .collect();
    segments.join(":")
}

/// The kinds that grew most from `half` to `end` (at most 8): `kind keys (KiB) → keys (KiB)`.
fn usage_growth(half: &KeyUsage, end: &KeyUsage) -> String {
    let mut kinds: Vec<_> = end
        .iter()
        .map(|(kind, e)| (kind, half.get(kind).copied().unwrap_or((0, 0)), *e))
        .collect();
    kinds.sort_by_key(|(_, h, e)| std::cmp::Reverse(e.1 as i64 - h.1 as i64));
    let parts: Vec<String> = kinds
        .iter()
        .take(8)
        .map(|(kind, h, e)| {
            format!(
                "{kind} {} ({:.0} KiB) → {} ({:.0} KiB)",
                h.0,
                h.1 as f64 / 1024.0,
                e.0,
                e.1 as f64 / 1024.0
            )
        })
        .collect();
    if parts.is_empty() {
        "no keys".into()
    } else {
        parts.join("; ")
    }
}

fn parse_used_memory(info: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.trim_end().strip_prefix("used_memory:"))
        .and_then(|v| v.parse().ok())
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

#[cfg(test)]
mod tests {
    use super::{key_kind, parse_used_memory, peaks};

    #[test]
    fn key_kinds_write_ids_as_stars() {
        let ns = "aichat_bench_0123_soak";
        assert_eq!(key_kind(ns, &format!("{ns}:chat:42")), "chat:*");
        assert_eq!(key_kind(ns, &format!("{ns}:history:v1:42")), "history:v1:*");
        assert_eq!(
            key_kind(
                ns,
                &format!("{ns}:jobs:completion:message:7:rescue:01JABCDEFGHJKMNPQRSTVWXYZ0")
            ),
            "jobs:completion:message:*:rescue:*"
        );
    }

    #[test]
    fn a_sawtooth_sampled_at_other_phases_is_flat_and_a_climb_is_not() {
        // Up 1 MiB over each 30 s period, then back to the floor, sampled every 5 s for 475 s:
        // the sample at half time is at the floor, the last one near the top.
        let saw: Vec<(f64, f64)> = (0..=95)
            .map(|i| {
                let t = f64::from(i) * 5.0;
                (t, 4096.0 + 1024.0 * ((t % 30.0) / 30.0))
            })
            .collect();
        let single_samples = saw[saw.len() / 2].1 / saw[saw.len() - 1].1;
        assert!(single_samples < 0.9, "{single_samples}");
        let (at_half, end) = peaks(&saw);
        assert!((end - at_half).abs() / at_half < 0.01, "{at_half} {end}");
        let climb: Vec<(f64, f64)> = saw.iter().map(|&(t, kib)| (t, kib + 10.0 * t)).collect();
        let (at_half, end) = peaks(&climb);
        assert!((end - at_half) / at_half > 0.3, "{at_half} {end}");
    }

    #[test]
    fn used_memory_from_info_memory() {
        let info = "# Memory\r\nused_memory:1056784\r\nused_memory_human:1.01M\r\nused_memory_rss:5836800\r\n";
        assert_eq!(parse_used_memory(info), Some(1_056_784));
        assert_eq!(parse_used_memory("# Memory\r\n"), None);
    }
}
