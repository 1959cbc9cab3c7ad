//! The queue consumer: the apalis monitor that takes completion jobs from Redis, its queue
//! configuration, and its restarts (with a growing pause) whenever its poll loop dies.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use apalis::prelude::{
    BackendExt, Event, Monitor, ParallelizeExt, Strategy, WorkerBuilder, WorkerBuilderExt,
};
use apalis_redis::RedisStorage;
use rand::Rng;
use redis::aio::ConnectionManager;

use aichat_shared::backoff::Backoff;
use aichat_shared::jobs;

use crate::job;
use crate::metrics;
use crate::settings::Settings;
use crate::state::JobContext;

/// Longest pause before a worker that lost Redis tries again.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
const RESTART_BACKOFF: Backoff = Backoff::new(Duration::from_millis(250), MAX_RESTART_DELAY);

/// Most tasks one fetch takes from the queue. A fetch is one Lua round trip, so a worker with
/// many free slots fills them a batch per trip rather than a slot per trip; the batch stays
/// small so fetched tasks do not wait long in this worker's buffer for a slot.
const FETCH_BATCH: usize = 8;

/// The queue configuration of this worker: the shared one plus heartbeats and batch size.
pub fn queue_config(settings: &Settings) -> apalis_redis::Config {
    // apalis heart-beats only while nothing fetched waits in its buffer, so
    // `Stopping::keep_alive` refreshes the registration on its own, and a full worker holding
    // a batch is not taken for dead.
    jobs::queue_config(&settings.redis.namespace())
        .batch_size(FETCH_BATCH.min(settings.jobs_taken_at_once()).max(1))
        .heartbeat_interval(settings.heartbeat_interval())
        .missed_heartbeats(usize::try_from(settings.worker_missed_heartbeats).unwrap_or(2))
}

/// The apalis monitor running one queue consumer, restarted (with a growing pause) whenever
/// its poll loop dies, e.g. because Redis went away. `ready` turns true at the consumer's
/// first heartbeat and false whenever it fails.
pub fn monitor(
    settings: &Settings,
    redis: ConnectionManager,
    jobs: Arc<JobContext>,
    ready: Arc<AtomicBool>,
) -> Monitor {
    let config = queue_config(settings);
    let poll = settings.poll_interval();
    let concurrency = settings.jobs_taken_at_once();
    let prefix = settings
        .worker_name_prefix
        .clone()
        .unwrap_or_else(host_name);
    // Failures since the last successful heartbeat: what the pause before a restart grows
    // with (apalis' own restart count never goes down).
    let failures = Arc::new(AtomicU32::new(0));
    let (failed, recovered) = (failures.clone(), failures.clone());
    let on_restart = ready.clone();
    let stopping = jobs.stopping.clone();
    let pushed = jobs.jobs_pushed.clone();
    Monitor::new()
        .register(move |restarts| {
            let pause = restart_delay(failures.load(Ordering::SeqCst));
            let probe = redis.clone();
            let backend = RedisStorage::<serde_json::Value>::new(redis.clone())
                .with_config(config.clone())
                .before_start(move |_| {
                    let probe = probe.clone();
                    async move {
                        if !pause.is_zero() {
                            tracing::info!(
                                restarts,
                                pause_ms = pause.as_millis() as u64,
                                "restarting the queue consumer"
                            );
                            restart_pause(probe, pause).await;
                        }
                        Ok(())
                    }
                })
                // An empty queue is looked at again when jobs are pushed, and every `poll`
                // whatever happens (`jobs_pushed.rs`).
                .poll_with_strategy(Strategy::new().stream(pushed.clone()).interval(poll));
            let name = worker_name(&prefix, restarts);
            stopping.register_name(&name);
            WorkerBuilder::new(name)
                .backend(backend)
                .data(jobs.clone())
                .concurrency(concurrency)
                .parallelize(tokio::spawn)
                .catch_panic()
                .build(job::answer_message)
        })
        .should_restart(move |worker, error| {
            tracing::error!(worker = worker.name(), %error, "queue consumer failed; restarting");
            on_restart.store(false, Ordering::SeqCst);
            failed.fetch_add(1, Ordering::SeqCst);
            metrics::worker_restart();
            true
        })
        .on_event(move |worker, event| match event {
            // Sent once the worker is registered in Redis, then on every heartbeat.
            Event::HeartBeat => {
                recovered.store(0, Ordering::SeqCst);
                if !ready.swap(true, Ordering::SeqCst) {
                    tracing::info!(worker = worker.name(), "taking jobs");
                }
            }
            Event::Error(error) => {
                tracing::debug!(worker = worker.name(), %error, "job ended with an error");
            }
            _ => {}
        })
}

/// Unique per process and per restart: apalis refuses a name seen alive within the orphan
/// window, even after a clean stop.
fn worker_name(prefix: &str, restarts: usize) -> String {
    let suffix: u32 = rand::rng().random();
    format!("{prefix}-{}-{restarts}-{suffix:08x}", std::process::id())
}

/// Pause before restarting after `failures` failures in a row: none for a first start, then
/// 250 ms doubling up to 30 s, half of it random (workers that lost Redis together do not
/// return together).
pub fn restart_delay(failures: u32) -> Duration {
    RESTART_BACKOFF.delay_at_least_half(failures)
}

/// Sleeps `pause` before a restart, but ends early once Redis, unreachable at some point of
/// the pause, answers again: after an outage the consumer comes back within a quarter second
/// of Redis instead of sitting out a backoff that grew while Redis was away. When Redis stays
/// reachable (the consumer failed for another reason) the whole pause applies.
async fn restart_pause(mut redis: ConnectionManager, pause: Duration) {
    let deadline = tokio::time::Instant::now() + pause;
    let mut was_down = false;
    loop {
        let ping = tokio::time::timeout(
            Duration::from_secs(1),
            redis::cmd("PING").query_async::<String>(&mut redis),
        )
        .await;
        match ping {
            Ok(Ok(_)) if was_down => {
                tracing::info!("Redis answers again; restarting the queue consumer now");
                return;
            }
            Ok(Ok(_)) => {}
            _ => was_down = true,
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return;
        }
        tokio::time::sleep((deadline - now).min(Duration::from_millis(250))).await;
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "aichat-worker".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_differ_per_run() {
        assert_ne!(worker_name("h", 0), worker_name("h", 0));
        assert!(worker_name("host", 3).starts_with(&format!("host-{}-3-", std::process::id())));
    }

    #[test]
    fn restart_pauses_grow_and_stay_capped() {
        assert_eq!(restart_delay(0), Duration::ZERO);
        assert!(restart_delay(1) <= Duration::from_millis(250));
        assert!(restart_delay(1) >= Duration::from_millis(125));
        assert!(restart_delay(50) <= MAX_RESTART_DELAY);
        assert!(restart_delay(50) >= MAX_RESTART_DELAY / 2);
    }
}
