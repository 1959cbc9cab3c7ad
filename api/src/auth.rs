//! Who is asking: session tokens and the `AuthUser` extractor (passwords: `hashing.rs`).
use axum::extract::FromRequestParts;
use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::request::Parts;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

use aichat_shared::db;
use aichat_shared::db::sessions::LiveSession;
use aichat_shared::domain::User;

use crate::error::ApiError;
use crate::send::limits::Sender;
use crate::state::AppState;

pub(crate) const SESSION_COOKIE: &str = "sessionid";

/// A fresh session token (256 random bits, URL-safe) and the hash stored in its place.
pub(crate) fn new_token() -> (String, Vec<u8>) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_token(&token);
    (token, hash)
}

/// The hash a session token is stored and looked up by.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The session token of a request: `Authorization: Bearer`, else the `sessionid` cookie.
pub(crate) fn request_token(parts: &Parts) -> Option<String> {
    bearer_token(&parts.headers).or_else(|| cookie_token(&parts.headers))
}

/// The token of an `Authorization: Bearer` (or `Token`) header.
pub(crate) fn bearer_token(headers: &axum::http::HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok())?;
    let mut words = value.split_whitespace();
    match (words.next(), words.next()) {
        (Some(scheme), Some(token))
            if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") =>
        {
            Some(token.to_owned())
        }
        _ => None,
    }
}

/// The `sessionid` cookie's token. A request carrying two different ones has none: a page on a
/// sibling domain can set a `sessionid` for the parent domain that the browser sends beside
/// (and before) ours, and taking either would let it sign the user in as someone else.
pub(crate) fn cookie_token(headers: &axum::http::HeaderMap) -> Option<String> {
    let mut values = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value);
    let first = values.next()?;
    values.all(|value| value == first).then(|| first.to_owned())
}

/// Resolves a token's hash to its session, if it is live: from this instance's session cache
/// when it was looked up in the last `SESSION_CACHE_SECS`, else from the database.
pub(crate) async fn live_session(
    state: &AppState,
    hash: &[u8],
) -> Result<Option<LiveSession>, ApiError> {
    if let Some(session) = state.sessions.get(hash) {
        return Ok(Some(session));
    }
    let Some(session) = db::sessions::find_live_session(&state.db, hash).await? else {
        return Ok(None);
    };
    state.sessions.insert(hash, &session);
    Ok(Some(session))
}

/// The user of a live session token (see [`live_session`]).
pub(crate) async fn user_for_token(
    state: &AppState,
    token: &str,
) -> Result<Option<User>, ApiError> {
    user_for_token_hash(state, &hash_token(token)).await
}

async fn user_for_token_hash(state: &AppState, hash: &[u8]) -> Result<Option<User>, ApiError> {
    Ok(live_session(state, hash).await?.map(|session| session.user))
}

/// An authenticated user; extracting it answers 401 for anyone else.
pub(crate) struct AuthUser {
    pub(crate) user: User,
    pub(crate) token_hash: Vec<u8>,
    /// The daily token budget staff set for the user, as the session was read (`None`: the
    /// default).
    pub(crate) daily_token_budget: Option<i64>,
}

impl AuthUser {
    /// The user as the send limits know them.
    pub(crate) fn sender(&self) -> Sender {
        Sender {
            user_id: self.user.id,
            daily_token_budget: self.daily_token_budget,
        }
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = request_token(parts).ok_or(ApiError::Unauthenticated)?;
        let token_hash = hash_token(&token);
        let session = live_session(state, &token_hash)
            .await?
            .ok_or(ApiError::Unauthenticated)?;
        Ok(AuthUser {
            user: session.user,
            token_hash,
            daily_token_budget: session.daily_token_budget,
        })
    }
}

/// A guard: the request is a staff user's; anyone else gets 401 (anonymous) or 403.
pub(crate) struct StaffUser;

impl FromRequestParts<AppState> for StaffUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let auth = AuthUser::from_request_parts(parts, state).await?;
        if auth.user.is_staff {
            Ok(StaffUser)
        } else {
            Err(ApiError::Forbidden)
        }
    }
}
