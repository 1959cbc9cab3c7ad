//! The model registry (`MODELS_FILE`) with two fake model servers, A and B: each chat reaches
//! its own model's server, the registry is the allow-list and the list, a failure before the
//! first token falls back (never after), a fallback's smaller window gets a prompt that fits,
//! each model has its own rate limit, and replies cost what the prices say.
use std::path::PathBuf;
use std::time::Duration;

use aichat_fake_llm::{FakeConfig, FakeLlm, Outcome};
use aichat_testkit::prompt_tokens;
use aichat_testkit::{InProcessWorker, eventually, fake_always, unique_name, worker_metrics_text};
use aichat_worker::context::TokenCounter;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::start_worker;
use crate::common::{TestApp, TestUser, id, spawn_app_with_flags, ws_events_until};

const WAIT: Duration = Duration::from_secs(30);

/// An app and a worker reading the same registry file, and the two model servers it names.
struct Models {
    app: TestApp,
    a: FakeLlm,
    b: FakeLlm,
    worker: InProcessWorker,
    file: PathBuf,
}

impl Models {
    /// `registry` writes the file from A's and B's base URLs.
    async fn start(
        a: FakeConfig,
        b: FakeConfig,
        registry: impl Fn(&str, &str) -> String,
        worker_flags: &[&str],
    ) -> Models {
        let a = FakeLlm::start(a).await.expect("fake model A");
        let b = FakeLlm::start(b).await.expect("fake model B");
        let file = std::env::temp_dir().join(format!("{}.toml", unique_name("aichat_models")));
        std::fs::write(&file, registry(&a.base_url(), &b.base_url())).expect("write the registry");
        let path = file.to_str().expect("a UTF-8 path");
        let app = spawn_app_with_flags(&["--models-file", path]).await;
        let mut flags = vec!["--models-file", path];
        flags.extend_from_slice(worker_flags);
        let worker = start_worker(&app, &a, &flags).await;
        Models {
            app,
            a,
            b,
            worker,
            file,
        }
    }

    async fn chat_on(&self, user: &TestUser, model: &str) -> i64 {
        id(&self
            .app
            .create_ai_chat(user, json!({"title": model, "model": model}))
            .await)
    }

    /// Sends `content` and waits for the message to end; the chat's messages then.
    async fn ask(&self, user: &TestUser, chat: i64, content: &str) -> Vec<Value> {
        let question = id(&self.app.send_ok(user, chat, content).await);
        eventually(WAIT, "the message ends", || async {
            let messages = self.app.messages(user, chat).await;
            let ended = messages.iter().any(|m| {
                m["id"] == question && m["status"] != "queued" && m["status"] != "answering"
            });
            ended.then_some(messages)
        })
        .await
    }

    async fn cleanup(self) {
        let Models {
            app, worker, file, ..
        } = self;
        app.cleanup().await;
        drop(worker);
        let _ = std::fs::remove_file(file);
    }
}

/// The assistant messages of `messages`.
fn replies(messages: &[Value]) -> Vec<&Value> {
    messages
        .iter()
        .filter(|m| m["role"] == "assistant")
        .collect()
}

/// Two models, A's and B's, without prices or fallbacks; `a_extra` and `b_extra` are more
/// lines of their tables.
fn two(a: &str, b: &str, a_extra: &str, b_extra: &str) -> String {
    format!(
        "[[models]]\nname = \"m-a\"\nbase_url = \"{a}\"\nprovider_model = \"prov-a\"\n{a_extra}\n\
         [[models]]\nname = \"m-b\"\nbase_url = \"{b}\"\nprovider_model = \"prov-b\"\n{b_extra}\n"
    )
}

