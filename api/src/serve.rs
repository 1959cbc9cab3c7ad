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
use crate::routes::export;
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
    /// Longest a write to a client may stay blocked (a client that stops reading): the
    /// connection is dropped past it.
    pub write_timeout: Duration,
    /// After the shutdown signal, how long open HTTP connections may take to finish.
    pub drain: Duration,
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
        let io = WriteDeadline::new(stream, limits.write_timeout);
        let connection = http
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
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
    if tokio::time::timeout(limits.drain, all_done.recv())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain period; leaving them");
    }
    Ok(())
}

/// A connection whose writes may not stay blocked longer than `limit`: hyper has no write
/// timeout, and a client that stops reading would otherwise hold its connection (and its place
/// under `MAX_CONNECTIONS`) for ever. Reads are not bounded here (the header-read timeout and
/// the request timeout do that); a WebSocket has its own send timeout and pings.
struct WriteDeadline {
    inner: tokio::net::TcpStream,
    limit: Duration,
    blocked_since: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl WriteDeadline {
    fn new(inner: tokio::net::TcpStream, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            blocked_since: None,
        }
    }

    /// `Pending` from the socket starts (or keeps) the clock; past the limit, an error.
    fn check<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        if polled.is_ready() {
            self.blocked_since = None;
            return polled;
        }
        let limit = self.limit;
        let sleep = self
            .blocked_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for WriteDeadline {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteDeadline {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The answer to any request of a connection past the cap (hyper closes the connection after
/// it: keep-alive is off for these).
async fn full(_: Request<Incoming>) -> Result<Response, std::convert::Infallible> {
    Ok(ApiError::Unavailable("Too many connections, retry shortly").into_response())
}

/// Answers 503 (with `Retry-After`) a request not done within `REQUEST_TIMEOUT_SECS`: a slow
/// body, a stalled database. A request that may change something (any method but GET, HEAD
/// and OPTIONS) is bounded only until its body is in: once it runs, it is not cut, since a
/// "please retry" for a change that was made anyway (a message stored by its batch) would have
/// the client make it twice. A `send_message?wait` request may also wait its `MAX_WAIT_SECS`.
/// (A WebSocket upgrade is answered with 101 at once; the socket lives in its own task.)
pub async fn request_timeout(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let settings = &state.settings;
    let mut limit = Duration::from_secs(settings.request_timeout_secs);
    if req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|pair| pair == "wait" || pair.starts_with("wait="))
    }) {
        limit = limit.saturating_add(Duration::from_secs(settings.max_wait_secs));
    }
    let timed_out = || {
        metrics::request_timed_out();
        ApiError::Unavailable("The request took too long, please retry").into_response()
    };
    if req.method().is_safe() {
        return match tokio::time::timeout(limit, next.run(req)).await {
            Ok(response) => response,
            Err(_) => timed_out(),
        };
    }
    let (parts, body) = req.into_parts();
    // An AI chat import carries a whole conversation: its route has a limit of its own
    // (`IMPORT_MAX_BYTES`, checked again by the route, which reads the body itself).
    let import = parts.uri.path() == export::IMPORT_PATH;
    let max_bytes = if import {
        settings.import_max_bytes.max(settings.max_body_bytes)
    } else {
        settings.max_body_bytes
    };
    let read = axum::body::to_bytes(body, max_bytes);
    let bytes = match tokio::time::timeout(limit, read).await {
        Ok(Ok(bytes)) => bytes,
        // Over the limit (or the client went away while sending it).
        Ok(Err(_)) if import => {
            return export::import_too_large(settings.import_max_bytes).into_response();
        }
        Ok(Err(_)) => {
            return ApiError::PayloadTooLarge("Request body is too large".into()).into_response();
        }
        Err(_) => return timed_out(),
    };
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}
