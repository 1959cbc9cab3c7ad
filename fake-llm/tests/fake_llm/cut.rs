//! Black-box tests of the injected mid-stream cut: what a client reads before the connection
//! breaks, how the log records it, and what a plain request gets instead.

use crate::common;

use std::time::Duration;

use aichat_fake_llm::{FakeConfig, FakeLlm, Outcome, RecordedRequest};
use common::{
    answered, ask, chat_body, client, fetch_json, is_content_chunk, json_body, parse_sse, start,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

/// Reads `response`'s body to its end: the text received, and `Err` if the body broke off
/// (a transport error) instead of ending cleanly.
async fn read_to_end(mut response: reqwest::Response) -> (String, reqwest::Result<()>) {
    let mut text = String::new();
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => text.push_str(std::str::from_utf8(&bytes).expect("ASCII events")),
            Ok(None) => return (text, Ok(())),
            Err(error) => return (text, Err(error)),
        }
    }
}

/// The SSE events of `text` that arrived whole.
fn events(text: &str) -> Vec<&str> {
    text.split_inclusive("\n\n")
        .filter(|event| event.ends_with("\n\n"))
        .collect()
}

fn content_chunks(text: &str) -> usize {
    events(text)
        .into_iter()
        .filter(|e| is_content_chunk(e))
        .count()
}

/// Asserts the stream of `text` got its role chunk but never finished.
fn assert_unfinished(text: &str) {
    let events = events(text);
    assert!(
        events
            .first()
            .is_some_and(|e| e.contains(r#""role":"assistant""#)),
        "{text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(!text.contains(r#""finish_reason":"stop""#), "{text}");
    assert!(!text.contains(r#""choices":[]"#), "no usage chunk: {text}");
}

/// The `index`-th record (0-based), once its stream has ended.
async fn ended_record(fake: &FakeLlm, index: usize) -> RecordedRequest {
    let records = fake
        .wait_until(WAIT, |records| {
            records.get(index).is_some_and(|r| r.stream_ended)
        })
        .await
        .expect("the stream ends");
    records[index].clone()
}

#[tokio::test]
async fn a_cut_stream_breaks_after_its_chunks_and_the_next_one_streams_normally() {
    // No chunk delay: the chunks before the cut must still reach the client, not die in
    // hyper's write buffer with the connection.
    let fake = start(FakeConfig {
        reply_words: Some(10),
        ..FakeConfig::default()
    })
    .await;
    let client = client();
    let script = json!({"kind": "cut", "after_chunks": 4});
    let post = client
        .post(format!("http://{}/_fake/script", fake.addr()))
        .json(&script);
    let scripted: Vec<Outcome> = fetch_json(post, "post script").await;
    assert_eq!(scripted, [Outcome::Cut { after_chunks: 4 }]);

    let body = chat_body("hi", true, true);
    let response = answered(&client, &fake, &body, 200).await;
    let (text, ended) = read_to_end(response).await;
    let error = ended.expect_err("the body breaks off instead of ending cleanly");
    assert!(error.is_body() || error.is_decode(), "{error:?}");
    assert_eq!(content_chunks(&text), 4, "{text}");
    assert_unfinished(&text);

    let record = ended_record(&fake, 0).await;
    assert_eq!(record.outcome, "cut");
    assert!(record.stream && record.stream_ended && !record.client_hung_up);
    assert_eq!(record.chunks_sent, 4);
    assert_eq!(record.usage, None);

    let response = answered(&client, &fake, &body, 200).await;
    let chunks = parse_sse(&response.text().await.expect("whole body"));
    // role + 10 words + finish + usage
    assert_eq!(chunks.len(), 13);
    assert_eq!(chunks[11]["choices"][0]["finish_reason"], "stop");
    let record = ended_record(&fake, 1).await;
    assert_eq!(record.outcome, "ok");
    assert_eq!(record.chunks_sent, 10);
}

#[tokio::test]
async fn a_cut_past_the_last_word_still_withholds_the_finish() {
    let fake = start(FakeConfig {
        chunk_delay_ms: 5,
        ..FakeConfig::default()
    })
    .await;
    fake.push_script([Outcome::Cut { after_chunks: 50 }]);
    let response = answered(&client(), &fake, &chat_body("hi", true, false), 200).await;
    let (text, ended) = read_to_end(response).await;
    assert!(ended.is_err(), "{text}");
    // "Echo: hi" is two words.
    assert_eq!(content_chunks(&text), 2, "{text}");
    assert_unfinished(&text);

    let record = ended_record(&fake, 0).await;
    assert!(!record.client_hung_up);
    assert_eq!(record.chunks_sent, 2);
}

#[tokio::test]
async fn a_cut_of_a_plain_request_is_a_server_error() {
    let fake = start(FakeConfig::default()).await;
    fake.push_script([Outcome::Cut { after_chunks: 1 }]);
    let error: Value = json_body(answered(&client(), &fake, &ask("hi"), 500).await).await;
    assert_eq!(error["error"]["type"], "server_error");

    let record = &fake.requests()[0];
    assert_eq!(record.outcome, "cut");
    assert!(!record.stream && !record.stream_ended && !record.client_hung_up);
    assert_eq!(record.chunks_sent, 0);
}