#[tokio::test]
async fn each_chat_is_answered_by_its_models_server_only() {
    let models = Models::start(
        FakeConfig::default(),
        FakeConfig::default(),
        |a, b| two(a, b, "", ""),
        &[],
    )
    .await;
    let alice = models.app.user("alice").await;
    let on_b = models.chat_on(&alice, "m-b").await;
    let messages = models.ask(&alice, on_b, "to B").await;
    assert_eq!(replies(&messages).len(), 1, "{messages:?}");
    assert_eq!(replies(&messages)[0]["model"], "m-b");
    assert!(models.a.requests().is_empty(), "A was asked about B's chat");
    let asked_b: Vec<String> = models.b.requests().into_iter().map(|r| r.model).collect();
    assert_eq!(asked_b, ["prov-b"], "B is sent its own name for the model");

    let on_a = models.chat_on(&alice, "m-a").await;
    let messages = models.ask(&alice, on_a, "to A").await;
    assert_eq!(replies(&messages)[0]["model"], "m-a");
    let asked_a: Vec<String> = models.a.requests().into_iter().map(|r| r.model).collect();
    assert_eq!(asked_a, ["prov-a"]);
    assert_eq!(models.b.requests().len(), 1, "B was asked about A's chat");
    models.cleanup().await;
}

#[tokio::test]
async fn the_models_listed_are_the_registry_and_no_other_can_be_chosen() {
    let models = Models::start(
        FakeConfig::default(),
        FakeConfig::default(),
        |a, b| {
            format!(
                "default = \"m-b\"\n{}",
                two(
                    a,
                    b,
                    "api_key_env = \"PATH\"\ncontext_window = 16000\nmax_completion_tokens = 700\n\
                     input_price = \"0.15\"\noutput_price = \"0.60\"\ncurrency = \"EUR\"\n\
                     fallbacks = [\"m-b\"]",
                    "",
                )
            )
        },
        &[],
    )
    .await;
    let alice = models.app.user("alice").await;
    let (status, listed) = models.app.get("/api/ai/models/", &alice.token).await;
    assert_eq!(status, StatusCode::OK);
    // Names, windows, caps and prices: never where a model is served or with which key.
    assert_eq!(
        listed,
        json!([
            {"id": "m-a", "name": "m-a", "default": false, "context_window": 16000,
             "max_completion_tokens": 700, "input_price": "0.15", "output_price": "0.6",
             "currency": "EUR"},
            {"id": "m-b", "name": "m-b", "default": true, "context_window": null,
             "max_completion_tokens": 1024, "input_price": null, "output_price": null,
             "currency": null}
        ])
    );
    let chat = models
        .app
        .create_ai_chat(&alice, json!({"title": "t"}))
        .await;
    assert_eq!(
        chat["model"], "m-b",
        "a chat naming no model gets the default"
    );

    let unlisted = json!({"model": ["Select a valid choice. gpt-4o-mini is not one of the available models."]});
    let (status, errors) = models
        .app
        .post(
            "/api/ai/chats/",
            &alice.token,
            json!({"title": "t", "model": "gpt-4o-mini"}),
        )
        .await;
    assert_eq!(
        (status, errors),
        (StatusCode::BAD_REQUEST, unlisted.clone())
    );
    let path = format!("/api/ai/chats/{}/", id(&chat));
    let (status, errors) = models
        .app
        .call(
            Method::PATCH,
            &path,
            Some(&alice.token),
            Some(json!({"model": "gpt-4o-mini"})),
        )
        .await;
    assert_eq!((status, errors), (StatusCode::BAD_REQUEST, unlisted));
    let (_, stored) = models.app.get(&path, &alice.token).await;
    assert_eq!(
        stored["model"], "m-b",
        "the refused change left the chat as it was"
    );
    let (status, changed) = models
        .app
        .call(
            Method::PATCH,
            &path,
            Some(&alice.token),
            Some(json!({"model": "m-a"})),
        )
        .await;
    assert_eq!((status, &changed["model"]), (StatusCode::OK, &json!("m-a")));
    models.cleanup().await;
}

