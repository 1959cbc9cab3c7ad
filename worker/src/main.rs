//! `aichat-worker`: parse settings, start logging, build the worker, run until a signal.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aichat_worker::run_from_env().await
}
