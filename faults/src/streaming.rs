//! A reply streamed slowly enough that a stop or a SIGKILL lands mid-stream, and the worker
//! flags that put each of its chunks on the socket as the model sends it.
use aichat_fake_llm::FakeConfig;

/// Every chunk its own delta, at once: the socket shows the stream as the model sends it.
pub const FLUSH_AT_ONCE: [&str; 4] = ["--delta-flush-ms", "1", "--delta-flush-chars", "1"];

/// A long reply streamed slowly: 400 words, one every 50 ms (20 s in all), so a stop or a
/// SIGKILL always lands mid-stream.
pub fn slow_long_reply() -> FakeConfig {
    FakeConfig {
        reply_words: Some(400),
        chunk_delay_ms: 50,
        ..FakeConfig::default()
    }
}