/// The line of `aichat_worker_model_fallbacks_total` from `from` to `to`, as a number.
async fn fallbacks(worker: &InProcessWorker, from: &str, to: &str) -> f64 {
    let text = worker_metrics_text(worker.port).await;
    let labels = [format!("from=\"{from}\""), format!("to=\"{to}\"")];
    text.lines()
        .filter(|line| line.starts_with("aichat_worker_model_fallbacks_total{"))
        .filter(|line| labels.iter().all(|l| line.contains(l.as_str())))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_model_that_fails_before_its_first_token_hands_the_message_to_its_fallback() {
    // Names of this test's own, so the shared metrics recorder counts only its fallbacks.
    let models = Models::start(
        fake_always(Outcome::ServerError),
        FakeConfig::default(),
        |a, b| {
            format!(
                "[[models]]\nname = \"down-a\"\nbase_url = \"{a}\"\nfallbacks = [\"up-b\"]\n\
                 [[models]]\nname = \"up-b\"\nbase_url = \"{b}\"\n"
            )
        },
        &[],
    )
    .await;
    let alice = models.app.user("alice").await;
    let chat = models.chat_on(&alice, "down-a").await;
    let messages = models.ask(&alice, chat, "anyone there?").await;
    let answered = replies(&messages);
    assert_eq!(answered.len(), 1, "{messages:?}");
    assert_eq!(
        answered[0]["model"], "up-b",
        "the reply names the model that answered"
    );
    assert_eq!(answered[0]["content"], "Echo: anyone there?");
    // A 5xx hands over at once: A's retries are not spent first.
    assert_eq!(models.a.requests().len(), 1);
    assert_eq!(models.b.requests().len(), 1);
    assert_eq!(fallbacks(&models.worker, "down-a", "up-b").await, 1.0);
    models.cleanup().await;
}

#[tokio::test]
async fn a_model_that_fails_after_streaming_is_never_finished_by_another() {
    let cut = FakeConfig {
        always: Some(Outcome::Cut { after_chunks: 3 }),
        reply_words: Some(12),
        ..FakeConfig::default()
    };
    let models = Models::start(
        cut,
        FakeConfig::default(),
        |a, b| {
            format!(
                "[[models]]\nname = \"cut-a\"\nbase_url = \"{a}\"\nfallbacks = [\"whole-b\"]\n\
                 [[models]]\nname = \"whole-b\"\nbase_url = \"{b}\"\n"
            )
        },
        &["--llm-max-attempts", "2"],
    )
    .await;
    let alice = models.app.user("alice").await;
    let chat = models.chat_on(&alice, "cut-a").await;
    let messages = models.ask(&alice, chat, "tell me a story").await;
    // Text of A had gone out: A retried and failed; B was never asked, nothing was stored.
    assert_eq!(models.a.requests().len(), 2, "A's own retries");
    assert!(models.b.requests().is_empty(), "B finished A's reply");
    assert!(replies(&messages).is_empty(), "{messages:?}");
    assert_eq!(messages[0]["status"], "failed");
    assert_eq!(fallbacks(&models.worker, "cut-a", "whole-b").await, 0.0);
    models.cleanup().await;
}

/// Models A, falling back to B, and B, whose window leaves 150 tokens of prompt.
async fn with_a_small_fallback(worker_flags: &[&str]) -> Models {
    Models::start(
        FakeConfig::default(),
        FakeConfig::default(),
        |a, b| {
            two(
                a,
                b,
                "fallbacks = [\"m-b\"]",
                "context_window = 250\nmax_completion_tokens = 100",
            )
        },
        worker_flags,
    )
    .await
}

#[tokio::test]
async fn a_fallback_with_a_smaller_window_gets_a_prompt_that_fits_it() {
    // 150 tokens of prompt for B: far less than the history A was sent.
    let models = with_a_small_fallback(&[]).await;
    let alice = models.app.user("alice").await;
    let chat = models.chat_on(&alice, "m-a").await;
    let long = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu ".repeat(3);
    for turn in 0..4 {
        models.ask(&alice, chat, &format!("{turn} {long}")).await;
    }
    models
        .a
        .state()
        .set_config(fake_always(Outcome::ServerError));
    let messages = models.ask(&alice, chat, "and now?").await;
    let last = replies(&messages).pop().expect("a reply");
    assert_eq!(last["model"], "m-b");
    let asked_a = models.a.requests();
    let asked_b = models.b.requests();
    assert_eq!(asked_b.len(), 1);
    let counter = TokenCounter::cl100k();
    let prompt = |messages: &[Value]| prompt_tokens(&counter, messages);
    let to_a = prompt(&asked_a.last().expect("A's last request").messages);
    let to_b = prompt(&asked_b[0].messages);
    assert!(to_a > 250, "A was sent the whole history ({to_a} tokens)");
    assert!(
        to_b <= 150,
        "B was sent {to_b} tokens, more than its window leaves"
    );
    assert_eq!(
        asked_b[0].messages.last().map(|m| m["content"].clone()),
        Some(json!("and now?"))
    );
    assert_eq!(asked_b[0].params["max_completion_tokens"], 100);
    models.cleanup().await;
}

#[tokio::test]
async fn a_failure_is_not_handed_to_a_fallback_without_room_for_the_question() {
    // The question alone is longer than B's 150 tokens of prompt.
    let models = with_a_small_fallback(&["--llm-backoff-base-ms", "10"]).await;
    models.a.push_script([Outcome::ServerError]);
    let alice = models.app.user("alice").await;
    let chat = models.chat_on(&alice, "m-a").await;
    let question = "alpha beta gamma delta epsilon zeta eta theta iota kappa ".repeat(30);
    let messages = models.ask(&alice, chat, &question).await;
    // A's own retry answered it: the 5xx was not handed to a model that could not take it.
    let answered = replies(&messages);
    assert_eq!(answered.len(), 1, "{messages:?}");
    assert_eq!(answered[0]["model"], "m-a");
    let outcomes: Vec<String> = models.a.requests().into_iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, ["server_error", "ok"]);
    assert!(models.b.requests().is_empty());
    models.cleanup().await;
}

