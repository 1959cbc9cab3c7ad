//! aichat HTTP API: authentication, REST under `/api/`, docs and probes.
use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use aichat_shared::{db, jobs::JobQueue, redis_conn};
use secrecy::ExposeSecret;

pub mod auth;
pub mod dispatch;
pub mod error;
pub mod extract;
pub mod routes;
pub mod settings;
pub mod state;
pub mod validate;

pub use settings::Settings;
use state::AppState;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A bound, ready-to-run API server.
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
}

impl Application {
    /// Connects to PostgreSQL and Redis, migrates, and binds `API_ADDR` (port 0 picks one).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = db::pool(&settings.database).context("invalid DATABASE_URL")?;
        if settings.run_migrations {
            db::migrate(&pool)
                .await
                .context("applying database migrations")?;
        }
        let redis = redis_conn::connect(settings.redis.redis_url.expose_secret())
            .await
            .context("connecting to Redis")?;
        let ns = settings.redis.namespace();
        let state = AppState {
            db: pool,
            queue: JobQueue::new(redis.clone(), &ns),
            redis,
            ns,
            settings: Arc::new(settings),
        };
        let listener = TcpListener::bind(&state.settings.api_addr)
            .await
            .with_context(|| format!("binding {}", state.settings.api_addr))?;
        let router = app_router(state.clone());
        Ok(Application {
            listener,
            router,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "aichat-api listening");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    }
}

/// The router with its middleware: request ids, tracing, body limit.
pub fn app_router(state: AppState) -> Router {
    let body_limit = state.settings.max_body_bytes;
    routes::router()
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let request_id = req
                    .headers()
                    .get(&REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", method = %req.method(), uri = %req.uri().path(), request_id)
            }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
