//! `aichat-worker`: parse settings, start logging, build the worker, run until a signal.
/// glibc malloc was ~10 % of the machine's CPU in the pipeline benchmark (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aichat_worker::run_from_env().await
}
