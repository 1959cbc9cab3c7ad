//! The `aichat-worker` binary's entry point, built inside this package so the fault tests can
//! find it with `env!("CARGO_BIN_EXE_faults-worker")` and cargo keeps it current: the tests
//! SIGKILL and SIGTERM it as a real process.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aichat_worker::run_from_env().await
}
