//! `Idempotency-Key` on `send_message`, `regenerate` and `edit`: a repeated POST with the same
//! key (per user) answers the message the first one stored and queues nothing new. The key
//! remembers what its first request asked for ([`Asked`]): a repeat aimed elsewhere (another
//! chat, another question, another route) is 409, and one with another body (other content or
//! options) is 422, as the IETF's Idempotency-Key draft has it; neither stores anything.
use std::time::Duration;

use axum::http::HeaderMap;
use redis::AsyncCommands;
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};
use crate::send::SendMessage;
use crate::state::AppState;

const HEADER: &str = "idempotency-key";
const PENDING: &str = "pending";
/// How long a key is remembered once it produced a message.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a claim lives before it produced one: if the API process dies between claiming and
/// completing, the key frees itself after this instead of answering 409 for a day.
const PENDING_TTL: Duration = Duration::from_secs(60);

const ANOTHER_TARGET: &str = "This Idempotency-Key was used for another message";
const ANOTHER_BODY: &str = "This Idempotency-Key was used with a different request body";
const IN_PROGRESS: &str = "A request with this Idempotency-Key is still being processed";

/// What a keyed request asks for: its route and target, and a digest of what it asks of
/// them. Stored with the key as `{target} {digest}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    target: String,
    body: String,
}

impl Asked {
    /// A send into `ai_chat_id`: its content and options, as parsed (an option left out and
    /// the same option at its default ask the same).
    pub fn send(ai_chat_id: i64, send: &SendMessage<'_>) -> Self {
        let options = send.options;
        Asked {
            target: format!("send:{ai_chat_id}"),
            body: digest(&[
                send.content.as_bytes(),
                &[u8::from(options.include_related_chat_context)],
                &options.context_message_limit.to_be_bytes(),
            ]),
        }
    }

    /// A regeneration of the question `question_id` (whether the path named it or its reply).
    pub fn regenerate(question_id: i64) -> Self {
        Asked {
            target: format!("regenerate:{question_id}"),
            body: digest(&[]),
        }
    }

    /// An edit of a turn of `ai_chat_id` (the turn after `parent_id`, whichever of its versions
    /// the path named) to `content`.
    pub fn edit(ai_chat_id: i64, parent_id: Option<i64>, content: &str) -> Self {
        let parent = parent_id.map_or_else(|| "-".to_owned(), |id| id.to_string());
        Asked {
            target: format!("edit:{ai_chat_id}:{parent}"),
            body: digest(&[content.as_bytes()]),
        }
    }

    fn stamp(&self) -> String {
        format!("{} {}", self.target, self.body)
    }

    /// Whether a stored stamp asks for the same; `Err` with the refusal when not. A value
    /// stored before keys remembered their request has no stamp and is taken as the same.
    fn matches(&self, stamp: Option<&str>) -> ApiResult<()> {
        let Some((target, body)) = stamp.and_then(|s| s.split_once(' ')) else {
            return Ok(());
        };
        if target != self.target {
            Err(ApiError::Conflict(ANOTHER_TARGET))
        } else if body != self.body {
            Err(ApiError::Unprocessable(ANOTHER_BODY))
        } else {
            Ok(())
        }
    }
}

/// SHA-256 over `parts`, each length-prefixed so that no two lists of parts collide.
fn digest(parts: &[&[u8]]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hex::encode(hash.finalize())
}

/// What a key says about this request.
pub enum Claim {
    /// First use: the caller stores the message and then `complete`s (or `release`s) the claim.
    New(Held),
    /// The key already produced this message, for the same request.
    Existing(i64),
}

/// A key claimed by this request.
pub struct Held {
    redis_key: String,
    stamp: String,
}

/// The request's key, if it sent one: 1–255 visible ASCII characters.
pub fn key_from(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) && key.chars().all(|c| c.is_ascii_graphic()) => {
            Ok(Some(key.to_owned()))
        }
        _ => Err(ApiError::BadRequest(
            "Idempotency-Key must be 1-255 visible ASCII characters".into(),
        )),
    }
}

