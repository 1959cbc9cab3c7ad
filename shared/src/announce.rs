//! Each saved reply is announced (its `assistant_message` published) exactly once, even when
//! the worker that saved it dies before publishing.
//!
//! A run of a completion job first [`claim`]s the message: a marker in Redis saying "a run of
//! this job is under way and the outcome is not announced yet". Whoever announces the outcome
//! deletes the marker in the same script that publishes ([`announce_once`]), so of all runs
//! that reach the announcement only the first publishes. A run that finds the message already
//! answered announces the stored reply only when the marker was left by an earlier run (that
//! run saved and died before publishing); when its own claim created the marker, the earlier
//! run had announced and deleted its marker, so it only [`release`]s. Markers live only while
//! a job is in progress: Redis returns to its size when the queue drains.
use std::sync::LazyLock;

use redis::aio::ConnectionManager;

use crate::error::Result;
use crate::events::ChatEvent;
use crate::keys::Namespace;

/// A marker outlives any run of its job (retries included); it only guards against a job that
/// vanished from the queue leaving its marker behind for ever.
pub const PENDING_TTL_SECS: u64 = 24 * 3600;

/// What a run found when it claimed its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// No earlier run left the outcome unannounced.
    Created,
    /// An earlier (or concurrent) run claimed it and has not announced: if the message is
    /// answered, its reply may never have been published.
    Inherited,
    /// Redis did not answer; the run announces what it saves without the guard.
    Unknown,
}

/// Marks the message's outcome as pending announcement (see the module note).
pub async fn claim(conn: &mut ConnectionManager, ns: &Namespace, message_id: i64) -> Claim {
    let created: redis::RedisResult<Option<String>> = redis::cmd("SET")
        .arg(ns.pending_announcement(message_id))
        .arg(1)
        .arg("NX")
        .arg("EX")
        .arg(PENDING_TTL_SECS)
        .query_async(conn)
        .await;
    match created {
        Ok(Some(_)) => Claim::Created,
        Ok(None) => {
            // An earlier run may have died mid-stream: this run's reply starts over.
            clear_partial(conn, ns, message_id).await;
            Claim::Inherited
        }
        Err(err) => {
            tracing::warn!(error = %err, "could not claim the announcement of a message");
            Claim::Unknown
        }
    }
}

static ANNOUNCE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('DEL', KEYS[1]) == 1 then
    redis.call('DEL', KEYS[3])
    return redis.call('PUBLISH', KEYS[2], ARGV[1])
end
return -1",
    )
});

/// Publishes `event` on the chat's channel if the message's marker is still there, deleting
/// it (and the reply in progress, `partial.rs`) in the same step. True when this call
/// published.
pub async fn announce_once(
    conn: &mut ConnectionManager,
    ns: &Namespace,
    message_id: i64,
    ai_chat_id: i64,
    event: &ChatEvent,
) -> Result<bool> {
    let payload = serde_json::to_string(event)?;
    let receivers: i64 = ANNOUNCE
        .key(ns.pending_announcement(message_id))
        .key(ns.chat_channel(ai_chat_id))
        .key(ns.partial_reply(message_id))
        .arg(payload)
        .invoke_async(conn)
        .await?;
    Ok(receivers >= 0)
}

/// Drops the marker of a run that has nothing to announce.
pub async fn release(conn: &mut ConnectionManager, ns: &Namespace, message_id: i64) {
    let deleted: redis::RedisResult<i64> = redis::cmd("DEL")
        .arg(ns.pending_announcement(message_id))
        .query_async(conn)
        .await;
    if let Err(err) = deleted {
        tracing::warn!(error = %err, "could not release the announcement of a message");
    }
}

/// Forgets the reply in progress to `message_id` (`partial.rs`): its outcome was published
/// without the marker's script, or a new run starts it over.
pub async fn clear_partial(conn: &mut ConnectionManager, ns: &Namespace, message_id: i64) {
    let deleted: redis::RedisResult<i64> = redis::cmd("DEL")
        .arg(ns.partial_reply(message_id))
        .query_async(conn)
        .await;
    if let Err(err) = deleted {
        tracing::warn!(error = %err, "could not forget a reply in progress");
    }
}
