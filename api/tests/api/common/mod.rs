//! What the API's tests share, on top of the test kit (`testkit/`, which creates the databases
//! and namespaces, starts the API and workers, and holds the HTTP and WebSocket clients): an
//! app of a test's own ([`TestApp`]) with short JSON calls that answer `(status, body)`; the
//! users, chats and messages tests start from (`fixtures`); checks many tests make (`checks`);
//! requests built by hand, with headers, cookies or raw bodies (`requests`); and an app with a
//! worker and the fake model (`worker`).
#![allow(dead_code)]

mod checks;
mod fixtures;
mod requests;
mod worker;

pub use checks::assert_error;
pub use fixtures::*;
pub use requests::*;
pub use worker::*;

use std::process::Stdio;

use aichat_shared::keys::Namespace;
use aichat_testkit::stack::{Api, api_args, start_api};
use aichat_testkit::{ApiProcess, Client, PASSWORD, TestDb, unique_name};
use redis::AsyncCommands;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

pub use aichat_testkit::postgres::drop_database;
pub use aichat_testkit::ws::{ws_events_until, ws_events_until_closed, ws_upgrade};
pub use aichat_testkit::{User as TestUser, Ws, closed_with, event_of, next_event, send_ws};

/// Creates an empty, uniquely named database; its URL and name.
pub async fn fresh_database() -> (String, String) {
    let db = TestDb::create("aichat_test").await;
    (db.url, db.name)
}

/// The `aichat-api` binary on a free port against a fresh database and namespace of its own.
pub async fn spawn_api_binary(extra: &[&str]) -> ApiProcess {
    spawn_api_binary_logging_to(extra, Stdio::null()).await
}

/// [`spawn_api_binary`] with its log (stdout) written to `log`; `extra` sets the filter.
pub async fn spawn_api_binary_logging_to(extra: &[&str], log: impl Into<Stdio>) -> ApiProcess {
    ApiProcess::start(env!("CARGO_BIN_EXE_aichat-api"), extra, log).await
}

/// The `aichat-api` binary run as an operator runs it, against `app`'s database and Redis
/// namespace, quiet; the test adds the command and its arguments.
pub fn api_command(app: &TestApp) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_aichat-api"));
    command
        .args(["--database-url", &app.db_url, "--redis-url", &app.redis_url])
        .args(["--aichat-namespace", &app.ns, "--log-filter", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

pub struct TestApp {
    pub base: String,
    pub db_url: String,
    pub db: PgPool,
    pub db_name: String,
    pub ns: String,
    /// The app's Redis key names (its namespace, with the database's installation).
    pub keys: Namespace,
    pub redis_url: String,
    pub client: reqwest::Client,
    pub sockets: aichat_api::state::SocketTracker,
    http: Client,
    api: Api,
}

pub struct Options {
    pub redis_url: String,
    pub extra: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            redis_url: aichat_testkit::redis_url(),
            extra: Vec::new(),
        }
    }
}

/// The words of a command line, as flags: `flags("--max-connections 4")` is
/// `["--max-connections", "4"]` (for values without spaces).
pub fn flags(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

/// An app with these flags besides the test defaults.
pub async fn spawn_app_with_flags(flags: &[&str]) -> TestApp {
    spawn_app_with(Options {
        extra: flags.iter().map(|s| s.to_string()).collect(),
        ..Options::default()
    })
    .await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    let (db_url, db_name) = fresh_database().await;
    start(db_url, db_name, unique_name("aichat_test"), options).await
}

/// Replaces `app` by an instance on the same database and namespace, with extra settings.
pub async fn restart_with(app: TestApp, extra: &[&str]) -> TestApp {
    app.another_instance(extra).await
}

impl TestApp {
    /// Another API instance on the same database and Redis namespace.
    pub async fn another_instance(&self, extra: &[&str]) -> TestApp {
        let options = Options {
            redis_url: self.redis_url.clone(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        start(
            self.db_url.clone(),
            self.db_name.clone(),
            self.ns.clone(),
            options,
        )
        .await
    }
}

async fn start(db_url: String, db_name: String, ns: String, options: Options) -> TestApp {
    let extra: Vec<&str> = options.extra.iter().map(String::as_str).collect();
    let api = start_api(api_args(&db_url, &options.redis_url, &ns, &extra)).await;
    let http = Client::for_base(&api.base, std::time::Duration::from_secs(30));
    TestApp {
        base: api.base.clone(),
        db_url,
        db: api.state.db.clone(),
        db_name,
        ns,
        keys: api.state.ns.clone(),
        redis_url: options.redis_url,
        client: http.http.clone(),
        sockets: api.state.sockets.clone(),
        http,
        api,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request and returns the status and the JSON body (`Null` when empty or not JSON).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let answer = self.http.call(method, path, token, body).await;
        (answer.status, answer.body)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn patch(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(token), Some(body))
            .await
    }

    pub async fn put(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    pub async fn register(&self, username: &str) -> (StatusCode, Value) {
        self.register_with(
            json!({"username": username, "password": PASSWORD, "password_confirm": PASSWORD}),
        )
        .await
    }

    /// Registers with `password` (and its confirmation) instead of the tests' own.
    pub async fn register_password(&self, username: &str, password: &str) -> (StatusCode, Value) {
        self.register_with(
            json!({"username": username, "password": password, "password_confirm": password}),
        )
        .await
    }

    /// `POST /api/register/` with this body, as it is.
    pub async fn register_with(&self, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, "/api/register/", None, Some(body))
            .await
    }

    pub async fn login(&self, username: &str, password: &str) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            "/api/login/",
            None,
            Some(json!({"username": username, "password": password})),
        )
        .await
    }

    /// Registers and logs in a user.
    pub async fn user(&self, username: &str) -> TestUser {
        self.http.user(username).await
    }

    /// How `GET /api/me/` answers `token`: whether the session is accepted.
    pub async fn me_status(&self, token: &str) -> StatusCode {
        self.get("/api/me/", token).await.0
    }

    /// A connection to this app's Redis server.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.redis_url.as_str()).expect("redis url");
        client
            .get_multiplexed_async_connection()
            .await
            .expect("redis")
    }

    /// The job arguments stored in the completion queue, parsed.
    pub async fn queued_jobs(&self) -> Vec<Value> {
        let mut conn = self.redis().await;
        let data: Vec<(String, Vec<u8>)> = conn
            .hgetall(aichat_shared::jobs::queue_config(&self.keys).job_data_hash())
            .await
            .expect("hgetall");
        data.into_iter()
            .map(|(_, args)| serde_json::from_slice(&args).expect("job json"))
            .collect()
    }

    pub async fn cleanup(self) {
        self.db.close().await;
        drop_database(&self.db_name).await;
        aichat_testkit::delete_namespace(&self.redis_url, &self.ns).await;
    }

    pub fn ws_url(&self, path: &str) -> String {
        self.api.ws_url(path)
    }

    /// Opens `/ws/ai-chat/{id}/` with `?token=` (and `&after_id=` when given).
    pub async fn ws(&self, chat_id: i64, token: &str, after_id: Option<i64>) -> Ws {
        let mut url = self.ws_url(&format!("/ws/ai-chat/{chat_id}/?token={token}"));
        if let Some(after) = after_id {
            url.push_str(&format!("&after_id={after}"));
        }
        aichat_testkit::ws_open(&url).await
    }

    /// Stops accepting requests and closes every WebSocket.
    pub fn shut_down(&mut self) {
        self.api.shut_down();
    }
}
