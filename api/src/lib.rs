//! aichat HTTP API: authentication, REST under `/api/`, docs and probes.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use aichat_shared::config::DatabaseSettings;
use aichat_shared::models::Keys;
use aichat_shared::{db, jobs::JobQueue, redis_conn};
use secrecy::ExposeSecret;

mod access;
/// Public for the tests, which hash a session token as the API stores it.
pub mod auth;
mod client_address;
mod commands;
mod error;
mod extract;
mod fanout;
mod hardening;
mod hashing;
mod ip_range;
mod json_body;
mod metrics;
mod origin_guard;
mod paging;
mod passwords;
mod revocation;
mod routes;
mod run_to_end;
mod send;
mod serve;
mod session_cache;
mod settings;
/// Public for the tests and the test kit, which read an application's state.
pub mod state;
mod throttle;
mod trailing_slash;
mod validate;

pub use commands::run;
pub use settings::Settings;

use fanout::Hub;
use hashing::Hashing;
use revocation::Revocation;
use send::batch::SendBatcher;
use session_cache::SessionCache;
use state::{AppState, Handles, SocketTracker};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A bound, ready-to-run API server.
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
    shutdown_tx: watch::Sender<bool>,
}

impl Application {
    /// Connects to PostgreSQL and Redis, migrates, and binds `API_ADDR` (port 0 picks one).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Install the recorder before anything records.
        aichat_shared::telemetry::prometheus();
        metrics::describe();
        // A registry that cannot be used is a reason not to start. The API names models but
        // never calls them: their keys stay with the workers.
        let models = settings.openai.registry(Keys::Skip)?;
        let pool = db::pool(
            &settings.database,
            db::Planning::Default,
            settings.database.database_max_connections,
        )
        .context("invalid DATABASE_URL")?;
        if settings.run_migrations {
            db::migrate(&pool)
                .await
                .context("applying database migrations")?;
        }
        let redis = redis_conn::connect(settings.redis.redis_url.expose_secret())
            .await
            .context("connecting to Redis")?;
        let installation = db::installation_id(&pool)
            .await
            .context("reading the database's installation id (is the schema applied? run `aichat-api migrate`)")?;
        let ns = settings.redis.namespace().for_installation(installation);
        let sessions = Arc::new(SessionCache::new(Duration::from_secs(
            settings.session_cache_secs,
        )));
        let forget = sessions.clone();
        let hub = Hub::connect(
            settings.redis.redis_url.expose_secret(),
            ns.clone(),
            settings.ws_queue_capacity,
            Box::new(move |revocation| match revocation {
                Revocation::Session(hash) => forget.revoke(hash),
                Revocation::User(user_id) | Revocation::UserChanged(user_id) => {
                    forget.revoke_user(*user_id)
                }
            }),
        )
        .await
        .context("connecting the pub/sub connection to Redis")?;
        let (shutdown_tx, shutdown) = watch::channel(false);
        let queue = JobQueue::new(redis.clone(), &ns);
        // The send writers run only keyed statements: connections of their own that plan
        // them once and never as a scan (`db::Planning::KeyedGeneric`).
        let writers_database = DatabaseSettings {
            database_ping_after_idle_ms: settings.send_batch_ping_after_idle_ms,
            ..settings.database.clone()
        };
        let send_pool = db::pool(
            &writers_database,
            db::Planning::KeyedGeneric,
            settings.send_batch_writers.into(),
        )
        .context("invalid DATABASE_URL")?;
        let sends = SendBatcher::start(
            send_pool,
            queue.clone(),
            ns.clone(),
            settings.send_batch_writers.into(),
            settings.send_batch_max.into(),
        );
        let state = AppState::new(Handles {
            db: pool,
            queue,
            sends,
            redis,
            hub,
            ns,
            sessions,
            hashing: Hashing::new(
                settings.password_hash_concurrency,
                Duration::from_millis(settings.password_hash_wait_ms),
            ),
            settings: Arc::new(settings),
            models: Arc::new(models),
            shutdown,
            sockets: SocketTracker::default(),
        });
        let listener = TcpListener::bind(&state.settings.api_addr)
            .await
            .with_context(|| format!("binding {}", state.settings.api_addr))?;
        let router = app_router(state.clone());
        Ok(Application {
            listener,
            router,
            state,
            shutdown_tx,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then closes every WebSocket (1001) and finishes
    /// in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "aichat-api listening");
        let Application {
            listener,
            router,
            state,
            shutdown_tx,
        } = self;
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: closing WebSockets");
            let _ = shutdown_tx.send(true);
        };
        // Each connection gets a clone of the router's `Arc` (`serve.rs`), as
        // `into_make_service` would: serving the `Router` itself would re-box every route per
        // connection, memory that an upgraded connection keeps for the WebSocket's whole life.
        let limits = serve::Limits {
            max_connections: usize::try_from(state.settings.max_connections).unwrap_or(usize::MAX),
            header_read_timeout: Duration::from_secs(state.settings.header_read_timeout_secs),
            write_timeout: Duration::from_secs(state.settings.request_timeout_secs),
            drain: Duration::from_secs(
                state
                    .settings
                    .request_timeout_secs
                    .saturating_add(state.settings.max_wait_secs),
            ),
        };
        serve::serve(listener, router, limits, signal).await?;
        state.sockets.wait_closed(Duration::from_secs(5)).await;
        Ok(())
    }
}

/// The router with its middleware: request ids, tracing, body limit.
fn app_router(state: AppState) -> Router {
    let body_limit = state.settings.max_body_bytes;
    routes::router()
        .route("/metrics", axum::routing::get(metrics::render))
        .route_layer(axum::middleware::from_fn(metrics::track_requests))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            origin_guard::refuse_cross_site,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            serve::request_timeout,
        ))
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
        .layer(axum::middleware::from_fn(hardening::sanitize_request_id))
        .layer(axum::middleware::from_fn(hardening::api_headers))
        .with_state(state)
}
