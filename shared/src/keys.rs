//! Names of every Redis key, queue and channel, all under one namespace (`AICHAT_NAMESPACE`).

/// The prefix that keeps one deployment's (or one test's) Redis data apart from others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace(String);

impl Namespace {
    pub fn new(prefix: impl Into<String>) -> Self {
        Namespace(prefix.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The apalis queue of completion jobs; apalis appends its own suffixes (`:active`, `:data`, ...).
    pub fn completion_queue(&self) -> String {
        format!("{}:jobs:completion", self.0)
    }

    /// The pub/sub channel that carries one AI chat's WebSocket events.
    pub fn chat_channel(&self, ai_chat_id: i64) -> String {
        format!("{}:chat:{ai_chat_id}", self.0)
    }

    /// Present while a run of a user message's completion job has an outcome to announce
    /// (`announce.rs`).
    pub fn pending_announcement(&self, message_id: i64) -> String {
        format!("{}:announce:{message_id}", self.0)
    }

    /// The pub/sub channel on which revoked sessions are announced to every API instance.
    pub fn revocations(&self) -> String {
        format!("{}:revoked", self.0)
    }

    /// An `Idempotency-Key` a user sent (hashed by the caller, so its length is bounded).
    pub fn idempotency(&self, user_id: i64, key_hash: &str) -> String {
        format!("{}:idem:{user_id}:{key_hash}", self.0)
    }

    /// One user's token use (reserved and settled) on one UTC day, `YYYY-MM-DD`.
    pub fn budget(&self, user_id: i64, day: &str) -> String {
        format!("{}:budget:{user_id}:{day}", self.0)
    }

    /// The per-user send counter of the current window.
    pub fn send_rate(&self, user_id: i64) -> String {
        format!("{}:sendrate:{user_id}", self.0)
    }

    /// One sliding window of login or registration attempts (`attempt`: `login`/`register`;
    /// `by`: `address`/`username`; `subject`: a hash of the address or username).
    pub fn auth_window(&self, attempt: &str, by: &str, subject: &str) -> String {
        format!("{}:auth:{attempt}:{by}:{subject}", self.0)
    }

    /// Consecutive failed logins of one username (a hash of it) and its lock.
    pub fn login_failures(&self, subject: &str) -> String {
        format!("{}:auth:failures:{subject}", self.0)
    }

    /// The prefix of the shared rate-limit state of one model.
    pub fn rate_limit(&self, model: &str) -> String {
        format!("{}:rl:{model}", self.0)
    }
}
