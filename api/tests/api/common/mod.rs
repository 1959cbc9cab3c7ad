//! Test harness: the real API router on a random port, a fresh database and a Redis
//! namespace per test, and a small HTTP client that speaks JSON.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aichat_api::{Application, Settings};
use clap::Parser;
use redis::AsyncCommands;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

pub use aichat_testkit::postgres::drop_database;
use aichat_testkit::{delete_namespace, redis_url};

/// Creates an empty, uniquely named database; its URL and name.
pub async fn fresh_database() -> (String, String) {
    let db = aichat_testkit::TestDb::create("aichat_test").await;
    (db.url, db.name)
}

/// A child process (an API binary a test started) killed and reaped when dropped, also when
/// the test panics.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `aichat-api` binary itself, on a free port against a fresh database and namespace of
/// its own, for what only a separate process shows (its own metrics recorder, its memory).
pub struct ApiProcess {
    pub base: String,
    pub pid: u32,
    child: Option<KillOnDrop>,
    db_name: String,
    ns: String,
}

/// Starts the binary with `extra` flags and waits until it listens (at most 30 s).
pub async fn spawn_api_binary(extra: &[&str]) -> ApiProcess {
    spawn_api_binary_logging_to(extra, Stdio::null()).await
}

/// [`spawn_api_binary`] with its log (stdout) written to `log`; `extra` sets the filter.
pub async fn spawn_api_binary_logging_to(extra: &[&str], log: impl Into<Stdio>) -> ApiProcess {
    let (url, db_name) = fresh_database().await;
    let ns = format!("aichat_test_{}", uuid::Uuid::new_v4().simple());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let addr = format!("127.0.0.1:{port}");
    let redis = redis_url();
    let child = Command::new(env!("CARGO_BIN_EXE_aichat-api"))
        .args([
            "--api-addr",
            &addr,
            "--database-url",
            &url,
            "--redis-url",
            &redis,
            "--aichat-namespace",
            &ns,
        ])
        .args(if extra.contains(&"--log-filter") {
            &[][..]
        } else {
            &["--log-filter", "error"][..]
        })
        .args(extra)
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .expect("start the API binary");
    let pid = child.id();
    let process = ApiProcess {
        base: format!("http://{addr}"),
        pid,
        child: Some(KillOnDrop(child)),
        db_name,
        ns,
    };
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // Polled only while nothing listens yet: the first answered request is the test's.
    while client
        .get(format!("{}/healthz", process.base))
        .send()
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the API never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    process
}

impl ApiProcess {
    /// Stops the process and removes its database and namespace.
    pub async fn cleanup(mut self) {
        drop(self.child.take());
        delete_namespace(&redis_url(), &self.ns).await;
        drop_database(&self.db_name).await;
    }
}

/// `ALLOWED_MODELS` of every test app unless a test sets it (`gpt-test` is the default model).
pub const TEST_MODELS: &str = "gpt-4o-mini,m-2";

/// The settings of the login and registration windows.
pub const AUTH_WINDOWS: [&str; 3] = [
    "--registrations-per-address",
    "--login-attempts-per-address",
    "--login-attempts-per-username",
];

pub struct TestApp {
    pub base: String,
    pub db_url: String,
    pub db: PgPool,
    pub db_name: String,
    pub ns: String,
    /// The app's Redis key names (its namespace, with the database's installation).
    pub keys: aichat_shared::keys::Namespace,
    pub redis_url: String,
    pub client: reqwest::Client,
    pub sockets: aichat_api::state::SocketTracker,
    pub shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

pub struct Options {
    pub redis_url: String,
    pub extra: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            redis_url: redis_url(),
            extra: Vec::new(),
        }
    }
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
    let ns = format!("aichat_test_{}", uuid::Uuid::new_v4().simple());
    start(db_url, db_name, ns, options).await
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
    let mut args = vec![
        "aichat-api".to_string(),
        "--api-addr".into(),
        "127.0.0.1:0".into(),
        "--database-url".into(),
        db_url.clone(),
        "--redis-url".into(),
        options.redis_url.clone(),
        "--aichat-namespace".into(),
        ns.clone(),
        "--openai-model".into(),
        "gpt-test".into(),
    ];
    // Tests register and log in many accounts from one address: the login and registration
    // windows are off unless a test sets them (`tests/security.rs` does).
    for flag in AUTH_WINDOWS {
        if !options.extra.iter().any(|given| given == flag) {
            args.extend([flag.to_string(), "0".into()]);
        }
    }
    // The models the tests name besides the default.
    if !options
        .extra
        .iter()
        .any(|given| given == "--allowed-models")
    {
        args.extend(["--allowed-models".to_string(), TEST_MODELS.into()]);
    }
    args.extend(options.extra);
    let settings = Settings::try_parse_from(args).expect("settings");
    let app = Application::build(settings).await.expect("build app");
    let base = format!("http://127.0.0.1:{}", app.port());
    let db = app.state().db.clone();
    let keys = app.state().ns.clone();
    let sockets = app.state().sockets.clone();
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async move {
        let _ = stop.await;
    }));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    TestApp {
        base,
        db_url,
        db,
        db_name,
        ns,
        keys,
        redis_url: options.redis_url,
        client,
        sockets,
        shutdown: Some(shutdown),
    }
}

