//! Calling the model: async-openai with its own retries switched off, one streamed attempt at
//! a time, and our retry policy around it (exponential backoff with full jitter, `Retry-After`,
//! caps on attempts and total time), every attempt admitted by the shared rate limit first.
//!
//! async-openai's default client retries 429/5xx/connection errors by itself, hidden from us.
//! We install our own tower service with `Client::with_http_service` instead: it sends the
//! request with a plain `reqwest::Client` (no retry layer) and copies the status and the
//! `Retry-After` header of error responses aside, because async-openai turns them into an
//! `OpenAIError` that keeps the status but drops the headers.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CompletionUsage, CreateChatCompletionRequest,
};
use chrono::Utc;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{HeaderValue, RETRY_AFTER};
use secrecy::ExposeSecret;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use aichat_shared::lock::lock;
use aichat_shared::models::Registry;

use crate::context::{PromptMessage, Role};
use crate::deltas::Piece;
use crate::metrics;
use crate::rate_limit::{RateLimitError, RateLimiter};
use crate::retry::{AttemptError, FailureReason, RetryPolicy, classify, parse_retry_after};

/// What the model is asked.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The registry's name of the model: its client, its rate limit, its metrics.
    pub model: String,
    /// The provider's name of it, sent as `model`.
    pub provider_model: String,
    pub messages: Vec<PromptMessage>,
    /// The reply's cap, sent to the provider.
    pub max_completion_tokens: u32,
    /// Tokens of `messages` as counted here: the prompt's usage of a reply stopped before
    /// the provider reported any.
    pub prompt_tokens: u64,
    /// Prompt tokens plus the completion allowance, reserved under the token rate limit.
    pub estimated_tokens: u64,
}

/// A finished reply.
#[derive(Debug, Clone)]
pub struct Completion {
    pub content: String,
    /// `None` when the provider sent no usage chunk.
    pub usage: Option<CompletionUsage>,
    /// Duration of the attempt that produced the reply.
    pub latency: Duration,
    pub attempts: u32,
    /// Its user stopped it while it streamed: `content` is the text received until then, and
    /// `usage` is whatever the provider had reported (normally nothing).
    pub stopped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CompletionError {
    /// The model did not answer: after the last attempt, past the time cap, or for good.
    /// `streamed`: some of its text had gone out to the chat (then no other model may finish
    /// the reply).
    #[error("the model did not answer ({reason}) after {attempts} attempt(s)")]
    Failed {
        reason: FailureReason,
        attempts: u32,
        streamed: bool,
    },
    /// The shared rate limit could not be consulted; the job should run again later.
    #[error("rate limit unavailable: {0}")]
    RateLimitUnavailable(redis::RedisError),
    /// The worker is stopping; the job should run again elsewhere.
    #[error("the worker is shutting down")]
    Cancelled,
    /// Its user stopped the message before any of its text came (waiting for the rate limit,
    /// between attempts, or before the first chunk): there is no reply.
    #[error("stopped by its user before the model answered")]
    Stopped,
}

impl CompletionError {
    /// What the user is told; never the provider's own words.
    pub fn user_message(&self) -> &'static str {
        match self {
            CompletionError::Failed { reason, .. } => reason.user_message(),
            _ => "The AI service did not respond. Please try again later.",
        }
    }
}

/// The status and `Retry-After` of an error response, as the transport saw them.
#[derive(Debug, Default)]
struct ErrorResponseInfo {
    status: Option<StatusCode>,
    retry_after: Option<HeaderValue>,
}

type ResponseSlot = Arc<Mutex<ErrorResponseInfo>>;

#[derive(Clone)]
pub struct LlmClient {
    /// One per registry model: its endpoint and key.
    clients: HashMap<String, Client<OpenAIConfig>>,
    http: reqwest::Client,
    policy: RetryPolicy,
}

