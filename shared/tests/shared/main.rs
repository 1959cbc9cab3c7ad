//! The shared crate's tests against a real PostgreSQL: the SQL of `shared/src/db/` and the
//! conflict retry. One binary, a module per area.
mod claims;
mod planning;
mod retry;
mod saving;
mod versions;

/// A reply of `content` as a worker would store it, without token counts.
pub fn reply(content: &str) -> aichat_shared::db::completions::NewReply {
    aichat_shared::db::completions::NewReply {
        content: content.to_owned(),
        prompt_tokens: None,
        completion_tokens: None,
        total_tokens: None,
        model: aichat_testkit::MODEL.to_owned(),
        latency_ms: 1,
        content_tokens: None,
        question_tokens: None,
        stopped: false,
        cost: None,
        currency: None,
    }
}
