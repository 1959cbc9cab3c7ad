//! Shared helpers for the black-box HTTP tests: starting a fake and talking to it with reqwest.

#![allow(dead_code)]

use std::time::Duration;

use aichat_fake_llm::{FakeConfig, FakeLlm, Outcome};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub async fn start(config: FakeConfig) -> FakeLlm {
    FakeLlm::start(config).await.expect("fake starts")
}

/// The default configuration, answering every call with `outcome` once the script is empty.
pub fn always(outcome: Outcome) -> FakeConfig {
    FakeConfig {
        always: Some(outcome),
        ..FakeConfig::default()
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client builds")
}

pub fn chat_body(user: &str, stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": user},
        ],
        "temperature": 0.2,
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": include_usage});
    }
    body
}

/// A plain chat request: `user` after a system message, not streamed.
pub fn ask(user: &str) -> Value {
    chat_body(user, false, false)
}

pub async fn post_chat(
    client: &reqwest::Client,
    fake: &FakeLlm,
    body: &Value,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(format!("{}/chat/completions", fake.base_url()))
        .bearer_auth("sk-test")
        .json(body)
        .send()
        .await
}

/// POSTs `body` to the fake's chat completions and insists on an answer with `status`.
pub async fn answered(
    client: &reqwest::Client,
    fake: &FakeLlm,
    body: &Value,
    status: u16,
) -> reqwest::Response {
    let response = post_chat(client, fake, body)
        .await
        .expect("request succeeds");
    assert_eq!(response.status(), status, "{body}");
    response
}

/// The JSON body of `response`.
pub async fn json_body(response: reqwest::Response) -> Value {
    response.json().await.expect("json body")
}

/// Sends `request` (`what` names it) and reads its answer as JSON.
pub async fn fetch_json<T: DeserializeOwned>(request: reqwest::RequestBuilder, what: &str) -> T {
    let response = request.send().await.expect(what);
    response.json().await.expect("json")
}

/// Parses an SSE body into the JSON of each `data:` event, checking it ends with `[DONE]`.
pub fn parse_sse(text: &str) -> Vec<Value> {
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .expect("every event is a data line")
        })
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "stream ends with [DONE]");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk is JSON"))
        .collect()
}

/// Whether one SSE event is a word of the reply, as opposed to the role, finish and usage
/// chunks or `[DONE]`.
pub fn is_content_chunk(event: &str) -> bool {
    let Some(Ok(chunk)) = event
        .trim_end()
        .strip_prefix("data: ")
        .map(serde_json::from_str::<Value>)
    else {
        return false;
    };
    chunk["choices"][0]["delta"]["content"]
        .as_str()
        .is_some_and(|content| !content.is_empty())
}
