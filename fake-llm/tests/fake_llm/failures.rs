//! Black-box tests of failure injection over real HTTP: scripted 429/500/400, hangs, always, fail_rate.

use crate::common;

use std::time::{Duration, Instant};

use aichat_fake_llm::{FakeConfig, Outcome};
use common::{always, answered, ask, chat_body, client, json_body, post_chat, start};

#[tokio::test]
async fn scripted_rate_limit_has_retry_after_then_recovers() {
    let fake = start(FakeConfig::default()).await;
    fake.push_script([
        Outcome::RateLimited {
            retry_after: "7".to_owned(),
        },
        Outcome::InsufficientQuota,
    ]);
    let client = client();
    let body = ask("hi");

    let response = answered(&client, &fake, &body, 429).await;
    assert_eq!(response.headers()["retry-after"], "7");
    let error = json_body(response).await;
    assert_eq!(error["error"]["type"], "requests");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert!(error["error"]["message"].is_string());
    assert!(error["error"]["param"].is_null());

    let response = answered(&client, &fake, &body, 429).await;
    assert!(response.headers().get("retry-after").is_none());
    let error = json_body(response).await;
    assert_eq!(error["error"]["code"], "insufficient_quota");

    answered(&client, &fake, &body, 200).await;
    let outcomes: Vec<String> = fake.requests().into_iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, ["rate_limited", "insufficient_quota", "ok"]);
    assert_eq!(fake.requests()[0].usage, None);
}

#[tokio::test]
async fn scripted_server_error_and_bad_request() {
    let fake = start(FakeConfig::default()).await;
    fake.push_script([Outcome::ServerError, Outcome::BadRequest]);
    let client = client();
    let body = chat_body("hi", true, true);

    let error = json_body(answered(&client, &fake, &body, 500).await).await;
    assert_eq!(error["error"]["type"], "server_error");

    let error = json_body(answered(&client, &fake, &body, 400).await).await;
    assert_eq!(error["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn hang_makes_the_client_time_out_and_the_server_keeps_serving() {
    let fake = start(FakeConfig::default()).await;
    fake.push_script([Outcome::Hang]);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client builds");
    let error = post_chat(&impatient, &fake, &ask("hi"))
        .await
        .expect_err("the hung request times out");
    assert!(error.is_timeout(), "{error}");

    answered(&client(), &fake, &ask("again"), 200).await;
    let outcomes: Vec<String> = fake.requests().into_iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, ["hang", "ok"]);
}

#[tokio::test]
async fn hang_is_bounded_by_hang_ms() {
    let fake = start(FakeConfig {
        hang_ms: 200,
        ..always(Outcome::Hang)
    })
    .await;
    let started = Instant::now();
    answered(&client(), &fake, &ask("hi"), 504).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn slow_outcome_overrides_latency() {
    let fake = start(FakeConfig::default()).await;
    fake.push_script([Outcome::Slow { latency_ms: 250 }]);
    let started = Instant::now();
    answered(&client(), &fake, &ask("hi"), 200).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(fake.requests()[0].outcome, "slow");
}

#[tokio::test]
async fn always_applies_once_the_script_is_empty() {
    let fake = start(always(Outcome::ServerError)).await;
    fake.push_script([Outcome::Ok]);
    let client = client();
    let body = ask("hi");
    let statuses = [
        post_chat(&client, &fake, &body).await.expect("ok").status(),
        post_chat(&client, &fake, &body).await.expect("ok").status(),
        post_chat(&client, &fake, &body).await.expect("ok").status(),
    ];
    assert_eq!(statuses.map(|s| s.as_u16()), [200, 500, 500]);
}

#[tokio::test]
async fn fail_rate_is_reproducible_for_a_seed() {
    let config = FakeConfig {
        fail_rate: 0.5,
        seed: 1234,
        hang_ms: 1,
        ..FakeConfig::default()
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let fake = start(config.clone()).await;
        let client = client();
        let mut statuses = Vec::new();
        for _ in 0..30 {
            let response = post_chat(&client, &fake, &ask("hi"))
                .await
                .expect("request succeeds");
            statuses.push(response.status().as_u16());
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(runs[0].contains(&200));
    assert!(runs[0].iter().any(|s| *s != 200));
    assert!(runs[0].iter().all(|s| [200, 429, 500, 504].contains(s)));
}
