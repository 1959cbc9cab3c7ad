//! The worker's Prometheus metrics: the process-wide recorder and one function per thing
//! counted, so metric names and labels live in one place.
use std::time::Duration;

use metrics::{counter, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The process-wide recorder (shared with anything else in the process, such as an API in
/// tests) and the handle that renders it.
pub fn install() -> PrometheusHandle {
    match aichat_shared::telemetry::prometheus() {
        Some(handle) => handle.clone(),
        None => {
            tracing::warn!("no metrics recorder could be installed; /metrics will be empty");
            PrometheusBuilder::new().build_recorder().handle()
        }
    }
}

pub fn job_started() {
    counter!("aichat_worker_jobs_started_total").increment(1);
}

/// How long one run of a job took, from taking it to its end, by outcome.
pub fn job_duration(outcome: &'static str, elapsed: Duration) {
    histogram!("aichat_worker_job_duration_seconds", "outcome" => outcome)
        .record(elapsed.as_secs_f64());
}

pub fn job_succeeded() {
    counter!("aichat_worker_jobs_succeeded_total").increment(1);
}

/// A job that ended without a reply; `reason` is a short fixed word.
pub fn job_failed(reason: &'static str) {
    counter!("aichat_worker_jobs_failed_total", "reason" => reason).increment(1);
}

/// A job with nothing to do (message deleted, already answered).
pub fn job_skipped(reason: &'static str) {
    counter!("aichat_worker_jobs_skipped_total", "reason" => reason).increment(1);
}

/// A job that must run again later (database or Redis trouble, shutdown).
pub fn job_requeued() {
    counter!("aichat_worker_jobs_requeued_total").increment(1);
}

/// One model call, from request to the last chunk (or the error).
pub fn model_call(model: &str, outcome: &'static str, elapsed: Duration) {
    histogram!(
        "aichat_worker_model_latency_seconds",
        "model" => model.to_owned(),
        "outcome" => outcome
    )
    .record(elapsed.as_secs_f64());
}

pub fn retry(model: &str, reason: &'static str) {
    counter!("aichat_worker_model_retries_total", "model" => model.to_owned(), "reason" => reason)
        .increment(1);
}

pub fn rate_limit_wait(model: &str, waited: Duration) {
    counter!("aichat_worker_rate_limit_waits_total", "model" => model.to_owned()).increment(1);
    histogram!("aichat_worker_rate_limit_wait_seconds", "model" => model.to_owned())
        .record(waited.as_secs_f64());
}

pub fn tokens(model: &str, prompt: u64, completion: u64) {
    counter!("aichat_worker_tokens_total", "model" => model.to_owned(), "kind" => "prompt")
        .increment(prompt);
    counter!("aichat_worker_tokens_total", "model" => model.to_owned(), "kind" => "completion")
        .increment(completion);
}

/// A reply another run of the same job had already saved.
pub fn duplicate_reply() {
    counter!("aichat_worker_duplicate_replies_total").increment(1);
}

pub fn worker_restart() {
    counter!("aichat_worker_restarts_total").increment(1);
}

pub fn save_retry() {
    counter!("aichat_worker_db_retries_total").increment(1);
}

pub fn swept(count: u64) {
    counter!("aichat_worker_swept_messages_total").increment(count);
}

/// Replies saved by one statement (`reply_batch.rs`).
pub fn reply_batch(size: usize) {
    histogram!("aichat_worker_reply_batch_size").record(size as f64);
}
