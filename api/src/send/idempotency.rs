//! `Idempotency-Key` on `send_message`: a repeated POST with the same key (per user) answers
//! the message the first one stored and queues nothing new.
use std::time::Duration;

use axum::http::HeaderMap;
use redis::AsyncCommands;
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

const HEADER: &str = "idempotency-key";
const PENDING: &str = "pending";
/// How long a key is remembered once it produced a message.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a claim lives before it produced one: if the API process dies between claiming and
/// completing, the key frees itself after this instead of answering 409 for a day.
const PENDING_TTL: Duration = Duration::from_secs(60);

/// What a key says about this request.
pub enum Claim {
    /// First use: the caller stores the message and then `complete`s (or `release`s) the claim.
    New(String),
    /// The key already produced this message.
    Existing(i64),
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

/// Claims `key` for this user, or finds what an earlier request with it produced.
pub async fn claim(state: &AppState, user_id: i64, key: &str) -> ApiResult<Claim> {
    let redis_key = redis_key(state, user_id, key);
    let mut conn = state.redis.clone();
    let options = redis::SetOptions::default()
        .conditional_set(redis::ExistenceCheck::NX)
        .with_expiration(redis::SetExpiry::EX(PENDING_TTL.as_secs()));
    let claimed: Option<String> = conn
        .set_options(&redis_key, PENDING, options)
        .await
        .map_err(aichat_shared::Error::from)?;
    if claimed.is_some() {
        return Ok(Claim::New(redis_key));
    }
    let stored: Option<String> = conn
        .get(&redis_key)
        .await
        .map_err(aichat_shared::Error::from)?;
    match stored.as_deref().map(str::parse::<i64>) {
        Some(Ok(id)) => Ok(Claim::Existing(id)),
        _ => Err(ApiError::Conflict(
            "A request with this Idempotency-Key is still being processed",
        )),
    }
}

/// Records the message a claimed key produced.
pub async fn complete(state: &AppState, redis_key: &str, message_id: i64) {
    let mut conn = state.redis.clone();
    let result: redis::RedisResult<()> = conn.set_ex(redis_key, message_id, TTL.as_secs()).await;
    if let Err(err) = result {
        tracing::warn!(error = %err, "could not record the idempotency key's message");
    }
}

/// Frees a claimed key whose request failed, so the client can retry with it.
pub async fn release(state: &AppState, redis_key: &str) {
    let mut conn = state.redis.clone();
    let result: redis::RedisResult<()> = conn.del(redis_key).await;
    if let Err(err) = result {
        tracing::warn!(error = %err, "could not release an idempotency key");
    }
}
