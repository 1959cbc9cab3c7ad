//! The `aichat-worker` binary's entry point, built inside this package so the fault tests can
//! find it with `env!("CARGO_BIN_EXE_faults-worker")` and cargo keeps it current: the tests
//! SIGKILL and SIGTERM it as a real process.
//!
//! With `FAULTS_DIE_AFTER_SAVE` set, the process exits at once (status 70, no destructor
//! or graceful stop runs) right after it commits its first reply, before announcing it.
use std::sync::Arc;

use aichat_worker::Hooks;

/// The environment variable that arms the death after the first save.
const DIE_AFTER_SAVE: &str = "FAULTS_DIE_AFTER_SAVE";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut hooks = Hooks::default();
    if std::env::var_os(DIE_AFTER_SAVE).is_some() {
        hooks.after_save = Some(Arc::new(|| std::process::exit(70)));
    }
    aichat_worker::run_from_env_with_hooks(hooks).await
}
