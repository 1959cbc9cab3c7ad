//! `aichat-worker`: parse settings, start logging, build the worker, run until a signal.
use clap::Parser;

use aichat_shared::{config, telemetry};
use aichat_worker::{Settings, Worker, shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    config::load_dotenv();
    let settings = Settings::parse();
    telemetry::init(&settings.log);
    tracing::debug!(?settings, "settings");
    let worker = Worker::build(settings).await?;
    worker.run_until(shutdown_signal()).await
}