fn redis_key(state: &AppState, user_id: i64, key: &str) -> String {
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    state.ns.idempotency(user_id, &hash)
}

/// Claims `key` for this user and what the request `asked`, or finds what an earlier request
/// with it produced: 409 while that one is under way or when it was aimed elsewhere, 422 when
/// it asked for something else there.
pub async fn claim(state: &AppState, user_id: i64, key: &str, asked: &Asked) -> ApiResult<Claim> {
    let redis_key = redis_key(state, user_id, key);
    let stamp = asked.stamp();
    let mut conn = state.redis.clone();
    let options = redis::SetOptions::default()
        .conditional_set(redis::ExistenceCheck::NX)
        .with_expiration(redis::SetExpiry::EX(PENDING_TTL.as_secs()));
    let claimed: Option<String> = conn
        .set_options(&redis_key, format!("{PENDING} {stamp}"), options)
        .await
        .map_err(aichat_shared::Error::from)?;
    if claimed.is_some() {
        return Ok(Claim::New(Held { redis_key, stamp }));
    }
    let stored: Option<String> = conn
        .get(&redis_key)
        .await
        .map_err(aichat_shared::Error::from)?;
    // Gone since the claim was refused: its request failed or its claim expired just now.
    let Some(stored) = stored else {
        return Err(ApiError::Conflict(IN_PROGRESS));
    };
    let (head, stamp) = match stored.split_once(' ') {
        Some((head, stamp)) => (head, Some(stamp)),
        None => (stored.as_str(), None),
    };
    asked.matches(stamp)?;
    match head.parse::<i64>() {
        Ok(id) => Ok(Claim::Existing(id)),
        Err(_) => Err(ApiError::Conflict(IN_PROGRESS)),
    }
}

/// Records the message a claimed key produced.
pub async fn complete(state: &AppState, held: &Held, message_id: i64) {
    let mut conn = state.redis.clone();
    let value = format!("{message_id} {}", held.stamp);
    let result: redis::RedisResult<()> = conn.set_ex(&held.redis_key, value, TTL.as_secs()).await;
    if let Err(err) = result {
        tracing::warn!(error = %err, "could not record the idempotency key's message");
    }
}

/// Frees a claimed key whose request failed, so the client can retry with it.
pub async fn release(state: &AppState, held: &Held) {
    let mut conn = state.redis.clone();
    let result: redis::RedisResult<()> = conn.del(&held.redis_key).await;
    if let Err(err) = result {
        tracing::warn!(error = %err, "could not release an idempotency key");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aichat_shared::domain::ContextOptions;

    fn send(content: &str, limit: i32) -> SendMessage<'_> {
        SendMessage {
            content,
            options: ContextOptions {
                include_related_chat_context: false,
                context_message_limit: limit,
            },
        }
    }

    #[test]
    fn a_repeat_matches_only_the_request_it_repeats() {
        let first = Asked::send(1, &send("hello", 20));
        let stamp = first.stamp();
        assert!(first.matches(Some(&stamp)).is_ok());
        assert!(first.matches(None).is_ok(), "a key stored without a stamp");
        let refused = |asked: Asked| asked.matches(Some(&stamp)).map_err(|e| e.status().as_u16());
        assert_eq!(refused(Asked::send(1, &send("hello!", 20))), Err(422));
        assert_eq!(refused(Asked::send(1, &send("hello", 19))), Err(422));
        assert_eq!(refused(Asked::send(2, &send("hello", 20))), Err(409));
        assert_eq!(refused(Asked::regenerate(1)), Err(409));
        assert_eq!(refused(Asked::edit(1, None, "hello")), Err(409));
    }

    #[test]
    fn parts_do_not_run_into_each_other() {
        assert_ne!(digest(&[b"ab", b"c"]), digest(&[b"a", b"bc"]));
    }
}
