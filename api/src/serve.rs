//! The listener. What `axum::serve` does not do: a header-read timeout (hyper has one, but it
//! is off without a timer), and a cap on open connections, where a connection upgraded to a
//! WebSocket keeps its slot until the socket closes. Each request carries the peer address
//! (login throttling counts by it) and its connection's [`ConnectionSlot`]. And the request
//! timeout ([`request_timeout`]).
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tower::ServiceExt;

use crate::error::ApiError;
use crate::metrics;
use crate::state::AppState;

/// One connection's place under `MAX_CONNECTIONS`, freed when the last holder drops it: the
/// connection itself, or the WebSocket session it was upgraded to.
#[derive(Clone)]
pub struct ConnectionSlot {
    _permit: Arc<OwnedSemaphorePermit>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// Connections past the cap being told so at once; past this many more, a connection is
/// closed without an answer.
const MAX_REFUSING: usize = 1024;

/// Serves `router` on `listener` until `shutdown` resolves; then takes no new connection, lets
/// every open HTTP connection finish the request it is on, and returns. (Upgraded sockets are
/// closed by the application: they follow the same shutdown signal.)
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // A refused connection gets one answer, then is closed.
    let mut refuse_http = http.clone();
    refuse_http.keep_alive(false);
    // Every connection task holds a sender: all of them are gone once the channel closes.
    let (running, mut all_done) = mpsc::channel::<()>(1);
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // pause rather than spin.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::connection_refused();
            // Its request is read (by hyper, within the header timeout) before the 503, so
            // that a client reads an answer to what it sent.
            if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                let connection = refuse_http
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(full));
                tokio::spawn(async move {
                    let _refusal = refusal;
                    let _ = connection.await;
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let slot = ConnectionSlot {
            _permit: Arc::new(permit),
        };
        let service = router
            .clone()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(slot.clone());
                req
            });
        let connection = http
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .with_upgrades();
        let running = running.clone();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let _running = running;
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = async { stopping.wait_for(|stop| *stop).await.map(|_| ()) } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = ended {
                tracing::debug!(error = %err, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(running);
    let _ = all_done.recv().await;
    Ok(())
}

/// The answer to any request of a connection past the cap (hyper closes the connection after
/// it: keep-alive is off for these).
async fn full(_: Request<Incoming>) -> Result<Response, std::convert::Infallible> {
    Ok(ApiError::Unavailable("Too many connections, retry shortly").into_response())
}

/// Answers 503 (with `Retry-After`) a request still running after `REQUEST_TIMEOUT_SECS`: a
/// slow body, a stalled database. WebSocket upgrades are answered at once (the socket is not a
/// request), and a `send_message?wait` request may also wait its `MAX_WAIT_SECS`.
pub async fn request_timeout(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let settings = &state.settings;
    let mut limit = Duration::from_secs(settings.request_timeout_secs);
    if req.uri().path().starts_with("/ws/") {
        return next.run(req).await;
    }
    if req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|pair| pair == "wait" || pair.starts_with("wait="))
    }) {
        limit += Duration::from_secs(settings.max_wait_secs);
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::request_timed_out();
            ApiError::Unavailable("The request took too long, please retry").into_response()
        }
    }
}