/// Whether `base_url` names a loopback host (`localhost`, `127.x.x.x`, `[::1]`): the fake
/// model and local OpenAI-compatible servers, which take no key.
fn is_on_this_machine(base_url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(base_url) else {
        return false;
    };
    let Some(host) = url.host_str() else {
        return false;
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl LlmClient {
    /// A client for every model of the registry. A model that could never be answered (no
    /// key for a server elsewhere) is a reason not to start.
    pub fn new(registry: &Registry, policy: RetryPolicy) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(policy.attempt_timeout.min(Duration::from_secs(10)))
            .build()?;
        let mut clients = HashMap::new();
        for model in registry.models() {
            let api_key = model
                .api_key
                .as_ref()
                .map(|key| key.expose_secret().to_owned())
                .unwrap_or_default();
            if api_key.trim().is_empty() && !is_on_this_machine(&model.base_url) {
                let var = model.api_key_env.as_deref().unwrap_or("api_key_env");
                anyhow::bail!(
                    "model `{}`{}: no key ({var} is empty or unset), and its base URL ({}) is \
                     not a server on this machine: every call would be refused. Set {var} to \
                     the provider's key (a model server on 127.0.0.1 or localhost, such as the \
                     fake model, needs none)",
                    model.name,
                    if model.line > 0 {
                        format!(" (MODELS_FILE line {})", model.line)
                    } else {
                        String::new()
                    },
                    model.base_url
                );
            }
            let config = OpenAIConfig::new()
                .with_api_base(model.base_url.trim_end_matches('/'))
                .with_api_key(api_key);
            clients.insert(model.name.clone(), Client::build(http.clone(), config));
        }
        Ok(LlmClient {
            clients,
            http,
            policy,
        })
    }

    /// A client for one attempt: plain transport, error status and `Retry-After` kept in `slot`.
    fn attempt_client(&self, model: &str, slot: ResponseSlot) -> Option<Client<OpenAIConfig>> {
        let http = self.http.clone();
        let service = tower::service_fn(move |factory: HttpRequestFactory| {
            let http = http.clone();
            let slot = slot.clone();
            async move {
                let request = factory.build().await?;
                let response = http.execute(request).await?;
                if !response.status().is_success() {
                    let mut info = lock(&slot);
                    info.status = Some(response.status());
                    info.retry_after = response.headers().get(RETRY_AFTER).cloned();
                }
                Ok::<_, OpenAIError>(response)
            }
        });
        Some(self.clients.get(model)?.clone().with_http_service(service))
    }

    /// Streams the reply to `request`, sending text pieces to `chunks` as they arrive, retrying
    /// as the policy allows. A retry starts the reply over (`Piece::Restart` first).
    ///
    /// `stop` turning true (its user's stop request) ends the call at once: during an attempt,
    /// the stream is dropped (closing the connection, so the provider stops generating) and the
    /// text received so far is the `stopped` reply; when no text came yet there is no reply
    /// ([`CompletionError::Stopped`]). `cancel` (the worker's shutdown) only ends waits.
    ///
    /// `fallback_ready`: another model would take over: a failure that
    /// [`FailureReason::falls_back_at_once`] ends the call without retrying.
    pub async fn complete(
        &self,
        request: &ChatRequest,
        limiter: &RateLimiter,
        chunks: &mpsc::UnboundedSender<Piece>,
        cancel: &mut watch::Receiver<bool>,
        stop: &mut watch::Receiver<bool>,
        fallback_ready: bool,
    ) -> Result<Completion, CompletionError> {
        let model = request.model.as_str();
        let deadline = Instant::now() + self.policy.max_total;
        let mut failures = 0u32;
        // Whether any text of this call went out to the chat.
        let mut streamed = false;
        loop {
            if *stop.borrow() {
                return Err(CompletionError::Stopped);
            }
            let acquired = tokio::select! {
                acquired = limiter.acquire(model, request.estimated_tokens, deadline, cancel) => acquired,
                Ok(_) = stop.wait_for(|stopped| *stopped) => return Err(CompletionError::Stopped),
            };
            let (reservation, waited) = match acquired {
                Ok(granted) => granted,
                Err(RateLimitError::DeadlinePassed) => {
                    return Err(CompletionError::Failed {
                        reason: FailureReason::RateLimitWait,
                        attempts: failures,
                        streamed,
                    });
                }
                Err(RateLimitError::Cancelled) => return Err(CompletionError::Cancelled),
                Err(RateLimitError::Redis(err)) => {
                    return Err(CompletionError::RateLimitUnavailable(err));
                }
            };
            if let Some(waited) = waited {
                metrics::rate_limit_wait(model, waited);
            }

            if failures > 0 {
                // The receiver only goes away when the job is being dropped.
                let _ = chunks.send(Piece::Restart);
            }
            let started = Instant::now();
            // Built for each attempt: the client consumes it, and a copy kept for a retry
            // would cost as much on every call as building it again costs on a retry.
            let result = self
                .attempt(model, request_body(request), chunks, stop, &mut streamed)
                .await;
            let elapsed = started.elapsed();
            let err = match result {
                // Stopped before any text came: as if the model had not been asked.
                Ok(Streamed {
                    content,
                    stopped: true,
                    ..
                }) if content.is_empty() => {
                    metrics::model_call(model, "stopped", elapsed);
                    return Err(CompletionError::Stopped);
                }
                Ok(Streamed {
                    content,
                    usage,
                    stopped,
                }) => {
                    metrics::model_call(model, if stopped { "stopped" } else { "ok" }, elapsed);
                    // A stopped reply's reservation stands (as when no usage comes): what
                    // the provider counts for a cut stream is its own business.
                    if let Some(usage) = &usage {
                        limiter
                            .settle(&reservation, u64::from(usage.total_tokens))
                            .await;
                    }
                    return Ok(Completion {
                        content,
                        usage,
                        latency: elapsed,
                        attempts: failures + 1,
                        stopped,
                    });
                }
                Err(err) => err,
            };
            failures += 1;
            metrics::model_call(model, err.reason.as_str(), elapsed);
            tracing::warn!(
                attempt = failures,
                reason = err.reason.as_str(),
                retryable = err.retryable,
                detail = %err.detail,
                "model call failed"
            );
            let hand_over = fallback_ready && !streamed && err.reason.falls_back_at_once();
            if !err.retryable || failures >= self.policy.max_attempts || hand_over {
                return Err(CompletionError::Failed {
                    reason: err.reason,
                    attempts: failures,
                    streamed,
                });
            }
            let delay = self
                .policy
                .delay(failures, err.retry_after, &mut rand::rng());
            if delay > deadline.saturating_duration_since(Instant::now()) {
                return Err(CompletionError::Failed {
                    reason: err.reason,
                    attempts: failures,
                    streamed,
                });
            }
            metrics::retry(model, err.reason.as_str());
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "retrying the model call"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                Ok(_) = cancel.wait_for(|stopping| *stopping) => return Err(CompletionError::Cancelled),
                Ok(_) = stop.wait_for(|stopped| *stopped) => return Err(CompletionError::Stopped),
            }
        }
    }

    /// One streamed call: the reply text and usage, or why it failed. A stop ends it with the
    /// text received so far; returning drops the stream, which closes its connection.
    async fn attempt(
        &self,
        model: &str,
        body: CreateChatCompletionRequest,
        chunks: &mpsc::UnboundedSender<Piece>,
        stop: &mut watch::Receiver<bool>,
        streamed: &mut bool,
    ) -> Result<Streamed, AttemptError> {
        let slot = ResponseSlot::default();
        let Some(client) = self.attempt_client(model, slot.clone()) else {
            return Err(AttemptError::permanent(
                FailureReason::NotFound,
                format!("model `{model}` is not in this worker's registry"),
            ));
        };
        let silence = self.policy.attempt_timeout;
        let stopped = |content: String, usage: Option<CompletionUsage>| Streamed {
            content,
            usage,
            stopped: true,
        };
        let chat = client.chat();
        let opened = tokio::select! {
            opened = tokio::time::timeout(silence, chat.create_stream(body)) => opened,
            Ok(_) = stop.wait_for(|stopped| *stopped) => return Ok(stopped(String::new(), None)),
        };
        let mut stream = match opened {
            Err(_) => {
                return Err(AttemptError::retryable(
                    FailureReason::Timeout,
                    None,
                    "no response before the attempt time-out".into(),
                ));
            }
            Ok(Err(err)) => return Err(classify_failure(err, &slot)),
            Ok(Ok(stream)) => stream,
        };
        let mut content = String::new();
        let mut usage = None;
        let mut finished = false;
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(silence, stream.next()) => next,
                Ok(_) = stop.wait_for(|stopped| *stopped) => return Ok(stopped(content, usage)),
            };
            let chunk = match next {
                Ok(Some(Ok(chunk))) => chunk,
                Ok(None) => break,
                // Past the finish reason the reply is whole: a connection that then breaks or
                // goes silent (before the usage chunk or `[DONE]`) loses only the usage, which
                // is then counted with the tokenizer, not the reply.
                _ if finished => break,
                Err(_) => {
                    return Err(AttemptError::retryable(
                        FailureReason::Timeout,
                        None,
                        "the stream went silent".into(),
                    ));
                }
                Ok(Some(Err(err))) => return Err(classify_failure(err, &slot)),
            };
            if chunk.usage.is_some() {
                usage = chunk.usage;
            }
            for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
                if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                    let text = storable(text);
                    content.push_str(&text);
                    *streamed = true;
                    // The receiver only goes away when the job is being dropped.
                    let _ = chunks.send(Piece::Text(text));
                }
                finished |= choice.finish_reason.is_some();
            }
        }
        if !finished {
            return Err(AttemptError::retryable(
                FailureReason::Truncated,
                None,
                "the stream ended without a finish reason".into(),
            ));
        }
        Ok(Streamed {
            content,
            usage,
            stopped: false,
        })
    }
}

