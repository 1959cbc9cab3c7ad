//! Baselines measured in the same run: `pgbench` (single-row inserts, or the read query) and
//! `redis-benchmark` (LPUSH on a key of the run's namespace).
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::Command;

use crate::env::{Env, PG_HOST, PG_PORT};
use crate::stats::{Samples, Summary};

/// What pgbench reported, and the percentiles of its per-transaction log.
pub struct PgBench {
    pub tps: f64,
    pub latency_avg_ms: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
}

/// Runs `pgbench -c clients -j 2 -T secs -n -l -f <script>` on the bench database; the
/// per-transaction log (`-l`, one file per thread) gives the latency percentiles.
pub async fn pgbench(
    env: &Env,
    name: &str,
    sql: &str,
    clients: usize,
    secs: u64,
) -> anyhow::Result<PgBench> {
    let script = env.dir.join(format!("{name}.sql"));
    std::fs::write(&script, format!("{sql}\n"))?;
    let log_prefix = format!("pgbench_{name}");
    let mut cmd = Command::new("pgbench");
    cmd.args(["-h", PG_HOST, "-p", &PG_PORT.to_string(), "-U", "postgres"])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &secs.to_string(),
            "-n",
            "-l",
            "--log-prefix",
            &log_prefix,
            "-f",
        ])
        .arg(&script)
        .current_dir(&env.dir)
        .arg(&env.db_name)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(secs + 60), cmd.output())
        .await
        .context("pgbench did not finish")?
        .context("running pgbench (is it installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no tps in pgbench output: {text}"))?;
    let latency_avg_ms = text
        .lines()
        .find(|l| l.starts_with("latency average = "))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let latencies = pgbench_log_latencies(&env.dir, &log_prefix)?;
    Ok(PgBench {
        tps,
        latency_avg_ms,
        latency_p50_ms: latencies.p50_ms,
        latency_p99_ms: latencies.p99_ms,
    })
}

/// Latencies from pgbench's transaction logs `<prefix>.<pid>[.<thread>]` in `dir` (third
/// field: the transaction's time in microseconds); the files are removed once read.
fn pgbench_log_latencies(dir: &std::path::Path, prefix: &str) -> anyhow::Result<Summary> {
    let mut samples = Samples::with_capacity(1 << 16);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{prefix}.")));
        if !is_log {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        for us in text
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        {
            samples.record_us(us);
        }
        std::fs::remove_file(&path)?;
    }
    if samples.len() == 0 {
        bail!("pgbench wrote no transaction log");
    }
    Ok(samples.summary())
}

/// Creates the scratch table of the insert baseline.
async fn scratch_table(env: &Env) -> anyhow::Result<()> {
    sqlx::query(
        "create table if not exists bench_scratch (
            id bigserial primary key, payload text not null, created_at timestamptz not null default now())",
    )
    .execute(&env.db)
    .await?;
    Ok(())
}

/// The ingest baseline: pgbench inserting one row per transaction into the scratch table
/// (created if need be), from `clients` clients for `secs` seconds.
pub async fn pgbench_insert(env: &Env, clients: usize, secs: u64) -> anyhow::Result<PgBench> {
    scratch_table(env).await?;
    pgbench(
        env,
        "insert",
        "insert into bench_scratch (payload) values ('bench message');",
        clients,
        secs,
    )
    .await
}

/// What redis-benchmark reported.
pub struct RedisBench {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// `redis-benchmark -c clients -n requests --csv -q LPUSH <ns key> x` (the same command as
/// `-t lpush`, on a key of this run's namespace so it is cleaned up).
pub async fn redis_lpush(env: &Env, clients: usize, requests: u64) -> anyhow::Result<RedisBench> {
    let key = format!("{}:redis-benchmark", env.base_ns);
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", "127.0.0.1", "-p", "6379"])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string()])
        .args(["--csv", "-q", "lpush", &key, "x"])
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .context("redis-benchmark did not finish")?
        .context("running redis-benchmark (is it installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    parse_redis_csv(&text).with_context(|| format!("unexpected redis-benchmark output: {text}"))
}

fn parse_redis_csv(text: &str) -> Option<RedisBench> {
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let line = text
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("\"lpush"))?;
    let fields: Vec<f64> = line
        .split("\",\"")
        .skip(1)
        .map(|f| f.trim_matches('"').parse().unwrap_or(0.0))
        .collect();
    Some(RedisBench {
        rps: *fields.first()?,
        p50_ms: fields.get(3).copied().unwrap_or(0.0),
        p99_ms: fields.get(5).copied().unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_benchmark_csv() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"lpush ns:rb x\",\"32258.06\",\"0.075\",\"0.016\",\"0.063\",\"0.087\",\"0.159\",\"3.535\"\n";
        let r = parse_redis_csv(text).unwrap();
        assert_eq!(r.rps, 32258.06);
        assert_eq!(r.p50_ms, 0.063);
        assert_eq!(r.p99_ms, 0.159);
    }
}
