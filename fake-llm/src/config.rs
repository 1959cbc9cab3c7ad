//! Owns the runtime knobs of the fake server: [`FakeConfig`] and the injectable [`Outcome`]s.

use serde::{Deserialize, Serialize};

/// Seed used when none is configured, so two fresh servers fail identically.
pub const DEFAULT_SEED: u64 = 42;
/// Ten minutes: longer than any sane client timeout, short enough that a leaked hang ends.
pub const DEFAULT_HANG_MS: u64 = 600_000;
/// Enough history for any test while bounding memory during long benchmarks.
pub const DEFAULT_MAX_RECORDED: usize = 10_000;

/// Behaviour of the fake model. Every field is optional in JSON (missing ones take defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FakeConfig {
    /// Delay before response headers are sent (ignored by `hang`, replaced by `slow`).
    pub latency_ms: u64,
    /// Delay before each streamed content (word) chunk.
    pub chunk_delay_ms: u64,
    /// Fraction (0.0–1.0) of requests failing at random when the script is empty and `always` is unset.
    pub fail_rate: f64,
    /// Seed of the failure PRNG; updating the config re-seeds it.
    pub seed: u64,
    /// Outcome forced on every request while the script is empty (e.g. a permanently broken model).
    pub always: Option<Outcome>,
    /// Upper bound on how long a `hang` holds the connection before answering 504.
    pub hang_ms: u64,
    /// When set, replies are this many lorem-ipsum words instead of the echo.
    pub reply_words: Option<usize>,
    /// When set, every reply is this text (split into word chunks as any reply): what a real
    /// model may send and no user can, such as U+0000.
    pub reply: Option<String>,
    /// Only the newest `max_recorded` requests are kept.
    pub max_recorded: usize,
    /// Whether a streamed answer reports its usage when the request asks for it
    /// (`stream_options.include_usage`); false: never, as servers that ignore the option.
    pub report_usage: bool,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            chunk_delay_ms: 0,
            fail_rate: 0.0,
            seed: DEFAULT_SEED,
            always: None,
            hang_ms: DEFAULT_HANG_MS,
            reply_words: None,
            reply: None,
            max_recorded: DEFAULT_MAX_RECORDED,
            report_usage: true,
        }
    }
}

impl FakeConfig {
    /// Rejects values the HTTP control API should refuse rather than silently clamp.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(format!(
                "fail_rate must be within 0.0..=1.0, got {}",
                self.fail_rate
            ));
        }
        Ok(())
    }
}

/// What the server does with one chat-completion request.
///
/// JSON shape: `{"kind": "rate_limited", "retry_after": "1"}`, `{"kind": "slow", "latency_ms": 3000}`,
/// `{"kind": "ok"}`, `{"kind": "insufficient_quota"}`, `{"kind": "server_error"}`,
/// `{"kind": "bad_request"}`, `{"kind": "hang"}`, `{"kind": "cut", "after_chunks": 5}`,
/// `{"kind": "cut_after_finish"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// Answer normally.
    Ok,
    /// 429 with `Retry-After: <retry_after>` (an empty string omits the header).
    RateLimited {
        #[serde(default = "default_retry_after")]
        retry_after: String,
    },
    /// 429 `insufficient_quota`, without `Retry-After`: clients must treat it as permanent.
    InsufficientQuota,
    /// 500 with an OpenAI error body.
    ServerError,
    /// 400 `invalid_request_error`.
    BadRequest,
    /// Hold the connection open without answering (until the client leaves or `hang_ms`).
    Hang,
    /// Answer normally after `latency_ms` instead of the configured latency.
    Slow { latency_ms: u64 },
    /// Break a `stream: true` answer midway, as a provider whose connection drops mid-reply:
    /// 200, the role chunk and the first `after_chunks` word chunks (all of them if the reply
    /// is shorter) as usual, then the connection is aborted: no finish chunk, no usage chunk, no
    /// `data: [DONE]`, no closing zero-length chunk, so clients see a body (transport) error.
    /// A request without `stream: true` gets the 500 of [`Outcome::ServerError`].
    Cut { after_chunks: u32 },
    /// Stream the whole reply and its finish chunk, then abort the connection before the usage
    /// chunk and `data: [DONE]`: a provider whose connection drops once the reply is whole.
    CutAfterFinish,
}

fn default_retry_after() -> String {
    "1".to_owned()
}

impl Outcome {
    /// The `kind` tag, as stored in [`crate::RecordedRequest::outcome`].
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::RateLimited { .. } => "rate_limited",
            Outcome::InsufficientQuota => "insufficient_quota",
            Outcome::ServerError => "server_error",
            Outcome::BadRequest => "bad_request",
            Outcome::Hang => "hang",
            Outcome::Slow { .. } => "slow",
            Outcome::Cut { .. } => "cut",
            Outcome::CutAfterFinish => "cut_after_finish",
        }
    }

    /// Whether the client receives a normal completion.
    pub fn answers(&self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Slow { .. })
    }
}
