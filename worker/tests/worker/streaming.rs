//! A message answered end to end: streamed, saved with the model's token counts, announced.

use crate::common::{MODEL, SYSTEM_PROMPT, TestEnv, WAIT, chat_event, worker_metrics_text};
use aichat_fake_llm::{FakeConfig, Usage};
use aichat_shared::events::ChatEvent;
use serde_json::Value;

#[tokio::test]
async fn a_sent_message_is_streamed_saved_with_the_models_token_counts_and_announced() {
    let env = TestEnv::start(FakeConfig {
        chunk_delay_ms: 15,
        ..FakeConfig::default()
    })
    .await;
    let worker = env.spawn_worker(&["--delta-flush-chars", "8"]).await;
    env.wait_ready(worker.port).await;
    let (chat, mut events) = env.watched_chat().await;

    let content = "tell me about the weather in spring";
    let sent = env.ask(chat, content).await;
    let reply = events.reply_to(sent.id, WAIT).await;

    let expected_reply = format!("Echo: {content}");
    let usage = Usage::for_exchange([SYSTEM_PROMPT, content], &expected_reply);
    // (prompt, completion, total) tokens, as the event and the row carry them.
    let expected_tokens = (
        Some(usage.prompt_tokens as i32),
        Some(usage.completion_tokens as i32),
        Some(usage.total_tokens as i32),
    );
    let ChatEvent::AssistantMessage { message } = chat_event(&reply) else {
        panic!("not an assistant_message: {reply}");
    };
    assert_eq!(message.content, expected_reply);
    assert_eq!(message.reply_to, Some(sent.id));
    let event_usage = message.usage.expect("usage in the event");
    let event_tokens = (
        event_usage.prompt_tokens,
        event_usage.completion_tokens,
        event_usage.total_tokens,
    );
    assert_eq!(event_tokens, expected_tokens);

    // Deltas came first, all for this message, and add up to the reply.
    let deltas: Vec<String> = events
        .of_type("assistant_delta")
        .into_iter()
        .map(|e| match chat_event(e) {
            ChatEvent::AssistantDelta {
                message_id, delta, ..
            } => {
                assert_eq!(message_id, sent.id);
                delta
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        deltas.len() >= 2,
        "coalesced but still streamed: {deltas:?}"
    );
    assert_eq!(deltas.concat(), expected_reply);
    assert_eq!(
        events.seen.last().map(|e| e["type"].clone()),
        Some(Value::from("assistant_message"))
    );

    // Stored: the reply with tokens, model and latency; the question answered.
    let stored = env.messages(chat).await;
    assert_eq!(stored.len(), 2);
    let question = &stored[0];
    assert_eq!(
        (question.status.as_str(), question.error.as_deref()),
        ("answered", None)
    );
    let answer = &stored[1];
    assert_eq!(answer.id, message.id);
    assert_eq!(answer.role, "assistant");
    assert_eq!(answer.status, "complete");
    assert_eq!(answer.content, expected_reply);
    assert_eq!(answer.reply_to, Some(sent.id));
    assert_eq!(answer.model.as_deref(), Some(MODEL));
    let stored_tokens = (
        answer.prompt_tokens,
        answer.completion_tokens,
        answer.total_tokens,
    );
    assert_eq!(stored_tokens, expected_tokens);
    let latency: Option<i32> =
        sqlx::query_scalar("select latency_ms from ai_messages where id = $1")
            .bind(answer.id)
            .fetch_one(&env.db)
            .await
            .expect("latency");
    assert!(latency.is_some_and(|ms| ms >= 0), "{latency:?}");

    // The model was asked once, streaming, with usage requested, for the chat's model.
    let requests = env.fake.requests();
    assert_eq!(requests.len(), 1);
    assert!(requests[0].stream && requests[0].include_usage);
    assert_eq!(requests[0].model, MODEL);
    assert_eq!(requests[0].api_key.as_deref(), Some("test-key"));

    let metrics = worker_metrics_text(worker.port).await;
    for name in [
        "aichat_worker_jobs_started_total",
        "aichat_worker_jobs_succeeded_total",
        "aichat_worker_model_latency_seconds_bucket",
        "aichat_worker_job_duration_seconds_bucket",
        "aichat_worker_tokens_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }

    env.finish([worker]).await;
}

/// A model may send U+0000, which PostgreSQL's text cannot hold: the reply is saved and
/// announced with U+FFFD in its place (in the deltas as well), and the question is answered
/// once, not retried until the job dies.
#[tokio::test]
async fn a_reply_holding_nul_characters_is_saved_with_replacement_characters() {
    let env = TestEnv::start(FakeConfig {
        reply: Some("before\u{0}after \u{0}".into()),
        ..FakeConfig::default()
    })
    .await;
    let worker = env.spawn_worker(&["--delta-flush-chars", "1"]).await;
    env.wait_ready(worker.port).await;
    let (chat, mut events) = env.watched_chat().await;
    let sent = env.ask(chat, "say something odd").await;
    let reply = events.reply_to(sent.id, WAIT).await;

    let expected = "before\u{FFFD}after \u{FFFD}";
    let ChatEvent::AssistantMessage { message } = chat_event(&reply) else {
        panic!("not an assistant_message: {reply}");
    };
    assert_eq!(message.content, expected);
    let deltas: String = events
        .of_type("assistant_delta")
        .into_iter()
        .map(|e| match chat_event(e) {
            ChatEvent::AssistantDelta { delta, .. } => delta,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(deltas, expected);
    let stored = env.messages(chat).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0].status, "answered");
    assert_eq!(stored[1].content, expected);
    assert_eq!(env.fake.requests().len(), 1, "asked once");
    env.finish([worker]).await;
}

/// A provider whose connection drops after the finish chunk, before the usage chunk and
/// `[DONE]`: the reply was whole, so it is saved as it came, once, with its tokens counted by
/// the tokenizer; the model is not asked again.
#[tokio::test]
async fn a_stream_broken_after_its_finish_reason_is_a_whole_reply() {
    let env = TestEnv::start(FakeConfig::default()).await;
    env.fake
        .push_script([aichat_fake_llm::Outcome::CutAfterFinish]);
    let worker = env.spawn_worker(&["--llm-backoff-base-ms", "10"]).await;
    let (chat, mut events) = env.watched_chat().await;
    let content = "one answer, please";
    let sent = env.ask(chat, content).await;
    let reply = events.reply_to(sent.id, WAIT).await;
    let ChatEvent::AssistantMessage { message } = chat_event(&reply) else {
        panic!("not an assistant_message: {reply}");
    };
    assert_eq!(message.content, format!("Echo: {content}"));
    let outcomes: Vec<String> = env.fake.requests().into_iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, ["cut_after_finish"]);
    let usage = message.usage.expect("usage in the event");
    let (prompt, completion) = (
        usage.prompt_tokens.unwrap_or_default(),
        usage.completion_tokens.unwrap_or_default(),
    );
    assert!(prompt > 0 && completion > 0, "{usage:?}");
    assert_eq!(env.replies(chat).await.len(), 1);
    env.finish([worker]).await;
}