/// `text` as PostgreSQL's `text` can hold it: U+0000, which a model may send, becomes U+FFFD,
/// in the deltas and the saved reply alike (a reply that cannot be saved would be asked for
/// again until its job died).
fn storable(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// What one attempt streamed.
struct Streamed {
    content: String,
    usage: Option<CompletionUsage>,
    /// Ended by a stop request, not by the provider.
    stopped: bool,
}

fn request_body(request: &ChatRequest) -> CreateChatCompletionRequest {
    let messages = request
        .messages
        .iter()
        .map(|m| -> ChatCompletionRequestMessage {
            let content = m.content.as_str();
            match m.role {
                Role::System => ChatCompletionRequestSystemMessage::from(content).into(),
                Role::User => ChatCompletionRequestUserMessage::from(content).into(),
                Role::Assistant => ChatCompletionRequestAssistantMessage::from(content).into(),
            }
        })
        .collect();
    CreateChatCompletionRequest {
        model: request.provider_model.clone(),
        messages,
        max_completion_tokens: Some(request.max_completion_tokens),
        stream: Some(true),
        stream_options: Some(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        }),
        ..Default::default()
    }
}

/// Sorts a failed attempt into retry-or-not (`retry::classify`), with the status and
/// `Retry-After` the transport kept aside.
fn classify_failure(err: OpenAIError, slot: &ResponseSlot) -> AttemptError {
    let (status, retry_after) = {
        let info = lock(slot);
        let retry_after = info
            .retry_after
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, Utc::now()));
        (info.status, retry_after)
    };
    classify(err, status, retry_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_never_see_provider_text() {
        let err = CompletionError::Failed {
            reason: FailureReason::ServerError,
            attempts: 5,
            streamed: false,
        };
        assert_eq!(
            err.user_message(),
            "The AI service did not respond. Please try again later."
        );
    }
}
