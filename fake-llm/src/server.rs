//! Owns the router and the [`FakeLlm`] handle that binds, runs and shuts the server down.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use axum::{
    Router,
    extract::DefaultBodyLimit,
    routing::{get, post},
};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    chat::chat_completions,
    config::{FakeConfig, Outcome},
    control,
    state::{FakeState, RecordedRequest},
};

/// Long benchmark conversations exceed axum's 2 MiB default.
const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// All routes of the fake, for embedding in another server or a custom listener.
pub fn router(state: FakeState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        // Some clients are configured with a base URL lacking `/v1`.
        .route("/chat/completions", post(chat_completions))
        .route("/v1/models", get(control::models))
        .route("/healthz", get(control::healthz))
        .route(
            "/_fake/requests",
            get(control::get_requests).delete(control::delete_requests),
        )
        .route(
            "/_fake/config",
            get(control::get_config).put(control::put_config),
        )
        .route(
            "/_fake/script",
            get(control::get_script)
                .post(control::post_script)
                .delete(control::delete_script),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// A running fake server. Dropping it leaves the server running; call [`FakeLlm::shutdown`] to stop it.
pub struct FakeLlm {
    addr: SocketAddr,
    state: FakeState,
    server: JoinHandle<std::io::Result<()>>,
}

impl FakeLlm {
    /// Starts on `127.0.0.1` with an OS-assigned port.
    pub async fn start(config: FakeConfig) -> anyhow::Result<FakeLlm> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    pub async fn start_on(addr: SocketAddr, config: FakeConfig) -> anyhow::Result<FakeLlm> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding fake LLM to {addr}"))?;
        let addr = listener.local_addr().context("reading bound address")?;
        let state = FakeState::new(config);
        let shutdown = state.shutdown_requested();
        let app = router(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        });
        Ok(FakeLlm {
            addr,
            state,
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// OpenAI-style API base, e.g. `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn state(&self) -> &FakeState {
        &self.state
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests()
    }

    pub fn clear_requests(&self) {
        self.state.clear_requests();
    }

    pub fn push_script(&self, outcomes: impl IntoIterator<Item = Outcome>) {
        self.state.push_script(outcomes);
    }

    /// Replaces the whole config (re-seeding the failure PRNG).
    pub fn set_config(&self, config: FakeConfig) {
        self.state.set_config(config);
    }

    pub fn config(&self) -> FakeConfig {
        self.state.config()
    }

    /// Waits (event-driven) until at least `n` requests are recorded or `timeout` passes,
    /// then returns every recorded request.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        self.state.wait_for_requests(n, timeout).await
    }

    /// Waits (event-driven) until `done` holds for the request log; it is re-checked on every
    /// change (a new record, a stream ending, clearing). Returns that log, `None` on timeout.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl FnMut(&[RecordedRequest]) -> bool,
    ) -> Option<Vec<RecordedRequest>> {
        self.state.wait_until(timeout, done).await
    }

    /// Waits (event-driven) for the first streamed request whose client hung up mid-response
    /// ([`RecordedRequest::client_hung_up`]); `None` if there is none within `timeout`.
    pub async fn wait_for_hang_up(&self, timeout: Duration) -> Option<RecordedRequest> {
        self.state.wait_for_hang_up(timeout).await
    }

    /// Graceful stop: hangs answer at once, streams are cut, then in-flight responses finish.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.state.trigger_shutdown();
        self.server
            .await
            .context("fake LLM server task failed")?
            .context("fake LLM server error")
    }
}