/// A registered, logged-in user.
pub struct TestUser {
    pub id: i64,
    pub username: String,
    pub token: String,
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
        let mut req = self.client.request(method, self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
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
        self.call(
            Method::POST,
            "/api/register/",
            None,
            Some(json!({"username": username, "password": "correct horse", "password_confirm": "correct horse"})),
        )
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
        let (status, body) = self.register(username).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = self.login(username, "correct horse").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        TestUser {
            id: body["id"].as_i64().expect("id"),
            username: username.to_owned(),
            token: body["token"].as_str().expect("token").to_owned(),
        }
    }

    pub async fn create_chat(&self, owner: &TestUser, name: &str, others: &[&TestUser]) -> i64 {
        let ids: Vec<i64> = others.iter().map(|u| u.id).collect();
        let (status, body) = self
            .post(
                "/api/chats/",
                &owner.token,
                json!({"name": name, "participant_ids": ids}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_i64().expect("chat id")
    }

    pub async fn create_ai_chat(&self, owner: &TestUser, body: Value) -> Value {
        let (status, body) = self.post("/api/ai/chats/", &owner.token, body).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// The job arguments stored in the completion queue, parsed.
    /// A new AI chat of `owner`, titled "t"; its id.
    pub async fn ai_chat_id(&self, owner: &TestUser) -> i64 {
        self.create_ai_chat(owner, json!({"title": "t"})).await["id"]
            .as_i64()
            .expect("AI chat id")
    }

    pub async fn queued_jobs(&self) -> Vec<Value> {
        let client = redis::Client::open(self.redis_url.as_str()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let data: Vec<(String, Vec<u8>)> = conn
            .hgetall(format!("{}:jobs:completion:data", self.ns))
            .await
            .expect("hgetall");
        data.into_iter()
            .map(|(_, args)| serde_json::from_slice(&args).expect("job json"))
            .collect()
    }

    pub async fn cleanup(self) {
        self.db.close().await;
        drop_database(&self.db_name).await;
        delete_namespace(&self.redis_url, &self.ns).await;
    }
}

/// A WebSocket client connection.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl TestApp {
    pub fn ws_url(&self, path: &str) -> String {
        format!("{}{path}", self.base.replacen("http://", "ws://", 1))
    }

    /// Opens `/ws/ai-chat/{id}/` with `?token=` (and `&after_id=` when given).
    pub async fn ws(&self, chat_id: i64, token: &str, after_id: Option<i64>) -> Ws {
        let mut url = self.ws_url(&format!("/ws/ai-chat/{chat_id}/?token={token}"));
        if let Some(after) = after_id {
            url.push_str(&format!("&after_id={after}"));
        }
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        ws
    }

    /// Stops accepting requests and closes every WebSocket.
    pub fn shut_down(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The next text event, parsed; panics after `secs` seconds without one.
pub async fn next_event(ws: &mut Ws, secs: u64) -> Value {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("an event in time")
            .expect("socket open")
            .expect("frame");
        match frame {
            Message::Text(text) => return serde_json::from_str(&text).expect("event JSON"),
            Message::Close(frame) => panic!("socket closed: {frame:?}"),
            _ => continue,
        }
    }
}

/// Reads events until one of `kind` arrives; returns it with the events before it.
pub async fn event_of(ws: &mut Ws, kind: &str, secs: u64) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .as_secs()
            .max(1);
        let event = next_event(ws, left).await;
        if event["type"] == kind {
            return (event, before);
        }
        before.push(event);
    }
}

/// Reads until the server closes the socket; the close code (`None`: closed without a frame).
/// Panics if it is still open after `secs` seconds.
pub async fn closed_with(ws: &mut Ws, secs: u64) -> Option<u16> {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the socket is still open after {secs} s"))
}

pub async fn send_ws(ws: &mut Ws, value: Value) {
    use futures::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        value.to_string().into(),
    ))
    .await
    .expect("send");
}

/// A worker of this test's namespace and database, talking to `fake`.
pub async fn start_worker(
    app: &TestApp,
    fake: &aichat_fake_llm::FakeLlm,
    extra: &[&str],
) -> tokio::sync::oneshot::Sender<()> {
    let mut args = vec![
        "aichat-worker".to_string(),
        "--database-url".into(),
        app.db_url.clone(),
        "--redis-url".into(),
        app.redis_url.clone(),
        "--aichat-namespace".into(),
        app.ns.clone(),
        "--openai-base-url".into(),
        fake.base_url(),
        "--openai-api-key".into(),
        "test-key".into(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
        // The same models as the test's API, as in a deployment (shared settings).
        "--openai-model".into(),
        "gpt-test".into(),
        "--allowed-models".into(),
        TEST_MODELS.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let settings = aichat_worker::Settings::try_parse_from(args).expect("worker settings");
    let worker = aichat_worker::Worker::build(settings)
        .await
        .expect("worker");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
    }));
    stop
}
