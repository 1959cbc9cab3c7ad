//! Entry point of the `aichat-fake-llm` binary: parse flags, serve until a stop signal.

use aichat_fake_llm::{FakeLlm, cli};
use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = cli::Cli::parse();
    let fake = FakeLlm::start_on(args.addr, args.config()).await?;
    tracing::info!(
        "fake OpenAI-compatible model listening on {}",
        fake.base_url()
    );
    cli::stop_signal().await?;
    tracing::info!("shutting down");
    fake.shutdown().await
}
