//! The `aichat-worker` binary's entry point, built inside this package so the fault tests can
//! find it with `env!("CARGO_BIN_EXE_faults-worker")` and cargo keeps it current: the tests
//! SIGKILL and SIGTERM it as a real process.
//!
//! With `FAULTS_DIE_AFTER_SAVE` set, the process exits at once (status 70, no destructor
//! or graceful stop runs) right after it commits its first reply, before announcing it. With
//! `FAULTS_PAUSE_AFTER_FAILURE_MS` set, a run that recorded its message's failure waits that
//! long before its job ends (the job stays alive, unacknowledged, meanwhile).
use std::sync::Arc;
use std::time::Duration;

use aichat_worker::Hooks;

/// The environment variable that arms the death after the first save.
const DIE_AFTER_SAVE: &str = "FAULTS_DIE_AFTER_SAVE";
/// The environment variable that holds a failed job alive, in milliseconds.
const PAUSE_AFTER_FAILURE_MS: &str = "FAULTS_PAUSE_AFTER_FAILURE_MS";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut hooks = Hooks::default();
    if std::env::var_os(DIE_AFTER_SAVE).is_some() {
        hooks.after_save = Some(Arc::new(|| std::process::exit(70)));
    }
    if let Some(ms) = std::env::var(PAUSE_AFTER_FAILURE_MS)
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        hooks.after_failure = Some(Arc::new(move || {
            Box::pin(tokio::time::sleep(Duration::from_millis(ms)))
        }));
    }
    aichat_worker::run_from_env_with_hooks(hooks).await
}