#[tokio::test]
async fn a_model_at_its_request_limit_does_not_hold_up_chats_on_another() {
    // A admits one request per minute; B has the default limits.
    let models = Models::start(
        FakeConfig::default(),
        FakeConfig::default(),
        |a, b| two(a, b, "rpm = 1", ""),
        &[],
    )
    .await;
    let alice = models.app.user("alice").await;
    let on_a = models.chat_on(&alice, "m-a").await;
    models.ask(&alice, on_a, "first").await;
    let waiting = id(&models.app.send_ok(&alice, on_a, "second").await);
    let on_b = models.chat_on(&alice, "m-b").await;
    let messages = models.ask(&alice, on_b, "meanwhile").await;
    assert_eq!(replies(&messages).len(), 1, "{messages:?}");
    let on_a_now = models.app.messages(&alice, on_a).await;
    let second = on_a_now
        .iter()
        .find(|m| m["id"] == waiting)
        .expect("the second message");
    assert!(
        second["status"] == "queued" || second["status"] == "answering",
        "A's second message was not held by A's limit: {second}"
    );
    assert_eq!(models.a.requests().len(), 1, "A's limit was passed");
    models.cleanup().await;
}

/// Cost in units of 10⁻⁸ written as a decimal: an independent check of the worker's sums.
fn decimal_e8(units: u64) -> String {
    let whole = units / 100_000_000;
    let fraction = units % 100_000_000;
    if fraction == 0 {
        return whole.to_string();
    }
    let fraction = format!("{fraction:08}");
    format!("{whole}.{}", fraction.trim_end_matches('0'))
}

