//! Black-box tests of the control API over HTTP: config, script, request log, health and models.

use crate::common;

use std::time::Duration;

use aichat_fake_llm::{FakeConfig, Outcome, RecordedRequest};
use common::{always, answered, ask, chat_body, client, fetch_json, json_body, post_chat, start};
use serde_json::{Value, json};

#[tokio::test]
async fn control_api_round_trip() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let root = format!("http://{}", fake.addr());

    let config = json!({"latency_ms": 5, "reply_words": 3, "always": null});
    let put = client.put(format!("{root}/_fake/config")).json(&config);
    let config: Value = fetch_json(put, "put config").await;
    assert_eq!(config["latency_ms"], 5);
    assert_eq!(config["reply_words"], 3);
    assert_eq!(config["hang_ms"], 600_000);
    assert_eq!(fake.config().reply_words, Some(3));

    let get = client.get(format!("{root}/_fake/config"));
    let fetched: FakeConfig = fetch_json(get, "get config").await;
    assert_eq!(fetched, fake.config());

    let bad = client
        .put(format!("{root}/_fake/config"))
        .json(&json!({"fail_rate": 3.0}))
        .send()
        .await
        .expect("put config");
    assert_eq!(bad.status(), 400);

    let script = json!([{"kind": "rate_limited", "retry_after": "Wed, 21 Oct 2037 07:28:00 GMT"}, {"kind": "ok"}]);
    let post = client.post(format!("{root}/_fake/script")).json(&script);
    let script: Vec<Outcome> = fetch_json(post, "post script").await;
    assert_eq!(script.len(), 2);

    let response = answered(&client, &fake, &ask("x"), 429).await;
    assert_eq!(
        response.headers()["retry-after"],
        "Wed, 21 Oct 2037 07:28:00 GMT"
    );
    let answer = json_body(answered(&client, &fake, &ask("x"), 200).await).await;
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "lorem ipsum dolor"
    );

    let get = client.get(format!("{root}/_fake/requests"));
    let records: Vec<RecordedRequest> = fetch_json(get, "get requests").await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].outcome, "rate_limited");
    assert!(records[0].seq < records[1].seq);
    assert_eq!(
        records[1].messages,
        ask("x")["messages"].as_array().cloned().unwrap_or_default()
    );

    let cleared = client
        .delete(format!("{root}/_fake/requests"))
        .send()
        .await
        .expect("delete requests");
    assert!(cleared.status().is_success());
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn health_models_and_invalid_script() {
    let fake = start(FakeConfig::default()).await;
    let client = client();
    let root = format!("http://{}", fake.addr());

    let health = client
        .get(format!("{root}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.expect("text"), "ok");

    let get = client.get(format!("{}/models", fake.base_url()));
    let models: Value = fetch_json(get, "models").await;
    assert_eq!(models["object"], "list");
    assert!(models["data"].as_array().is_some_and(|d| !d.is_empty()));

    let bad = client
        .post(format!("{root}/_fake/script"))
        .json(&json!([{"kind": "explode"}]))
        .send()
        .await
        .expect("post script");
    assert_eq!(bad.status(), 400);
    assert!(fake.state().script().is_empty());
}

#[tokio::test]
async fn wait_for_requests_wakes_on_arrival_and_times_out() {
    let fake = start(FakeConfig::default()).await;
    assert!(
        fake.wait_for_requests(1, Duration::from_millis(50))
            .await
            .is_empty()
    );

    let (records, response) =
        tokio::join!(fake.wait_for_requests(2, Duration::from_secs(10)), async {
            let client = client();
            post_chat(&client, &fake, &ask("a")).await.expect("chat");
            post_chat(&client, &fake, &chat_body("b", true, false)).await
        });
    assert_eq!(response.expect("chat").status(), 200);
    assert_eq!(records.len(), 2);
    assert!(records[1].stream);
}

#[tokio::test]
async fn shutdown_ends_hanging_requests() {
    let fake = start(always(Outcome::Hang)).await;
    let client = client();
    let pending = {
        let url = format!("{}/chat/completions", fake.base_url());
        let client = client.clone();
        tokio::spawn(async move { client.post(url).json(&ask("h")).send().await })
    };
    fake.wait_for_requests(1, Duration::from_secs(5)).await;
    tokio::time::timeout(Duration::from_secs(5), fake.shutdown())
        .await
        .expect("shutdown is prompt")
        .expect("shutdown is clean");
    let response = pending
        .await
        .expect("task")
        .expect("answered before shutdown");
    assert_eq!(response.status(), 504);
}
