//! The worker's Prometheus metrics: the process-wide recorder and one function per thing
//! counted, so metric names and labels live in one place.
use std::time::Duration;

use metrics::{counter, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::retry::FailureReason;

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

/// Conflict retries of the worker's writes (`db::retry`), by path.
pub const CONFLICT_PATHS: &[&str] = &["reply_batch", "reply", "mark_failed", "sweeper"];

/// Names every metric with its help text and registers each series whose labels are known at
/// start-up at zero, so the first scrape of an idle worker already lists them all (a counter
/// that appears only with its first event breaks `rate()` and alerts on absence).
/// The model-labelled series are registered for every allowed model (`models`): jobs only
/// ever call those.
pub fn describe(models: &[String]) {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!("aichat_worker_jobs_started_total", "Completion jobs taken");
    describe_counter!(
        "aichat_worker_jobs_succeeded_total",
        "Completion jobs that ended with a reply"
    );
    describe_counter!(
        "aichat_worker_jobs_failed_total",
        "Completion jobs that ended without a reply, by reason"
    );
    describe_counter!(
        "aichat_worker_jobs_skipped_total",
        "Completion jobs with nothing to do (message deleted, already answered), by reason"
    );
    describe_counter!(
        "aichat_worker_jobs_requeued_total",
        "Completion jobs handed back to the queue to run again"
    );
    describe_histogram!(
        "aichat_worker_job_duration_seconds",
        Unit::Seconds,
        "Time from taking a job to its end, by outcome"
    );
    describe_histogram!(
        "aichat_worker_model_latency_seconds",
        Unit::Seconds,
        "Model calls from request to the last chunk, by model and outcome"
    );
    describe_counter!(
        "aichat_worker_model_retries_total",
        "Model calls tried again, by model and reason"
    );
    describe_counter!(
        "aichat_worker_user_turn_waits_total",
        "Jobs that waited because their user had WORKER_PER_USER_CONCURRENCY jobs running"
    );
    describe_counter!(
        "aichat_worker_model_fallbacks_total",
        "Messages handed to the next model of a fallback list before any text came, by from, to and reason"
    );
    describe_counter!(
        "aichat_worker_rate_limit_waits_total",
        "Model calls that waited for the shared rate limit, by model"
    );
    describe_histogram!(
        "aichat_worker_rate_limit_wait_seconds",
        Unit::Seconds,
        "Time waited for the shared rate limit, by model"
    );
    describe_counter!(
        "aichat_worker_tokens_total",
        "Tokens the provider reported, by model and kind (prompt, completion)"
    );
    describe_counter!(
        "aichat_worker_duplicate_replies_total",
        "Replies another run of the same job had already saved"
    );
    describe_counter!(
        "aichat_worker_late_announcements_total",
        "Replies announced by a run of their job other than the one that saved them (which stopped, or was slower, before publishing)"
    );
    describe_counter!(
        "aichat_worker_restarts_total",
        "Restarts of the job loop after Redis trouble"
    );
    describe_counter!(
        "aichat_worker_db_retries_total",
        "Reply saves and failure marks tried again while PostgreSQL could not be reached or aborted them for a conflict"
    );
    describe_counter!(
        "aichat_worker_swept_messages_total",
        "Queued messages whose job was lost and that the sweeper queued again"
    );
    describe_histogram!(
        "aichat_worker_reply_batch_size",
        "Replies saved by one statement"
    );
    describe_histogram!(
        "aichat_worker_claim_batch_size",
        "Jobs that took their messages in one statement"
    );
    describe_counter!(
        "aichat_worker_context_cache_total",
        "Histories of jobs on a chat's active path, by whether the context cache held the turns before the new ones (hit) or the whole history was read (miss)"
    );
    aichat_shared::db::retry::describe(CONFLICT_PATHS);
    // The queue gauges, read at scrape time (`http.rs`): any worker tells the whole queue.
    aichat_shared::jobs::describe_queue_gauges();

    counter!("aichat_worker_jobs_started_total").increment(0);
    counter!("aichat_worker_jobs_succeeded_total").increment(0);
    counter!("aichat_worker_jobs_requeued_total").increment(0);
    for reason in ["undecodable", "aborted", "model", "too_long"] {
        counter!("aichat_worker_jobs_failed_total", "reason" => reason).increment(0);
    }
    for reason in ["message_gone", "already_answered"] {
        counter!("aichat_worker_jobs_skipped_total", "reason" => reason).increment(0);
    }
    for outcome in ["answered", "failed", "skipped", "aborted", "requeued"] {
        let _ = histogram!("aichat_worker_job_duration_seconds", "outcome" => outcome);
    }
    for model in models {
        let model = model.clone();
        let _ = histogram!("aichat_worker_model_latency_seconds", "model" => model.clone(), "outcome" => "ok");
        for reason in FailureReason::RETRIED {
            counter!("aichat_worker_model_retries_total", "model" => model.clone(), "reason" => reason.as_str())
                .increment(0);
        }
        counter!("aichat_worker_rate_limit_waits_total", "model" => model.clone()).increment(0);
        let _ = histogram!("aichat_worker_rate_limit_wait_seconds", "model" => model.clone());
        for kind in ["prompt", "completion"] {
            counter!("aichat_worker_tokens_total", "model" => model.clone(), "kind" => kind)
                .increment(0);
        }
    }
    counter!("aichat_worker_duplicate_replies_total").increment(0);
    counter!("aichat_worker_late_announcements_total").increment(0);
    counter!("aichat_worker_restarts_total").increment(0);
    counter!("aichat_worker_db_retries_total").increment(0);
    counter!("aichat_worker_swept_messages_total").increment(0);
    let _ = histogram!("aichat_worker_reply_batch_size");
    let _ = histogram!("aichat_worker_claim_batch_size");
    for outcome in ["hit", "miss"] {
        counter!("aichat_worker_context_cache_total", "outcome" => outcome).increment(0);
    }
}

pub fn context_cache(outcome: &'static str) {
    counter!("aichat_worker_context_cache_total", "outcome" => outcome).increment(1);
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

pub fn fallback(from: &str, to: &str, reason: &'static str) {
    counter!(
        "aichat_worker_model_fallbacks_total",
        "from" => from.to_owned(),
        "to" => to.to_owned(),
        "reason" => reason
    )
    .increment(1);
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

/// A reply announced by a later run of its job (the saver stopped before publishing).
pub fn late_announcement() {
    counter!("aichat_worker_late_announcements_total").increment(1);
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
pub fn claim_batch(size: usize) {
    histogram!("aichat_worker_claim_batch_size").record(size as f64);
}

pub fn reply_batch(size: usize) {
    histogram!("aichat_worker_reply_batch_size").record(size as f64);
}

pub fn user_turn_waited() {
    counter!("aichat_worker_user_turn_waits_total").increment(1);
}
