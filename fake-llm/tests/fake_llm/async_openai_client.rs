//! Compatibility tests: the real async-openai 0.43 client against the fake, streaming and not,
//! plus errors and a stream cut midway.

use crate::common;

use std::time::Duration;

use aichat_fake_llm::{FakeConfig, FakeLlm, Outcome, Usage};
use async_openai::{
    Client,
    config::OpenAIConfig,
    error::OpenAIError,
    types::chat::{
        ChatCompletionRequestSystemMessageArgs, ChatCompletionRequestUserMessageArgs,
        ChatCompletionStreamOptions, CompletionUsage, CreateChatCompletionRequest,
        CreateChatCompletionRequestArgs, FinishReason, Role,
    },
};
use common::start;
use futures::StreamExt;

fn client_for(fake: &FakeLlm) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(fake.base_url())
            .with_api_key("test"),
    )
}

fn request(user: &str, stream: bool) -> CreateChatCompletionRequest {
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model("fake-model").messages([
        ChatCompletionRequestSystemMessageArgs::default()
            .content("You are a helpful assistant.")
            .build()
            .expect("system message")
            .into(),
        ChatCompletionRequestUserMessageArgs::default()
            .content(user)
            .build()
            .expect("user message")
            .into(),
    ]);
    if stream {
        args.stream_options(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        });
    }
    args.build().expect("request")
}

/// Asserts that the client read the token counts the fake reports for a question `user`.
fn assert_usage(usage: &CompletionUsage, user: &str) {
    let expected = Usage::for_exchange(
        ["You are a helpful assistant.", user],
        &format!("Echo: {user}"),
    );
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (
            expected.prompt_tokens,
            expected.completion_tokens,
            expected.total_tokens
        )
    );
}

#[tokio::test]
async fn create_parses_content_and_usage() {
    let fake = start(FakeConfig::default()).await;
    let response = client_for(&fake)
        .chat()
        .create(request("how are you today", false))
        .await
        .expect("create succeeds");

    assert_eq!(response.object, "chat.completion");
    assert_eq!(response.model, "fake-model");
    let choice = &response.choices[0];
    assert_eq!(choice.message.role, Role::Assistant);
    assert_eq!(
        choice.message.content.as_deref(),
        Some("Echo: how are you today")
    );
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    assert_usage(&response.usage.expect("usage present"), "how are you today");
    let records = fake.requests();
    assert_eq!(records[0].api_key.as_deref(), Some("test"));
}

#[tokio::test]
async fn create_stream_parses_chunks_and_final_usage() {
    let fake = start(FakeConfig {
        chunk_delay_ms: 1,
        ..FakeConfig::default()
    })
    .await;
    let mut stream = client_for(&fake)
        .chat()
        .create_stream(request("stream me some words", true))
        .await
        .expect("stream opens");

    let mut text = String::new();
    let mut usage = None;
    let mut finish = None;
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk parses");
        chunks += 1;
        assert_eq!(chunk.object, "chat.completion.chunk");
        for choice in &chunk.choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or_default());
            finish = finish.or(choice.finish_reason);
        }
        if let Some(u) = chunk.usage {
            assert!(chunk.choices.is_empty());
            usage = Some(u);
        }
    }
    assert_eq!(text, "Echo: stream me some words");
    assert_eq!(finish, Some(FinishReason::Stop));
    // role + 5 words + finish + usage
    assert_eq!(chunks, 8);
    assert_usage(&usage.expect("final usage chunk"), "stream me some words");
    let records = fake.wait_for_requests(1, Duration::from_secs(5)).await;
    assert!(records[0].stream && records[0].include_usage);
}

#[tokio::test]
async fn error_bodies_parse_as_api_errors() {
    let fake = start(FakeConfig::default()).await;
    let client = client_for(&fake);

    // The client's built-in retry layer honours `Retry-After: 0` and succeeds on the retry,
    // which only works if it could parse the 429 body.
    fake.push_script([Outcome::RateLimited {
        retry_after: "0".to_owned(),
    }]);
    let response = client.chat().create(request("retry", false)).await;
    assert!(response.is_ok(), "{response:?}");
    assert_eq!(fake.requests().len(), 2);

    // insufficient_quota is permanent: no retry, typed error.
    fake.clear_requests();
    fake.push_script([Outcome::InsufficientQuota]);
    match client.chat().create(request("quota", false)).await {
        Err(OpenAIError::ApiError(e)) => {
            assert_eq!(e.status_code.as_u16(), 429);
            assert_eq!(e.api_error.code.as_deref(), Some("insufficient_quota"));
        }
        other => panic!("expected ApiError, got {other:?}"),
    }
    assert_eq!(fake.requests().len(), 1);

    fake.push_script([Outcome::BadRequest]);
    match client.chat().create_stream(request("bad", true)).await {
        Err(OpenAIError::ApiError(e)) => {
            assert_eq!(e.status_code.as_u16(), 400);
            assert_eq!(e.api_error.r#type.as_deref(), Some("invalid_request_error"));
        }
        Err(other) => panic!("expected ApiError, got {other:?}"),
        Ok(_) => panic!("expected ApiError, got a stream"),
    }
}

/// What the worker's `attempt` sees of a provider dropping the connection mid-reply: the
/// chunks sent so far, then a stream error (not a clean end without a finish reason).
#[tokio::test]
async fn create_stream_yields_the_chunks_before_a_cut_then_a_stream_error() {
    let fake = start(FakeConfig {
        chunk_delay_ms: 1,
        ..FakeConfig::default()
    })
    .await;
    fake.push_script([Outcome::Cut { after_chunks: 3 }]);
    let client = client_for(&fake);
    let mut stream = client
        .chat()
        .create_stream(request("stream me some words", true))
        .await
        .expect("stream opens");

    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    let mut chunks = 0;
    let error = loop {
        match stream.next().await {
            Some(Ok(chunk)) => {
                chunks += 1;
                for choice in &chunk.choices {
                    text.push_str(choice.delta.content.as_deref().unwrap_or_default());
                    finish = finish.or(choice.finish_reason);
                }
                usage = usage.or(chunk.usage);
            }
            Some(Err(error)) => break error,
            None => panic!("the stream ended cleanly after {chunks} chunks: {text:?}"),
        }
    };
    assert!(matches!(error, OpenAIError::StreamError(_)), "{error:?}");
    assert!(stream.next().await.is_none(), "nothing after the error");
    // role + 3 words
    assert_eq!(chunks, 4);
    assert_eq!(text, "Echo: stream me ");
    assert_eq!((finish, usage), (None, None));

    // The script is spent: the same client streams the next reply whole.
    let mut stream = client
        .chat()
        .create_stream(request("again", true))
        .await
        .expect("stream opens");
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        for choice in &chunk.expect("chunk parses").choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or_default());
        }
    }
    assert_eq!(text, "Echo: again");
    let outcomes: Vec<String> = fake.requests().into_iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, ["cut", "ok"]);
}
