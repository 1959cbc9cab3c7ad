//! The HTTP client of the tests: JSON in, status and JSON out, and the users it logs in.
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::PASSWORD;
use crate::stack::Api;

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

    pub async fn ai_chat(&self, owner: &User, title: &str) -> i64 {
        let created = self
            .post("/api/ai/chats/", &owner.token, json!({"title": title}))
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
        created.body["id"].as_i64().expect("ai chat id")
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
}
