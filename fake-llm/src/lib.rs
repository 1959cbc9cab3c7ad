//! A real HTTP server speaking the OpenAI chat-completions protocol, deterministic and scriptable.
//!
//! Used by tests (in-process via [`FakeLlm::start`]), benchmarks and offline demos (the
//! `aichat-fake-llm` binary). Responses are shaped to what `async-openai` 0.43 parses.
//!
//! # Replies
//! The reply is `"Echo: " + <content of the last user message>` (`"Echo: "` without one), or,
//! when [`FakeConfig::reply_words`] is set, that many words cycling through a lorem-ipsum list,
//! or, when [`FakeConfig::reply`] is set, that text.
//! Streams send a role chunk, one chunk per word (keeping its trailing whitespace, so the
//! chunks concatenate to the reply), a `finish_reason: "stop"` chunk, the usage chunk
//! (`choices: []`) when `stream_options.include_usage` is true, then `data: [DONE]`. Each
//! word chunk waits [`FakeConfig::chunk_delay_ms`] first, so `reply_words: 200` with
//! `chunk_delay_ms: 50` streams for ten seconds.
//!
//! # Token accounting
//! A "token" is a whitespace-separated word ([`count_words_tokens`]):
//! - `prompt_tokens = Σ over messages (words(content) + 4)` ([`prompt_tokens`]; array
//!   contents count their text parts, null contents count 0 words),
//! - `completion_tokens = words(reply)` ([`completion_tokens`]),
//! - `total_tokens = prompt_tokens + completion_tokens` ([`Usage::for_exchange`]).
//!
//! # Failure injection
//! Each request consumes, in priority order: the next scripted [`Outcome`]
//! ([`FakeLlm::push_script`] / `POST /_fake/script`); else [`FakeConfig::always`]; else,
//! with probability [`FakeConfig::fail_rate`] (seeded xorshift), one of a 429 with
//! `Retry-After: 1`, a 500, or a hang; else a normal answer.
//!
//! [`Outcome::Cut`] (`{"kind": "cut", "after_chunks": n}`) breaks a stream midway, as a provider
//! whose connection drops mid-reply: the response starts as usual (200, role chunk, the first
//! `n` word chunks at `chunk_delay_ms`), then the body fails and hyper aborts the connection
//! before the finish chunk, the usage chunk and `data: [DONE]`, leaving the chunked body
//! unterminated. Clients see a transport error, not a clean end: reqwest an error decoding the
//! body, async-openai (0.43) the `n` chunks followed by `Err(OpenAIError::StreamError(_))`.
//! Its record reads `outcome: "cut"`, `stream_ended: true`, `client_hung_up: false`,
//! `chunks_sent: n` (fewer if the reply has fewer words), `usage: null`. Without `stream: true`
//! it answers the 500 of [`Outcome::ServerError`]. `fail_rate` never picks it.
//!
//! # HTTP endpoints
//! - `POST /v1/chat/completions` (also `/chat/completions`), `GET /v1/models`, `GET /healthz`
//! - `GET|DELETE /_fake/requests`: the [`RecordedRequest`] log. A record is written when a
//!   request arrives; for `stream: true` it is updated once the response is over:
//!   `stream_ended` becomes true, `client_hung_up` says whether the client closed the connection
//!   (or dropped the response) before `data: [DONE]` was sent, and `chunks_sent` how many
//!   content (word) chunks were handed to the connection. [`FakeLlm::wait_until`] and
//!   [`FakeLlm::wait_for_hang_up`] wake on every change of the log, record updates included.
//! - `GET|PUT /_fake/config`: PUT takes any subset of [`FakeConfig`] fields, returns the full config
//! - `GET|POST|DELETE /_fake/script`: POST appends an outcome or an array of outcomes

mod chat;
pub mod cli;
mod config;
mod control;
mod delivery;
mod protocol;
mod rng;
mod server;
mod state;
mod tokens;

pub use config::{DEFAULT_HANG_MS, DEFAULT_MAX_RECORDED, DEFAULT_SEED, FakeConfig, Outcome};
pub use server::{FakeLlm, router};
pub use state::{FakeState, RecordedRequest};
pub use tokens::{
    ECHO_PREFIX, TOKENS_PER_MESSAGE, Usage, completion_tokens, content_text, count_words_tokens,
    echo_reply, lorem_reply, prompt_tokens, reply_text, split_word_chunks,
};
