//! The HTTP client of the tests: JSON in, status and JSON out, and the users it logs in.
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::PASSWORD;
use crate::stack::{Api, Env};

// ---------------------------------------------------------------------------------------------
// HTTP client

#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub token: String,
}

/// The answer to one request: status, JSON body (`Null` if none), and headers.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub retry_after: Option<String>,
}

pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
}

impl Env {
    /// [`Env::api`] and a client of it.
    pub async fn api_client(&self, extra: &[&str]) -> (Api, Client) {
        let api = self.api(extra).await;
        let client = Client::new(&api);
        (api, client)
    }
}

impl Client {
    pub fn new(api: &Api) -> Client {
        Client::for_base(&api.base, Duration::from_secs(30))
    }

    pub fn for_base(base: &str, timeout: Duration) -> Client {
        Client {
            base: base.to_owned(),
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("http client"),
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        self.try_call(method, path, token, body, &[])
            .await
            .unwrap_or_else(|err| panic!("{path}: {err}"))
    }

    /// Like `call`, with extra headers, and the transport error instead of a panic.
    pub async fn try_call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, reqwest::Error> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text().await?;
        Ok(Answer {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            retry_after,
        })
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// The Prometheus text the API serves at `/metrics`, read with the scraper's `token`.
    pub async fn metrics(&self, token: &str) -> String {
        let response = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("scrape");
        assert_eq!(response.status(), StatusCode::OK, "scrape");
        response.text().await.expect("metrics text")
    }

    /// Registers and logs in `username`.
    pub async fn user(&self, username: &str) -> User {
        let reg = self
            .call(
                Method::POST,
                "/api/register/",
                None,
                Some(json!({"username": username, "password": PASSWORD, "password_confirm": PASSWORD})),
            )
            .await;
        assert_eq!(reg.status, StatusCode::CREATED, "{}", reg.body);
        self.login(username).await
    }

    pub async fn login(&self, username: &str) -> User {
        let login = self
            .call(
                Method::POST,
                "/api/login/",
                None,
                Some(json!({"username": username, "password": PASSWORD})),
            )
            .await;
        assert_eq!(login.status, StatusCode::OK, "{}", login.body);
        User {
            id: login.body["id"].as_i64().expect("id"),
            username: username.to_owned(),
            token: login.body["token"].as_str().expect("token").to_owned(),
        }
    }

    /// Registers and logs in `username`, then makes it staff (straight in `env`'s database).
    pub async fn staff(&self, env: &Env, username: &str) -> User {
        let user = self.user(username).await;
        let made = aichat_shared::db::users::set_staff(&env.pool, username, true).await;
        assert!(made.expect("set staff"), "{username} is made staff");
        user
    }

    /// POSTs `body` to `path` as `owner` and insists on 201; the id of what was created.
    pub async fn create(&self, path: &str, owner: &User, body: Value) -> i64 {
        let created = self.post(path, &owner.token, body).await;
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{path}: {}",
            created.body
        );
        created.body["id"].as_i64().expect("the new id")
    }

    /// A user-to-user chat of `owner` named `name`; its id.
    pub async fn chat(&self, owner: &User, name: &str) -> i64 {
        self.create("/api/chats/", owner, json!({"name": name}))
            .await
    }

    pub async fn ai_chat(&self, owner: &User, title: &str) -> i64 {
        self.create("/api/ai/chats/", owner, json!({"title": title}))
            .await
    }

    /// `n` AI chats of `owner`, titled `chat 0`, `chat 1`, ...
    pub async fn ai_chats(&self, owner: &User, n: usize) -> Vec<i64> {
        let mut chats = Vec::with_capacity(n);
        for c in 0..n {
            chats.push(self.ai_chat(owner, &format!("chat {c}")).await);
        }
        chats
    }

    /// POSTs one message; the raw answer (202 expected in good times).
    pub async fn send(&self, user: &User, chat: i64, content: &str) -> Result<Answer, String> {
        self.try_call(
            Method::POST,
            &format!("/api/ai/chats/{chat}/send_message/"),
            Some(&user.token),
            Some(json!({"content": content})),
            &[],
        )
        .await
        .map_err(|err| {
            if err.is_timeout() {
                "timed out".to_owned()
            } else {
                format!("transport error: {err}")
            }
        })
    }

    /// Sends and insists on 202; the new message's id.
    pub async fn send_ok(&self, user: &User, chat: i64, content: &str) -> i64 {
        let answer = self.send(user, chat, content).await.expect("send");
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
        answer.body["message"]["id"].as_i64().expect("message id")
    }

    /// Sends `n` messages one after the other, round-robin over `chats`, as `{prefix} {i}`;
    /// each must be accepted (202). Their ids, in order.
    pub async fn send_round(&self, user: &User, chats: &[i64], prefix: &str, n: usize) -> Vec<i64> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let chat = chats[i % chats.len()];
            ids.push(self.send_ok(user, chat, &format!("{prefix} {i}")).await);
        }
        ids
    }
}

/// What a Prometheus `text` lacks: the `# HELP` and `# TYPE` lines of each `(metric, kind)` of
/// `described`, and each of `series` as a whole line (`name{labels} value`). Empty when all
/// is there.
pub fn missing_metrics(text: &str, described: &[(&str, &str)], series: &[&str]) -> Vec<String> {
    let has_line = |wanted: &dyn Fn(&str) -> bool| text.lines().any(wanted);
    let mut missing = Vec::new();
    for (metric, kind) in described {
        let help = format!("# HELP {metric} ");
        if !has_line(&|line| line.starts_with(&help)) {
            missing.push(help);
        }
        let kind = format!("# TYPE {metric} {kind}");
        if !has_line(&|line| line == kind) {
            missing.push(kind);
        }
    }
    for wanted in series {
        if !has_line(&|line| line == *wanted) {
            missing.push((*wanted).to_owned());
        }
    }
    missing
}
