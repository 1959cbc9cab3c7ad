//! The worker's small HTTP server: `/healthz` (200 once the worker is registered and taking
//! jobs, 503 before and while it restarts) and Prometheus `/metrics`, with the queue's gauges
//! read at scrape time.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use aichat_shared::jobs::JobQueue;

#[derive(Clone)]
pub struct HttpState {
    pub ready: Arc<AtomicBool>,
    pub metrics: PrometheusHandle,
    /// Read at every scrape: the depth and the oldest waiting job's age.
    pub queue: JobQueue,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

async fn healthz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn render_metrics(State(state): State<HttpState>) -> impl IntoResponse {
    state.queue.record_queue_gauges().await;
    state.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
