//! Black-box tests of how the log records the end of a streamed response: clients hanging up
//! mid-stream or before the first byte, complete streams, shutdown, and non-streamed answers.

use crate::common;

use std::time::Duration;

use aichat_fake_llm::{FakeConfig, FakeLlm, Outcome, RecordedRequest};
use common::{always, answered, ask, chat_body, client, fetch_json, is_content_chunk, start};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(5);

/// 200 words at 50 ms each: ten seconds of stream, far longer than any wait below.
fn slow_long_reply() -> FakeConfig {
    FakeConfig {
        reply_words: Some(200),
        chunk_delay_ms: 50,
        ..FakeConfig::default()
    }
}

/// Reads SSE events off `response` until `n` content (word) chunks have arrived.
async fn read_content_chunks(response: &mut reqwest::Response, n: u32) {
    let mut buffer = String::new();
    let mut seen = 0;
    while seen < n {
        let bytes = response
            .chunk()
            .await
            .expect("body chunk")
            .expect("the stream goes on");
        buffer.push_str(std::str::from_utf8(&bytes).expect("ASCII events"));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if is_content_chunk(&event) {
                seen += 1;
            }
        }
    }
}

/// The only record, once its stream has ended.
async fn ended_stream(fake: &FakeLlm) -> RecordedRequest {
    let records = fake
        .wait_until(WAIT, |records| records.iter().any(|r| r.stream_ended))
        .await
        .expect("the stream ends");
    assert_eq!(records.len(), 1);
    records[0].clone()
}

#[tokio::test]
async fn dropping_a_slow_stream_midway_is_recorded_as_a_hang_up() {
    let fake = start(slow_long_reply()).await;
    let client = client();
    let mut response = answered(&client, &fake, &chat_body("hi", true, true), 200).await;
    read_content_chunks(&mut response, 3).await;
    drop(response);

    let record = fake
        .wait_for_hang_up(WAIT)
        .await
        .expect("the hang-up is recorded long before the stream would end");
    assert!(record.stream && record.stream_ended && record.client_hung_up);
    assert!(
        (3..200).contains(&record.chunks_sent),
        "{} chunks sent",
        record.chunks_sent
    );
    assert_eq!(record.usage.map(|u| u.completion_tokens), Some(200));

    let log: Value = fetch_json(
        client.get(format!("http://{}/_fake/requests", fake.addr())),
        "get requests",
    )
    .await;
    assert_eq!(log[0]["stream_ended"], true);
    assert_eq!(log[0]["client_hung_up"], true);
    assert_eq!(log[0]["chunks_sent"], record.chunks_sent);
}

#[tokio::test]
async fn reading_the_whole_stream_is_no_hang_up_and_counts_every_chunk() {
    let fake = start(FakeConfig {
        reply_words: Some(20),
        chunk_delay_ms: 5,
        ..FakeConfig::default()
    })
    .await;
    let response = answered(&client(), &fake, &chat_body("hi", true, false), 200).await;
    let text = response.text().await.expect("whole body");
    assert!(text.ends_with("data: [DONE]\n\n"));

    let record = ended_stream(&fake).await;
    assert!(!record.client_hung_up);
    assert_eq!(record.chunks_sent, 20);
    assert_eq!(fake.wait_for_hang_up(Duration::from_millis(50)).await, None);
}

/// hyper watches the read side of a connection while it writes the response, so it drops the
/// body as soon as the client closes, not only when the next chunk fails to be written.
#[tokio::test]
async fn a_hang_up_is_noticed_before_the_next_chunk_is_due() {
    let fake = start(FakeConfig {
        reply_words: Some(5),
        chunk_delay_ms: 60_000,
        ..FakeConfig::default()
    })
    .await;
    let mut response = answered(&client(), &fake, &chat_body("hi", true, false), 200).await;
    // The role chunk comes at once; the first word would come a minute later.
    let first = response.chunk().await.expect("role chunk");
    assert!(first.is_some_and(|bytes| !bytes.is_empty()));
    drop(response);

    let record = fake
        .wait_for_hang_up(WAIT)
        .await
        .expect("hang-up noticed within the chunk interval");
    assert_eq!(record.chunks_sent, 0);
}

#[tokio::test]
async fn leaving_before_the_first_byte_is_a_hang_up() {
    for outcome in [Outcome::Slow { latency_ms: 60_000 }, Outcome::Hang] {
        let fake = start(always(outcome.clone())).await;
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .expect("client builds");
        let url = format!("{}/chat/completions", fake.base_url());
        let sent = impatient
            .post(url)
            .json(&chat_body("hi", true, false))
            .send()
            .await;
        assert!(sent.is_err_and(|e| e.is_timeout()), "{outcome:?}");

        let record = fake.wait_for_hang_up(WAIT).await.expect("hang-up recorded");
        assert!(record.stream_ended, "{outcome:?}");
        assert_eq!(record.chunks_sent, 0, "{outcome:?}");
    }
}

#[tokio::test]
async fn a_stream_cut_by_shutdown_is_no_hang_up() {
    let fake = start(slow_long_reply()).await;
    let state = fake.state().clone();
    let mut response = answered(&client(), &fake, &chat_body("hi", true, false), 200).await;
    read_content_chunks(&mut response, 1).await;
    tokio::time::timeout(WAIT, fake.shutdown())
        .await
        .expect("shutdown is prompt")
        .expect("shutdown is clean");

    let records = state
        .wait_until(WAIT, |records| records.iter().any(|r| r.stream_ended))
        .await
        .expect("the stream ends");
    assert!(!records[0].client_hung_up);
    assert!((1..200).contains(&records[0].chunks_sent));
}

#[tokio::test]
async fn plain_answers_and_injected_failures_are_no_hang_ups() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    answered(&client, &fake, &ask("plain"), 200).await;
    fake.push_script([Outcome::ServerError]);
    answered(&client, &fake, &chat_body("streamed", true, false), 500).await;

    let records = fake
        .wait_until(WAIT, |records| {
            records.len() == 2 && records[1].stream_ended
        })
        .await
        .expect("both recorded, the failed stream closed");
    let plain = &records[0];
    assert!(!plain.stream && !plain.stream_ended && !plain.client_hung_up);
    assert_eq!(plain.chunks_sent, 0);
    let failed = &records[1];
    assert!(failed.stream && !failed.client_hung_up);
    assert_eq!(failed.chunks_sent, 0);
}