#[tokio::test]
async fn a_replys_cost_is_its_tokens_at_its_models_prices_per_model_and_in_total() {
    let models = Models::start(
        FakeConfig::default(),
        FakeConfig::default(),
        |a, b| {
            two(
                a,
                b,
                "input_price = \"0.15\"\noutput_price = \"0.6\"\ncurrency = \"USD\"",
                "input_price = 3\noutput_price = 15\ncurrency = \"USD\"",
            )
        },
        &[],
    )
    .await;
    let alice = models.app.user("alice").await;
    // Prices per million tokens in units of 10⁻⁸ per token: 0.15 → 15, 0.6 → 60, 3 → 300,
    // 15 → 1,500.
    let mut expected = Vec::new();
    for (model, input, output) in [("m-a", 15, 60), ("m-b", 300, 1500)] {
        let chat = models.chat_on(&alice, model).await;
        let mut ws = models.app.ws(chat, &alice.token, None).await;
        let messages = models.ask(&alice, chat, "what does this cost?").await;
        let reply = replies(&messages)[0].clone();
        // The socket's event carries the same cost, in its `usage`.
        let (event, _) = ws_events_until(&mut ws, WAIT, "the reply's event", |event| {
            event["type"] == "assistant_message"
        })
        .await;
        assert_eq!(event["message"]["usage"]["cost"], reply["cost"], "{event}");
        assert_eq!(event["message"]["usage"]["currency"], "USD", "{event}");
        let prompt = reply["prompt_tokens"].as_u64().expect("prompt tokens");
        let completion = reply["completion_tokens"]
            .as_u64()
            .expect("completion tokens");
        let units = prompt * input + completion * output;
        assert_eq!(reply["cost"], json!(decimal_e8(units)), "{reply}");
        assert_eq!(reply["currency"], "USD");
        expected.push((model, units));
    }
    let (status, usage) = models.app.get("/api/ai/usage/", &alice.token).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    for (model, units) in &expected {
        let row = usage["by_model"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["model"] == *model))
            .unwrap_or_else(|| panic!("{model} in {usage}"));
        assert_eq!(row["cost"], json!({"USD": decimal_e8(*units)}), "{usage}");
    }
    let total: u64 = expected.iter().map(|(_, units)| units).sum();
    assert_eq!(
        usage["total"]["cost"],
        json!({"USD": decimal_e8(total)}),
        "{usage}"
    );
    let today = &usage["by_day"][0];
    assert_eq!(today["cost"], json!({"USD": decimal_e8(total)}), "{usage}");
    models.cleanup().await;
}

/// Runs the API binary with `MODELS_FILE` holding `registry` until it exits: its exit code and
/// what it wrote to stderr.
async fn api_with_registry(registry: &str) -> (Option<i32>, String) {
    let file = std::env::temp_dir().join(format!("{}.toml", unique_name("aichat_broken")));
    std::fs::write(&file, registry).expect("write the registry");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_aichat-api"))
        .env("MODELS_FILE", &file)
        // Nothing listens here: an API that got past the registry would fail on it instead.
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .env("API_ADDR", "127.0.0.1:0")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("the API exits at once")
        .expect("run the API binary");
    let _ = std::fs::remove_file(file);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_broken_registry_stops_the_api_naming_the_line() {
    let good = "[[models]]\nname = \"m-a\"\nbase_url = \"http://127.0.0.1:9/v1\"\n";
    for (registry, says) in [
        (format!("{good}fallbacks = [\"m-z\"]\n"), "line 4"),
        (
            format!(
                "{good}fallbacks = [\"m-b\"]\n[[models]]\nname = \"m-b\"\nbase_url = \"http://127.0.0.1:9/v1\"\nfallbacks = [\"m-a\"]\n"
            ),
            "cycle",
        ),
        ("[[models]\n".to_owned(), "line 1"),
        (format!("{good}context_windw = 4000\n"), "context_windw"),
        (
            format!(
                "{good}fallbacks = [\"{long}\"]\n[[models]]\nname = \"{long}\"\nbase_url = \"http://127.0.0.1:9/v1\"\n",
                long = "m".repeat(101)
            ),
            "line 6: a model's `name` has at most 100 characters",
        ),
    ] {
        let (code, stderr) = api_with_registry(&registry).await;
        assert_eq!(code, Some(1), "{registry}: {stderr}");
        assert!(
            stderr.contains("MODELS_FILE") && stderr.contains(says),
            "{says}: {stderr}"
        );
    }
}
