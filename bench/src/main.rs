//! aichat-bench: starts the real release binaries (API, worker, fake model) on loopback
//! against a scratch PostgreSQL database and Redis namespace, and measures ingest, pipeline,
//! `?wait` sends, concurrency, fan-out, reads and soak, each beside a baseline measured in the
//! same run.
mod baselines;
mod dbstats;
mod env;
mod load;
mod procs;
mod report;
mod scenarios;
mod seed;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use futures::FutureExt;

use crate::env::Env;
use crate::report::{Report, StatusRow};
use crate::scenarios::{ALL, Ctx, Opts};

#[derive(Debug, Parser)]
#[command(
    name = "aichat-bench",
    about = "Benchmarks the aichat release binaries on loopback"
)]
struct Cli {
    /// A few seconds per scenario and small counts (fan-out 500 clients, soak 20 s): for CI.
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Scenarios to run, comma-separated (ingest, pipeline, wait, concurrency, fanout, reads,
    /// soak). wait: 64 clients each in a closed loop of `send_message?wait=true` against a 1 s
    /// model (one worker, concurrency 128), answers/s beside 64 ÷ 1 s.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Directory holding aichat-api, aichat-worker and aichat-fake-llm.
    #[arg(long, default_value = "target/release")]
    release_dir: PathBuf,
    /// Soak length in minutes (default 16; 20 s with --quick).
    #[arg(long)]
    soak_minutes: Option<f64>,
    /// WebSocket clients of the fan-out scenario (default 10,000; 500 with --quick).
    #[arg(long)]
    fanout_clients: Option<usize>,
    /// Chats the fan-out sockets are spread over (default: one chat per socket, as AI chats
    /// are private; fewer chats make every event a broadcast to clients ÷ chats sockets).
    #[arg(long)]
    fanout_chats: Option<usize>,
    /// A setting for every API the scenarios start, `KEY=VALUE`, over the bench's own
    /// (repeatable): to measure a setting against its default, e.g.
    /// `--api-env SEND_BATCH_WRITERS=1`.
    #[arg(long, value_parser = env::parse_setting)]
    api_env: Vec<(String, String)>,
    /// The same for every worker, e.g. `--worker-env DATABASE_MAX_CONNECTIONS=40`.
    #[arg(long, value_parser = env::parse_setting)]
    worker_env: Vec<(String, String)>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    for s in &cli.only {
        if !ALL.contains(&s.as_str()) {
            eprintln!("unknown scenario {s:?}; known: {}", ALL.join(", "));
            return ExitCode::from(2);
        }
    }
    let nofile = procs::raise_nofile(65_536);
    eprintln!("open-files limit: {nofile} (children inherit it)");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, nofile)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("aichat-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the scenarios; returns whether every one of them ran to the end.
async fn run(cli: Cli, nofile: u64) -> anyhow::Result<bool> {
    load::now_us();
    let opts = Opts::new(
        cli.quick,
        cli.soak_minutes,
        cli.fanout_clients,
        cli.fanout_chats,
    );
    if (opts.fanout_clients as u64) + 1024 > nofile {
        eprintln!(
            "warning: open-files limit {nofile} is low for {} fan-out clients",
            opts.fanout_clients
        );
    }
    let env = Env::create(
        cli.release_dir.clone(),
        env::Overrides {
            api: cli.api_env.clone(),
            worker: cli.worker_env.clone(),
        },
    )
    .await?;
    eprintln!(
        "bench database {}, namespace prefix {}, logs in {}",
        env.db_name,
        env.base_ns,
        env.dir.display()
    );
    let mut ctx = Ctx {
        env,
        opts,
        report: Report {
            quick: cli.quick,
            ..Report::default()
        },
        ingest_rps: None,
        pgbench_insert_tps: None,
    };
    let overrides = &ctx.env.overrides;
    if !overrides.api.is_empty() || !overrides.worker.is_empty() {
        let note = format!(
            "settings over the bench's own: API {:?}, workers {:?}",
            overrides.api, overrides.worker
        );
        eprintln!("{note}");
        ctx.report.note(note);
    }
    let selected: Vec<&str> = ALL
        .iter()
        .copied()
        .filter(|s| cli.only.is_empty() || cli.only.iter().any(|o| o == s))
        .collect();
    let interrupted = {
        let scenarios = run_scenarios(&mut ctx, &selected);
        tokio::select! {
            _ = scenarios => false,
            _ = tokio::signal::ctrl_c() => true,
        }
        // Dropping the scenario future kills its children (their guards' Drop).
    };
    if interrupted {
        ctx.report
            .failed_scenarios
            .push("interrupted (Ctrl-C)".into());
    }
    let Ctx { env, report, .. } = ctx;
    let cleanup = env.cleanup().await;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print_table();
    }
    cleanup?;
    Ok(report.failed_scenarios.is_empty())
}

async fn run_scenarios(ctx: &mut Ctx, selected: &[&str]) {
    for name in selected {
        eprintln!("== {name}");
        let result = std::panic::AssertUnwindSafe(run_one(ctx, name))
            .catch_unwind()
            .await;
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{name}: {e:#}")),
            Err(_) => Some(format!("{name}: panicked")),
        };
        if let Some(f) = failure {
            eprintln!("FAILED {f}");
            ctx.report.failed_scenarios.push(f);
        }
        // A figure measured over failed requests is not a figure: any 5xx fails the run.
        let statuses = StatusRow {
            scenario: (*name).to_owned(),
            statuses: load::take_non_2xx(),
        };
        eprintln!("  non-2xx [{name}]: {:?}", statuses.statuses);
        if let Some(f) = statuses.failure() {
            eprintln!("FAILED {f}");
            ctx.report.failed_scenarios.push(f);
        }
        ctx.report.non_2xx.push(statuses);
    }
}

async fn run_one(ctx: &mut Ctx, name: &str) -> anyhow::Result<()> {
    match name {
        "ingest" => scenarios::ingest::run(ctx).await,
        "pipeline" => scenarios::pipeline::run(ctx).await,
        "wait" => scenarios::wait::run(ctx).await,
        "concurrency" => scenarios::concurrency::run(ctx).await,
        "fanout" => scenarios::fanout::run(ctx).await,
        "reads" => scenarios::reads::run(ctx).await,
        "soak" => scenarios::soak::run(ctx).await,
        other => anyhow::bail!("unknown scenario {other}"),
    }
}
