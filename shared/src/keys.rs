//! Names of every Redis key, queue and channel, all under one namespace (`AICHAT_NAMESPACE`).

/// The prefix that keeps one deployment's (or one test's) Redis data apart from others.
///
/// Keys that hold ids of database rows (messages, users) also carry the database's
/// installation id once it is known ([`Namespace::for_installation`]): a database dropped and
/// created again under the same namespace starts its ids at 1 again, and must not find the
/// earlier database's job de-duplication keys, idempotency keys, budgets or markers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    prefix: String,
    installation: Option<String>,
}

impl Namespace {
    pub fn new(prefix: impl Into<String>) -> Self {
        Namespace {
            prefix: prefix.into(),
            installation: None,
        }
    }

    /// This namespace for the rows of the database whose installation id is `id`
    /// (`db::installation_id`).
    pub fn for_installation(self, id: impl Into<String>) -> Self {
        Namespace {
            installation: Some(id.into()),
            ..self
        }
    }

    pub fn as_str(&self) -> &str {
        &self.prefix
    }

    /// The database these keys belong to, when known.
    pub fn installation(&self) -> Option<&str> {
        self.installation.as_deref()
    }

    /// `{prefix}:{kind}` followed by `:{installation}` when it is known: the start of a key
    /// that holds database ids.
    fn of_rows(&self, kind: &str) -> String {
        match &self.installation {
            Some(id) => format!("{}:{kind}:{id}", self.prefix),
            None => format!("{}:{kind}", self.prefix),
        }
    }

    /// The apalis queue of completion jobs; apalis appends its own suffixes (`:active`, `:data`, ...).
    pub fn completion_queue(&self) -> String {
        format!("{}:jobs:completion", self.prefix)
    }

    /// The pub/sub channel on which a push of completion jobs that finds none waiting wakes the
    /// workers that found the queue empty (`JobQueue` publishes on it in the push's script run).
    pub fn jobs_pushed(&self) -> String {
        format!("{}:pushed", self.completion_queue())
    }

    /// The pub/sub channel that carries one AI chat's WebSocket events.
    pub fn chat_channel(&self, ai_chat_id: i64) -> String {
        format!("{}:chat:{ai_chat_id}", self.prefix)
    }

    /// The pattern of every chat's channel (`PSUBSCRIBE`), for tools that watch a whole
    /// namespace.
    pub fn all_chat_channels(&self) -> String {
        format!("{}:chat:*", self.prefix)
    }

    /// Present while a run of a user message's completion job has an outcome to announce
    /// (`announce.rs`).
    pub fn pending_announcement(&self, message_id: i64) -> String {
        format!("{}:{message_id}", self.of_rows("announce"))
    }

    /// The pattern of every announcement marker (`SCAN MATCH`), for tools that check that
    /// none is left behind.
    pub fn all_pending_announcements(&self) -> String {
        format!("{}:*", self.of_rows("announce"))
    }

    /// A chat's history as its last completion job assembled it (the worker's context cache).
    pub fn history_cache(&self, ai_chat_id: i64) -> String {
        format!("{}:{ai_chat_id}", self.of_rows("history:v1"))
    }

    /// The deltas of the reply in progress to a user message (`partial.rs`).
    pub fn partial_reply(&self, message_id: i64) -> String {
        format!("{}:{message_id}", self.of_rows("partial"))
    }

    /// The pub/sub channel on which stop requests reach every worker: the id of a user message
    /// being answered whose user asked to stop it (`stop_requested_at` is set first, so a worker
    /// that missed the message finds it in the database).
    pub fn stop_requests(&self) -> String {
        format!("{}:stop", self.of_rows("messages"))
    }

    /// The pub/sub channel on which revoked sessions are announced to every API instance.
    pub fn revocations(&self) -> String {
        format!("{}:revoked", self.prefix)
    }

    /// An `Idempotency-Key` a user sent (hashed by the caller, so its length is bounded).
    pub fn idempotency(&self, user_id: i64, key_hash: &str) -> String {
        format!("{}:{user_id}:{key_hash}", self.of_rows("idem"))
    }

    /// One user's token use (reserved and settled) on one UTC day, `YYYY-MM-DD`.
    pub fn budget(&self, user_id: i64, day: &str) -> String {
        format!("{}:{user_id}:{day}", self.of_rows("budget"))
    }

    /// The running jobs of one user across every worker (`WORKER_PER_USER_CONCURRENCY`), the
    /// jobs waiting for a turn, and (with a message id) a waiting job's sign of life.
    pub fn user_slots(&self, user_id: i64) -> String {
        format!("{}:{user_id}", self.of_rows("userslots"))
    }

    /// The per-user send counter of the current window.
    pub fn send_rate(&self, user_id: i64) -> String {
        format!("{}:{user_id}", self.of_rows("sendrate"))
    }

    /// One sliding window of login or registration attempts (`attempt`: `login`/`register`;
    /// `by`: `address`/`username`; `subject`: a hash of the address or username).
    pub fn auth_window(&self, attempt: &str, by: &str, subject: &str) -> String {
        format!("{}:auth:{attempt}:{by}:{subject}", self.prefix)
    }

    /// Consecutive failed logins of one username (a hash of it) and its lock.
    pub fn login_failures(&self, subject: &str) -> String {
        format!("{}:auth:failures:{subject}", self.prefix)
    }

    /// The prefix of the shared rate-limit state of one model.
    pub fn rate_limit(&self, model: &str) -> String {
        format!("{}:rl:{model}", self.prefix)
    }
}
