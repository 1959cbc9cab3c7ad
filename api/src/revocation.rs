//! Revoked sessions reach every API instance: a logout (one session) or a "log out
//! everywhere" (every session of a user) is published on `{ns}:revoked`; each instance's
//! pub/sub connection (`fanout.rs`) forgets the sessions in its cache, then tells its sockets,
//! which close with [`SESSION_ENDED`] when the revocation is theirs. A change to a user that
//! the cache holds (`Revocation::UserChanged`) travels the same way but ends no session.
//!
//! Pub/sub delivers at most once: a revocation published while Redis is unreachable is lost.
//! The database stays the truth, so REST requests are refused once a cache entry runs out
//! (`SESSION_CACHE_SECS`), and a socket looks its session up at every ping (`WS_PING_SECS`).
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use aichat_shared::keys::Namespace;

/// WebSocket close code of a socket whose session ended (logout, revocation, expiry): the
/// 4000s are the application's; 4401 mirrors HTTP 401.
pub const SESSION_ENDED: u16 = 4401;

/// Capacity of each instance's in-process revocation channel. A socket that falls this far
/// behind checks its session in the database instead.
pub const CHANNEL_CAPACITY: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Revocation {
    /// One session, by its token's hash (hex on the wire, decoded once when it arrives rather
    /// than by every socket it is compared with).
    Session(#[serde(with = "hex::serde")] Vec<u8>),
    /// Every session of a user.
    User(i64),
    /// No session ends, but what the session cache holds of this user changed (staff set
    /// their daily token budget): every instance forgets the user's cached sessions, so their
    /// next request reads the user again.
    UserChanged(i64),
}

impl Revocation {
    pub fn session(token_hash: &[u8]) -> Self {
        Revocation::Session(token_hash.to_vec())
    }

    /// Whether this ends the session `token_hash` of `user_id`.
    pub fn ends(&self, user_id: i64, token_hash: &[u8]) -> bool {
        match self {
            Revocation::Session(hash) => hash == token_hash,
            Revocation::User(id) => *id == user_id,
            Revocation::UserChanged(_) => false,
        }
    }
}

/// Tells every API instance. A failure is logged, not returned: the session is already gone
/// from the database, which is what every instance falls back on.
pub async fn publish(conn: &mut ConnectionManager, ns: &Namespace, revocation: &Revocation) {
    let published: redis::RedisResult<()> = match serde_json::to_string(revocation) {
        Ok(payload) => conn.publish(ns.revocations(), payload).await,
        Err(err) => {
            tracing::warn!(error = %err, "could not encode a revocation");
            return;
        }
    };
    if let Err(err) = published {
        tracing::warn!(error = %err, "could not publish a revocation");
    }
}

/// Ends every session of `user_id` in the database, then tells every instance; returns how
/// many sessions there were. Used by `POST /api/logout/all/` and `aichat-api revoke-sessions`.
pub async fn end_user_sessions(
    db: &sqlx::PgPool,
    redis: &ConnectionManager,
    ns: &Namespace,
    user_id: i64,
) -> aichat_shared::error::Result<u64> {
    let ended = aichat_shared::db::sessions::delete_user_sessions(db, user_id).await?;
    publish(&mut redis.clone(), ns, &Revocation::User(user_id)).await;
    Ok(ended)
}

/// Parses a message of the revocation channel.
pub fn parse(payload: &str) -> Option<Revocation> {
    serde_json::from_str(payload).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_ends_its_session_or_every_session_of_its_user() {
        let one = Revocation::session(b"abc");
        assert_eq!(
            parse(&serde_json::to_string(&one).unwrap()),
            Some(one.clone())
        );
        assert!(one.ends(1, b"abc"));
        assert!(!one.ends(1, b"abd"));
        assert_eq!(
            serde_json::to_string(&one).unwrap(),
            r#"{"session":"616263"}"#
        );
        let all = Revocation::User(7);
        assert_eq!(serde_json::to_string(&all).unwrap(), r#"{"user":7}"#);
        assert!(all.ends(7, b"anything") && !all.ends(8, b"anything"));
        let changed = Revocation::UserChanged(7);
        assert_eq!(
            serde_json::to_string(&changed).unwrap(),
            r#"{"user_changed":7}"#
        );
        assert_eq!(parse(r#"{"user_changed":7}"#), Some(changed.clone()));
        assert!(!changed.ends(7, b"anything"), "the sessions stay open");
        assert_eq!(parse("not json"), None);
    }
}
