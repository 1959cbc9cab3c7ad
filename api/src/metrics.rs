//! Prometheus metrics of the API: requests by route and status with latency, open sockets,
//! and the completion queue's depth and oldest waiting job read from Redis at scrape time.
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret;

use aichat_shared::telemetry;

use crate::auth::{hash_token, request_token, user_for_token};
use crate::error::ApiError;
use crate::state::AppState;

/// Conflict retries of the API's writes (`db::retry`), by path.
pub const CONFLICT_PATHS: &[&str] = &["send_batch", "send", "send_cleanup"];

/// Names every metric with its help text and registers each series whose labels are known at
/// start-up at zero, so the first scrape of an idle API already lists them all. The request
/// metrics are labelled by route and status, known only once answered: their first series is
/// the one a load balancer makes first, `GET /healthz` answered 200.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "http_requests_total",
        "Requests answered, by method, matched route and status"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer a request, by method and matched route"
    );
    describe_gauge!("websockets_open", "WebSockets open on this instance");
    describe_gauge!(
        "pubsub_subscribed_chats",
        "AI chats this instance listens to on Redis pub/sub"
    );
    describe_histogram!("send_batch_size", "Sends stored by one statement");
    describe_counter!(
        crate::throttle::FAILED_LOGINS_METRIC,
        "Logins refused for wrong credentials"
    );
    describe_counter!(
        crate::throttle::THROTTLED_METRIC,
        "Login and registration attempts refused with 429 by a window or a username lock, by action"
    );
    describe_counter!(
        crate::hashing::BUSY_METRIC,
        "Logins and registrations refused with 503 because every password-hashing slot was taken"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections answered 503 and closed because MAX_CONNECTIONS were open"
    );
    describe_counter!(
        REQUESTS_TIMED_OUT,
        "Requests answered 503 because they took longer than REQUEST_TIMEOUT_SECS"
    );
    describe_counter!(
        SOCKETS_REFUSED,
        "WebSocket upgrades answered 429 because the user had MAX_SOCKETS_PER_USER open here"
    );
    aichat_shared::db::retry::describe(CONFLICT_PATHS);
    aichat_shared::jobs::describe_queue_gauges();
    for counter in [CONNECTIONS_REFUSED, REQUESTS_TIMED_OUT, SOCKETS_REFUSED] {
        metrics::counter!(counter).increment(0);
    }

    metrics::counter!("http_requests_total", "method" => "GET", "route" => "/healthz", "status" => "200")
        .increment(0);
    let _ = metrics::histogram!("http_request_duration_seconds", "method" => "GET", "route" => "/healthz");
    metrics::gauge!("websockets_open").set(0.0);
    metrics::gauge!("pubsub_subscribed_chats").set(0.0);
    let _ = metrics::histogram!("send_batch_size");
    metrics::counter!(crate::throttle::FAILED_LOGINS_METRIC).increment(0);
    for action in ["login", "register"] {
        metrics::counter!(crate::throttle::THROTTLED_METRIC, "action" => action).increment(0);
    }
    metrics::counter!(crate::hashing::BUSY_METRIC).increment(0);
}

const CONNECTIONS_REFUSED: &str = "connections_refused_total";
const REQUESTS_TIMED_OUT: &str = "requests_timed_out_total";
const SOCKETS_REFUSED: &str = "websockets_refused_total";

pub fn connection_refused() {
    metrics::counter!(CONNECTIONS_REFUSED).increment(1);
}

pub fn request_timed_out() {
    metrics::counter!(REQUESTS_TIMED_OUT).increment(1);
}

pub fn socket_refused() {
    metrics::counter!(SOCKETS_REFUSED).increment(1);
}

/// Records every request: `http_requests_total` and `http_request_duration_seconds`.
pub async fn track_requests(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    response
}

/// `GET /metrics`: Prometheus text, for the `METRICS_TOKEN` bearer or a staff session.
pub async fn render(State(state): State<AppState>, parts: Parts) -> Response {
    if let Err(refused) = allowed(&state, &parts).await {
        return refused.into_response();
    }
    metrics::gauge!("websockets_open").set(state.sockets.open() as f64);
    metrics::gauge!("pubsub_subscribed_chats").set(state.hub.subscribed_chats() as f64);
    state.queue.record_queue_gauges().await;
    match telemetry::prometheus() {
        Some(handle) => (
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable",
        )
            .into_response(),
    }
}

/// The scraper's token (compared as hashes, so the comparison leaks nothing useful), or a staff
/// session: 401 for anyone else, 403 for a signed-in non-staff user.
async fn allowed(state: &AppState, parts: &Parts) -> Result<(), ApiError> {
    let token = request_token(parts).ok_or(ApiError::Unauthenticated)?;
    if let Some(expected) = &state.settings.metrics_token
        && hash_token(expected.expose_secret()) == hash_token(&token)
    {
        return Ok(());
    }
    match user_for_token(state, &token).await? {
        Some(user) if user.is_staff => Ok(()),
        Some(_) => Err(ApiError::Forbidden),
        None => Err(ApiError::Unauthenticated),
    }
}
