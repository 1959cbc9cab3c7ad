//! Black-box tests of the chat-completions endpoint over real HTTP: shapes, streaming, usage, recording.

use crate::common;

use std::time::{Duration, Instant};

use aichat_fake_llm::{FakeConfig, Usage, prompt_tokens};
use common::{answered, ask, chat_body, client, json_body, parse_sse, start};
use serde_json::{Value, json};

#[tokio::test]
async fn non_stream_shape_and_usage() {
    let fake = start(FakeConfig::default()).await;
    let body = json_body(answered(&client(), &fake, &ask("hello there world"), 200).await).await;

    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-"))
    );
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "test-model");
    assert!(body["created"].as_u64().is_some_and(|c| c > 1_600_000_000));
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Echo: hello there world"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    // system: 3 words + 4, user: 3 words + 4; reply "Echo: hello there world" = 4 words.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 14, "completion_tokens": 4, "total_tokens": 18})
    );
}

#[tokio::test]
async fn stream_chunks_concatenate_and_usage_only_when_requested() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let user = "streaming  is\tfun";
    for include_usage in [false, true] {
        let body = chat_body(user, true, include_usage);
        let response = answered(&client, &fake, &body, 200).await;
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let chunks = parse_sse(&response.text().await.expect("body"));

        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, format!("Echo: {user}"));

        let finish_at = chunks
            .iter()
            .position(|c| c["choices"][0]["finish_reason"] == "stop")
            .expect("a finish chunk");
        assert_eq!(chunks[finish_at]["choices"][0]["delta"], json!({}));
        let usage_chunks: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
        if include_usage {
            assert_eq!(finish_at, chunks.len() - 2);
            let last = &chunks[chunks.len() - 1];
            assert_eq!(last["choices"], json!([]));
            assert_eq!(usage_chunks.len(), 1);
            let expected = Usage::for_exchange(["You are terse.", user], &text);
            assert_eq!(last["usage"], json!(expected));
            assert!(
                chunks[..chunks.len() - 1]
                    .iter()
                    .all(|c| c["usage"].is_null())
            );
        } else {
            assert_eq!(finish_at, chunks.len() - 1);
            assert!(usage_chunks.is_empty());
        }
    }
}

#[tokio::test]
async fn reply_words_and_chunk_delay() {
    let fake = start(FakeConfig {
        reply_words: Some(12),
        chunk_delay_ms: 20,
        ..FakeConfig::default()
    })
    .await;
    let started = Instant::now();
    let response = answered(&client(), &fake, &chat_body("ignored", true, true), 200).await;
    let chunks = parse_sse(&response.text().await.expect("body"));
    assert!(started.elapsed() >= Duration::from_millis(12 * 20));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text.split(' ').count(), 12);
    assert!(text.starts_with("lorem ipsum dolor"));
    assert_eq!(
        chunks.last().expect("usage chunk")["usage"]["completion_tokens"],
        12
    );
}

#[tokio::test]
async fn latency_is_honoured() {
    let fake = start(FakeConfig {
        latency_ms: 300,
        ..FakeConfig::default()
    })
    .await;
    let client = client();
    for stream in [false, true] {
        let started = Instant::now();
        answered(&client, &fake, &chat_body("hi", stream, false), 200).await;
        // Headers only arrive once the latency has passed.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "stream={stream}"
        );
    }
}

#[tokio::test]
async fn records_exact_messages() {
    let fake = start(FakeConfig::default()).await;
    let messages = json!([
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": [{"type": "text", "text": "part one"}]},
        {"role": "assistant", "content": "Echo: part one"},
        {"role": "user", "content": "second question", "name": "bob"},
    ]);
    let body = json!({"model": "m1", "messages": messages, "max_tokens": 50, "unknown": {"x": 1}});
    let answer = json_body(answered(&client(), &fake, &body, 200).await).await;
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Echo: second question"
    );

    let records = fake.wait_for_requests(1, Duration::from_secs(5)).await;
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(Value::Array(record.messages.clone()), messages);
    assert_eq!(record.model, "m1");
    assert!(!record.stream);
    assert_eq!(record.outcome, "ok");
    assert_eq!(record.api_key.as_deref(), Some("sk-test"));
    assert_eq!(record.params["max_tokens"], 50);
    let prompt = prompt_tokens(["Be nice.", "part one", "Echo: part one", "second question"]);
    assert_eq!(record.usage.map(|u| u.prompt_tokens), Some(prompt));
    assert_eq!(answer["usage"]["prompt_tokens"], prompt);
}

#[tokio::test]
async fn malformed_body_is_an_openai_400() {
    let fake = start(FakeConfig::default()).await;
    let malformed = json!({"messages": []});
    let body = json_body(answered(&client(), &fake, &malformed, 400).await).await;
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(fake.requests().is_empty());
}
