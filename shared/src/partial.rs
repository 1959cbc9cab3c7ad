//! Replies in progress: the text a reply has streamed so far, kept in Redis where every API
//! instance can read it, so a client that (re)connects while a reply streams gets it whole.
//!
//! Each reply's deltas are a list (`Namespace::partial_reply`): a delta is appended and its
//! `assistant_delta` published in one script ([`push_delta`]), numbered by its place in the
//! list (`seq`: 1, 2, 3 …). Whoever reads the list then listens on the chat's channel (having
//! subscribed first) has the text up to `seq = len` and needs only the live deltas numbered
//! higher: none is missing, none repeated. The list is bounded by the reply's own cap
//! (`MAX_COMPLETION_TOKENS`), expires [`PARTIAL_TTL_SECS`] after its last delta, and is deleted
//! in the script that announces the message's outcome (`announce::announce_once`), or when a
//! later run of the job starts over (`announce::claim`).
//!
//! A reply that starts over within a run (its model call retried after part of it streamed)
//! empties its list and publishes an empty `assistant_partial` ([`restart`]): followers drop
//! what they had, and the deltas that follow are numbered from 1 again.
use std::sync::LazyLock;

use redis::aio::ConnectionManager;

use crate::error::Result;
use crate::events::ChatEvent;
use crate::keys::Namespace;

/// A reply in progress whose worker vanished is forgotten this long after its last delta.
pub const PARTIAL_TTL_SECS: u64 = 3600;

/// KEYS: the list, the chat's channel. ARGV: the delta, the TTL, the user message id, the
/// delta as a JSON string. Returns the delta's `seq`.
static PUSH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local seq = redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], '{"type":"assistant_delta","message_id":' .. ARGV[3] ..
    ',"delta":' .. ARGV[4] .. ',"seq":' .. seq .. '}')
return seq"#,
    )
});

/// Appends `delta` to the reply in progress to `message_id` and publishes it as
/// `assistant_delta` with its `seq`, in one step; returns the `seq`.
pub async fn push_delta(
    conn: &mut ConnectionManager,
    ns: &Namespace,
    ai_chat_id: i64,
    message_id: i64,
    delta: &str,
) -> Result<u64> {
    let seq: u64 = PUSH
        .key(ns.partial_reply(message_id))
        .key(ns.chat_channel(ai_chat_id))
        .arg(delta)
        .arg(PARTIAL_TTL_SECS)
        .arg(message_id)
        .arg(serde_json::to_string(delta)?)
        .invoke_async(conn)
        .await?;
    Ok(seq)
}

/// KEYS: the list, the chat's channel. ARGV: the `assistant_partial` event.
static RESTART: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
redis.call('DEL', KEYS[1])
return redis.call('PUBLISH', KEYS[2], ARGV[1])",
    )
});

/// Starts the reply in progress to `message_id` over (its model call is retried after part of
/// it streamed): the list is emptied and an empty `assistant_partial` (`seq` 0) published in
/// one step, so every follower drops the text it had; the next delta is numbered 1.
pub async fn restart(
    conn: &mut ConnectionManager,
    ns: &Namespace,
    ai_chat_id: i64,
    message_id: i64,
) -> Result<()> {
    let event = ChatEvent::AssistantPartial {
        message_id,
        content: String::new(),
        seq: 0,
    };
    let _receivers: i64 = RESTART
        .key(ns.partial_reply(message_id))
        .key(ns.chat_channel(ai_chat_id))
        .arg(serde_json::to_string(&event)?)
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// A reply in progress as read: its deltas after the `seq` asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Partial {
    /// The deltas numbered `after + 1` to `seq`; all of them when the reply started over
    /// since `after` (`restarted`).
    pub deltas: Vec<String>,
    /// The number of the last delta; 0 when none streamed yet (or the reply is no longer in
    /// progress).
    pub seq: u64,
    /// The reply holds fewer deltas than the `after` asked for: it started over since.
    pub restarted: bool,
}

impl Partial {
    pub fn content(&self) -> String {
        self.deltas.concat()
    }
}

/// The deltas of the reply in progress to `message_id` after `after` (0: all of them); all of
/// them, `restarted`, when it holds fewer than `after`.
pub async fn read(
    conn: &mut ConnectionManager,
    ns: &Namespace,
    message_id: i64,
    after: u64,
) -> Result<Partial> {
    let all = read_many(conn, ns, &[message_id])
        .await?
        .pop()
        .map(|partial| partial.deltas)
        .unwrap_or_default();
    let seq = all.len() as u64;
    if after > seq {
        return Ok(Partial {
            deltas: all,
            seq,
            restarted: true,
        });
    }
    let skip = usize::try_from(after).unwrap_or(usize::MAX);
    Ok(Partial {
        deltas: all.into_iter().skip(skip).collect(),
        seq,
        restarted: false,
    })
}

/// The whole text so far of the replies in progress to `message_ids`, in one round trip.
pub async fn read_many(
    conn: &mut ConnectionManager,
    ns: &Namespace,
    message_ids: &[i64],
) -> Result<Vec<Partial>> {
    if message_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for &id in message_ids {
        pipe.cmd("LRANGE").arg(ns.partial_reply(id)).arg(0).arg(-1);
    }
    let lists: Vec<Vec<String>> = pipe.query_async(conn).await?;
    Ok(lists
        .into_iter()
        .map(|deltas| {
            let seq = deltas.len() as u64;
            Partial {
                deltas,
                seq,
                restarted: false,
            }
        })
        .collect())
}
