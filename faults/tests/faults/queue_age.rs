//! The scaling signal (issue #18): the API's and every worker's `/metrics` tell how deep the
//! completion queue is and how long its oldest waiting job has waited
//! (`aichat_queue_oldest_job_age_seconds`), so workers can be scaled on it (README, "Scaling
//! workers"). Nobody taking jobs: the age grows; a worker drains the queue: it is 0 again.
use std::time::Duration;

use aichat_faults::client::missing_metrics;
use aichat_faults::{Env, eventually, fake_with_latency, worker_metrics_text};

const WORKER: &str = env!("CARGO_BIN_EXE_faults-worker");
const SCRAPER: &str = "scraper-token-0123456789";
const AGE: &str = "aichat_queue_oldest_job_age_seconds";
const WAITING: &str = "queue_jobs{state=\"waiting\"}";
const JOBS: usize = 4;
const WAIT: Duration = Duration::from_secs(30);

/// What one scrape says of the queue.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Reading {
    waiting: f64,
    age: f64,
}

impl Reading {
    /// The queue gauges of a Prometheus text; panics if they are missing.
    fn of(text: &str) -> Reading {
        let value = |series: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no `{series}` in:\n{text}"))
        };
        Reading {
            waiting: value(WAITING),
            age: value(AGE),
        }
    }
}

/// In-process APIs of other tests share this binary's recorder and set the same gauges at
/// their scrapes, so every check is a condition polled until it holds, never one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_waiting_jobs_age_grows_until_a_worker_drains_the_queue() {
    let env = Env::start(fake_with_latency(1000)).await;
    let (api, client) = env
        .api_client(&["--metrics-token", SCRAPER, "--send-rate-per-minute", "0"])
        .await;
    let api_reading = || async { Reading::of(&client.metrics(SCRAPER).await) };
    let described = [(AGE, "gauge"), ("queue_jobs", "gauge")];
    let text = client.metrics(SCRAPER).await;
    let missing = missing_metrics(&text, &described, &[&format!("{AGE} 0")]);
    assert!(missing.is_empty(), "no {missing:?} in:\n{text}");

    let alice = client.user("alice").await;
    for chat in client.ai_chats(&alice, JOBS).await {
        client.send_ok(&alice, chat, "hello").await;
    }
    // No worker runs: the jobs wait, and the oldest one's age grows.
    let queued = eventually(WAIT, "the API shows the queued jobs", || async {
        let reading = api_reading().await;
        (reading.waiting == JOBS as f64 && reading.age > 0.0).then_some(reading)
    })
    .await;
    eventually(WAIT, "the age on the API's /metrics grows", || async {
        let reading = api_reading().await;
        (reading.waiting == JOBS as f64 && reading.age > queued.age).then_some(())
    })
    .await;

    // One worker with one slot and a model answering in 1 s: the jobs behind the first wait,
    // and the worker's own /metrics tells the same.
    let mut worker = env
        .ready_worker_process(WORKER, &["--worker-concurrency", "1"])
        .await;
    let worker_reading = || async { Reading::of(&worker_metrics_text(worker.port).await) };
    let text = worker_metrics_text(worker.port).await;
    let missing = missing_metrics(&text, &described, &[]);
    assert!(missing.is_empty(), "no {missing:?} in:\n{text}");
    let behind = eventually(WAIT, "the worker shows jobs waiting", || async {
        let reading = worker_reading().await;
        (reading.waiting > 0.0 && reading.age > 0.0).then_some(reading)
    })
    .await;
    eventually(WAIT, "the age on the worker's /metrics grows", || async {
        let reading = worker_reading().await;
        (reading.waiting > 0.0 && reading.age > behind.age).then_some(())
    })
    .await;

    // Once the worker has taken every job, both read 0.
    let drained = Reading {
        waiting: 0.0,
        age: 0.0,
    };
    eventually(
        WAIT,
        "the worker's /metrics shows the queue drained",
        || async { (worker_reading().await == drained).then_some(()) },
    )
    .await;
    eventually(
        WAIT,
        "the API's /metrics shows the queue drained",
        || async { (api_reading().await == drained).then_some(()) },
    )
    .await;

    worker.sigterm();
    worker.wait(Duration::from_secs(10)).await;
    env.finish(api, []).await;
}
