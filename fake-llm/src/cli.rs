//! Owns the binary's command line (flags with env fallbacks) and its stop signal.

use std::net::SocketAddr;

use clap::Parser;

use crate::config::{DEFAULT_HANG_MS, DEFAULT_MAX_RECORDED, DEFAULT_SEED, FakeConfig};

/// Fake OpenAI-compatible chat-completions server for tests, benchmarks and offline demos.
#[derive(Debug, Clone, Parser)]
#[command(name = "aichat-fake-llm", version, about)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long, env = "FAKE_LLM_ADDR", default_value = "127.0.0.1:8088")]
    pub addr: SocketAddr,
    /// Delay before response headers, in milliseconds.
    #[arg(long, env = "FAKE_LLM_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Delay before each streamed word chunk, in milliseconds.
    #[arg(long, env = "FAKE_LLM_CHUNK_DELAY_MS", default_value_t = 0)]
    pub chunk_delay_ms: u64,
    /// Fraction of requests (0.0-1.0) failing with a random 429, 500 or hang.
    #[arg(long, env = "FAKE_LLM_FAIL_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub fail_rate: f64,
    /// Seed of the failure PRNG.
    #[arg(long, env = "FAKE_LLM_SEED", default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Reply with this many lorem-ipsum words instead of echoing.
    #[arg(long, env = "FAKE_LLM_REPLY_WORDS")]
    pub reply_words: Option<usize>,
    /// Longest a hanging request is held, in milliseconds.
    #[arg(long, env = "FAKE_LLM_HANG_MS", default_value_t = DEFAULT_HANG_MS)]
    pub hang_ms: u64,
    /// Number of recorded requests kept in memory.
    #[arg(long, env = "FAKE_LLM_MAX_RECORDED", default_value_t = DEFAULT_MAX_RECORDED)]
    pub max_recorded: usize,
}

impl Cli {
    pub fn config(&self) -> FakeConfig {
        FakeConfig {
            latency_ms: self.latency_ms,
            chunk_delay_ms: self.chunk_delay_ms,
            fail_rate: self.fail_rate,
            seed: self.seed,
            always: None,
            hang_ms: self.hang_ms,
            reply_words: self.reply_words,
            reply: None,
            max_recorded: self.max_recorded,
            ..FakeConfig::default()
        }
    }
}

fn parse_rate(raw: &str) -> Result<f64, String> {
    let rate: f64 = raw.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("must be within 0.0..=1.0, got {rate}"))
    }
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM, the signal container runtimes send.
pub async fn stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
