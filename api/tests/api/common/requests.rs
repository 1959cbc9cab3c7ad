//! Requests built by hand: with headers, cookies, a content type or bytes of their own, or on
//! a connection of their own; answered with the whole reply (status, headers and text), where
//! the JSON calls of `TestApp` answer only status and body.
use std::future::Future;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;

use super::{TestApp, assert_error};

/// The whole answer to a request.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    /// This reply is an error of status `expected` (see [`assert_error`]); the error's text.
    pub fn error(&self, what: &str, expected: StatusCode) -> String {
        assert_error(what, (self.status, &self.expect_json()), expected).to_owned()
    }

    /// The body as JSON; panics when it is not JSON (every answer of the API is).
    pub fn expect_json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|_| panic!("not JSON: {} {}", self.status, self.text))
    }

    /// A header's value; panics when it is missing or not text.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header: {:?}", self.headers))
    }

    /// `Retry-After` in seconds, when there is one.
    pub fn retry_after(&self) -> Option<u64> {
        self.headers.get("retry-after")?.to_str().ok()?.parse().ok()
    }
}

/// Sends a request built by hand and reads the whole reply.
pub trait Replied {
    /// The whole reply, or the transport error (a refused connection, a cut one).
    fn try_reply(self) -> impl Future<Output = reqwest::Result<Reply>> + Send;

    /// The whole reply; panics on a transport error.
    fn reply(self) -> impl Future<Output = Reply> + Send;
}

impl Replied for RequestBuilder {
    async fn try_reply(self) -> reqwest::Result<Reply> {
        let response = self.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await?;
        Ok(Reply {
            status,
            headers,
            text,
        })
    }

    async fn reply(self) -> Reply {
        self.try_reply().await.expect("answered")
    }
}

impl TestApp {
    /// The Prometheus text of this app, read with the scraper's `token`.
    pub async fn metrics(&self, token: &str) -> String {
        self.http.metrics(token).await
    }

    /// A request to `path` with no credential, for the test to add headers and a body to.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// A request whose only credential is the `sessionid` cookie holding `token`.
    pub fn with_cookie(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        self.request(method, path)
            .header("cookie", format!("sessionid={token}"))
    }

    /// Anonymous `GET path`, the whole reply.
    pub async fn fetch(&self, path: &str) -> Reply {
        self.request(Method::GET, path).reply().await
    }

    /// Anonymous `GET path`, which must be answered 200; the whole reply.
    pub async fn fetch_ok(&self, path: &str) -> Reply {
        let reply = self.fetch(path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text);
        reply
    }

    /// Registers `username` and logs in by hand: the whole reply (its cookie).
    pub async fn login_reply(&self, username: &str) -> Reply {
        let (status, body) = self.register(username).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        self.login_request(username, aichat_testkit::PASSWORD)
            .reply()
            .await
    }

    /// A login as `username` with `password`, for the test to add headers to or read the
    /// whole reply of (its cookie, its `Retry-After`).
    pub fn login_request(&self, username: &str, password: &str) -> RequestBuilder {
        self.request(Method::POST, "/api/login/")
            .json(&serde_json::json!({"username": username, "password": password}))
    }

    /// Sends `content` to `path` with `Idempotency-Key: key`.
    pub async fn post_with_key(
        &self,
        path: &str,
        token: &str,
        key: &str,
        content: &str,
    ) -> (StatusCode, Value) {
        let reply = self
            .request(Method::POST, path)
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(&serde_json::json!({"content": content}))
            .reply()
            .await;
        (reply.status, reply.expect_json())
    }

    /// `GET path` on a connection of its own (none kept from earlier requests): how a new
    /// client is answered, or the transport error when the connection is refused.
    pub async fn on_a_new_connection(&self, path: &str) -> Result<Reply, reqwest::Error> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        client.get(self.url(path)).try_reply().await
    }

    /// Asks `/healthz` on new connections until one is answered 200; false after `limit`.
    pub async fn a_new_connection_is_answered(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(reply) = self.on_a_new_connection("/healthz").await
                && reply.status == StatusCode::OK
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

/// The Prometheus text of the API at `base`, read with the scraper's `token`.
pub async fn scrape(base: &str, token: &str) -> String {
    aichat_testkit::Client::for_base(base, Duration::from_secs(30))
        .metrics(token)
        .await
}

/// How a WebSocket upgrade at `url` with `headers` is answered: 101 once upgraded (the socket
/// is then dropped), or the refusal's status; and the answer's headers.
pub async fn upgrade(
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, tokio_tungstenite::tungstenite::http::HeaderMap) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("an upgrade request");
    for (name, value) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName =
            name.parse().expect("a header name");
        request
            .headers_mut()
            .insert(name, value.parse().expect("a header value"));
    }
    super::ws_upgrade(request).await
}
