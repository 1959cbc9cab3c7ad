//! The context cache: each chat's history as its last job assembled it, kept in Redis, so the
//! next job of the chat reads from PostgreSQL only the turns after it (`claim_job`'s
//! `KnownHistory`), and the prompt is the one a full read would have built.
//!
//! Why an entry stays true:
//! - it holds the rows of the chat's active path up to `through_turn`, a turn before which
//!   every turn had ended (answered, failed or cancelled) when read; an ended turn changes only
//!   with the chat's `history_epoch` (requeues, edits, branch switches), which the entry
//!   carries and the read compares, in the same snapshot as the rows it returns;
//! - new turns of a chat get larger ids than every turn before them (sends into one chat take
//!   turns on its tip row and draw their ids after it), so what comes after `through_turn` is
//!   what the job reads;
//! - of the rows up to `through_turn` it keeps the newest whole turns that fit in the token
//!   budget (`CONTEXT_TOKEN_BUDGET`): trimming drops the oldest whole turns first
//!   (`context::trim_to_budget`), so a turn behind a suffix already over the budget never
//!   reaches the model, whatever comes after. The entry records that budget and the row limit,
//!   and a worker with other settings does not use it.
//!
//! Bounded: one key per chat with a job in the last `CONTEXT_CACHE_SECS`, each at most a
//! budget's worth of text. Losing it (Redis restarted, evicted, expired) costs one full read.
use std::ops::Range;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use aichat_shared::db::completions::{HistoryMessage, HistoryRead, KnownHistory};

use crate::context::{Role, TokenCounter, stored_tokens};
use crate::metrics;
use crate::state::JobContext;

/// A chat's cached history: `rows` owned as read from Redis, borrowed as stored, or as the
/// range of the job's history that [`assemble`] says to store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<R = Vec<HistoryMessage>> {
    /// The chat's `history_epoch` the rows were read at.
    epoch: i64,
    /// Every turn up to this one had ended, and `rows` are theirs (the newest that can count).
    through_turn: i64,
    /// The token budget and row limit the rows were cut for.
    budget: usize,
    limit: usize,
    /// Oldest first, starting with a question.
    rows: R,
}

impl<R> Entry<R> {
    /// What the job's read asks PostgreSQL to skip.
    pub fn known(&self) -> KnownHistory {
        KnownHistory {
            epoch: self.epoch,
            through_turn: self.through_turn,
        }
    }

    fn with_rows<S>(&self, rows: S) -> Entry<S> {
        Entry {
            epoch: self.epoch,
            through_turn: self.through_turn,
            budget: self.budget,
            limit: self.limit,
            rows,
        }
    }
}

/// The entry to store as a range of the history it was assembled with.
pub type Update = Entry<Range<usize>>;

impl Update {
    /// The entry, its rows borrowed from `history` (what [`assemble`] returned with it), so
    /// storing it copies no message.
    pub fn over<'a>(&self, history: &'a [HistoryMessage]) -> Entry<&'a [HistoryMessage]> {
        self.with_rows(history.get(self.rows.clone()).unwrap_or_default())
    }
}

/// What the cache holds for chat `ai_chat_id` that fits this worker's budget and limit; `None`
/// when nothing (or the cache is off, or Redis could not say).
pub async fn load(ctx: &JobContext, ai_chat_id: i64, limit: usize) -> Option<Entry> {
    if ctx.history_cache_secs == 0 {
        return None;
    }
    let key = ctx.ns.history_cache(ai_chat_id);
    let raw: Option<Vec<u8>> = match ctx.redis.clone().get(&key).await {
        Ok(raw) => raw,
        Err(err) => {
            tracing::debug!(error = %err, "context cache unavailable");
            return None;
        }
    };
    let entry: Entry = serde_json::from_slice(&raw?).ok()?;
    (entry.budget == ctx.token_budget && entry.limit == limit).then_some(entry)
}

/// Stores `entry` as chat `ai_chat_id`'s, for `CONTEXT_CACHE_SECS`. A failure only means the
/// next job reads more.
pub async fn store(ctx: &JobContext, ai_chat_id: i64, entry: &Entry<&[HistoryMessage]>) {
    if ctx.history_cache_secs == 0 {
        return;
    }
    let Ok(raw) = serde_json::to_vec(entry) else {
        return;
    };
    let key = ctx.ns.history_cache(ai_chat_id);
    let stored: redis::RedisResult<()> = ctx
        .redis
        .clone()
        .set_ex(&key, raw, ctx.history_cache_secs)
        .await;
    if let Err(err) = stored {
        tracing::debug!(error = %err, "could not store the context cache");
    }
}

/// The history of question `question_id`'s prompt (oldest first, at most `limit` rows, as
/// `db::completions::list_history` gives it, or a suffix of that which trims to the same
/// prompt), from what the cache held and what the job read; and the entry to store after it
/// (a range of that history), when it says more than `cached` did.
pub fn assemble(
    cached: Option<Entry>,
    read: HistoryRead,
    question_id: i64,
    limit: usize,
    budget: usize,
    counter: &TokenCounter,
) -> (Vec<HistoryMessage>, Option<Update>) {
    let HistoryRead {
        epoch,
        after_turn,
        on_path,
        rows: read_rows,
    } = read;
    // A read that reached its limit holds the latest `limit` rows itself.
    let extended = cached.filter(|c| {
        on_path
            && after_turn != 0
            && after_turn == c.through_turn
            && epoch == c.epoch
            && read_rows.len() < limit
    });
    if on_path {
        metrics::context_cache(if after_turn != 0 { "hit" } else { "miss" });
    }
    let previous_through = extended.as_ref().map(|c| c.through_turn);
    let mut rows = extended.map(|c| c.rows).unwrap_or_default();
    // The rows before the first turn still open are the ones an entry may hold.
    let first_open = read_rows.iter().position(|r| !r.ended);
    let through_turn = match first_open.and_then(|i| read_rows.get(i)) {
        Some(open) => open.turn - 1,
        None => question_id - 1,
    };
    let ended = rows.len() + first_open.unwrap_or(read_rows.len());
    rows.extend(read_rows.into_iter().map(|r| r.message));
    let over = rows.len().saturating_sub(limit);
    rows.drain(..over);
    let ended = ended.saturating_sub(over);
    let store = (on_path && previous_through != Some(through_turn)).then(|| {
        let ended = ended.min(rows.len());
        let start = within_budget(rows.get(..ended).unwrap_or_default(), budget, counter);
        Entry {
            epoch,
            through_turn,
            budget,
            limit,
            rows: start..ended,
        }
    });
    (rows, store)
}

/// Where the newest whole turns of `rows` that fit in `budget` start (a question; `rows.len()`
/// when not even the newest turn fits). Costs are the trimming's (`TokenCounter::message`).
fn within_budget(rows: &[HistoryMessage], budget: usize, counter: &TokenCounter) -> usize {
    let mut start = rows.len();
    let mut total = 0usize;
    let mut turn = 0usize;
    for (i, row) in rows.iter().enumerate().rev() {
        turn += counter.framed(&row.content, stored_tokens(row));
        if row.role != Role::User {
            continue;
        }
        total += turn;
        turn = 0;
        if total > budget {
            break;
        }
        start = i;
    }
    start
}

#[cfg(test)]
impl Entry<&[HistoryMessage]> {
    /// The entry as the next job reads it back.
    fn owned(&self) -> Entry {
        self.with_rows(self.rows.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use aichat_shared::db::completions::HistoryRow;
    use proptest::prelude::*;

    use super::*;
    use crate::context::{build_prompt, trim_to_budget};

    /// One turn of a generated conversation as it ends: answered, or failed without a reply.
    #[derive(Debug, Clone)]
    struct Turn {
        question: String,
        question_tokens: Option<i32>,
        reply: Option<(String, Option<i32>)>,
    }

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec!["word", "longer", "réponse", "x", "1234", "the"]),
            1..40,
        )
        .prop_map(|w| w.join(" "))
    }

    fn turn() -> impl Strategy<Value = Turn> {
        (
            text(),
            prop::option::of(1..60i32),
            prop::option::weighted(0.8, (text(), prop::option::of(1..80i32))),
        )
            .prop_map(|(question, question_tokens, reply)| Turn {
                question,
                question_tokens,
                reply,
            })
    }

    fn question_id(turn: usize) -> i64 {
        i64::try_from(turn).unwrap_or(0) * 10 + 10
    }

    /// The rows `claim_job` returns for the question of turn `upto` when turns from `open_from`
    /// on still wait for their reply, only the turns after `after`, the latest `limit` of them.
    fn read(
        turns: &[Turn],
        upto: usize,
        open_from: usize,
        after: i64,
        limit: usize,
    ) -> Vec<HistoryRow> {
        let mut rows = Vec::new();
        for (i, t) in turns.iter().enumerate().take(upto) {
            let turn = question_id(i);
            let ended = i < open_from;
            if ended && t.reply.is_none() {
                continue; // failed without a reply: counts for nothing
            }
            let row = |role, content: &str, content_tokens| HistoryRow {
                turn,
                ended,
                message: HistoryMessage {
                    role,
                    content: content.to_owned(),
                    content_tokens,
                },
            };
            rows.push(row(Role::User, &t.question, t.question_tokens));
            if let (true, Some((reply, tokens))) = (ended, &t.reply) {
                rows.push(row(Role::Assistant, reply, *tokens));
            }
        }
        rows.retain(|r| r.turn > after);
        let over = rows.len().saturating_sub(limit);
        rows.split_off(over)
    }

    fn prompt(
        history: &[HistoryMessage],
        system: &str,
        question: &str,
        budget: usize,
    ) -> Vec<String> {
        let counter = TokenCounter::cl100k();
        let prompt = build_prompt(system.to_owned(), history, question);
        let (trimmed, _) = trim_to_budget(prompt, budget, |m| counter.message(m));
        trimmed
            .into_iter()
            .map(|m| format!("{}: {}", m.role, m.content))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A job whose history comes partly from the entry an earlier job of the chat stored
        /// sends the model the prompt a full read would have built: whatever was open then,
        /// ended since or still open, whatever the budget, the row limit and the turns added.
        #[test]
        fn a_prompt_from_the_cache_is_the_prompt_of_a_full_read(
            turns in prop::collection::vec(turn(), 0..40),
            cuts in (0.0..1.0f64, 0.0..1.0f64, 0.0..1.0f64, 0.0..1.0f64),
            budget in 30usize..400,
            system in text(),
            question in text(),
        ) {
            let counter = TokenCounter::cl100k();
            let n = turns.len();
            let at = |f: f64, lo: usize, hi: usize| lo + ((hi - lo) as f64 * f) as usize;
            let first = at(cuts.0, 0, n);
            let open_then = at(cuts.1, 0, first);
            let second = at(cuts.2, first, n);
            let open_now = at(cuts.3, open_then, second);
            let limit = budget / crate::context::TOKENS_PER_MESSAGE + 1;

            let full = HistoryRead {
                epoch: 3,
                after_turn: 0,
                on_path: true,
                rows: read(&turns, first, open_then, 0, limit),
            };
            let expected: Vec<HistoryMessage> = full.rows.iter().map(|r| r.message.clone()).collect();
            let (history, entry) = assemble(None, full, question_id(first), limit, budget, &counter);
            prop_assert_eq!(&history, &expected);
            let entry = entry.expect("a first read stores an entry").over(&history).owned();

            let known = entry.known();
            let later = HistoryRead {
                epoch: 3,
                after_turn: known.through_turn,
                on_path: true,
                rows: read(&turns, second, open_now, known.through_turn, limit),
            };
            let (cached, _) = assemble(Some(entry), later, question_id(second), limit, budget, &counter);
            let whole: Vec<HistoryMessage> = read(&turns, second, open_now, 0, limit)
                .into_iter()
                .map(|r| r.message)
                .collect();
            prop_assert_eq!(
                prompt(&cached, &system, &question, budget),
                prompt(&whole, &system, &question, budget)
            );
        }
    }

    #[test]
    fn an_entry_of_another_epoch_or_turn_is_not_used() {
        let counter = TokenCounter::cl100k();
        let row = |turn, role, content: &str| HistoryRow {
            turn,
            ended: true,
            message: HistoryMessage {
                role,
                content: content.to_owned(),
                content_tokens: None,
            },
        };
        let entry = Entry {
            epoch: 1,
            through_turn: 19,
            budget: 100,
            limit: 26,
            rows: vec![row(10, Role::User, "stale").message],
        };
        let fresh = vec![
            row(10, Role::User, "new"),
            row(10, Role::Assistant, "reply"),
        ];
        for (epoch, after_turn) in [(2, 0), (1, 0)] {
            let read = HistoryRead {
                epoch,
                after_turn,
                on_path: true,
                rows: fresh.clone(),
            };
            let (history, store) = assemble(Some(entry.clone()), read, 20, 26, 100, &counter);
            assert_eq!(
                history,
                fresh.iter().map(|r| r.message.clone()).collect::<Vec<_>>()
            );
            let store = store.expect("the full read is stored");
            assert_eq!((store.epoch, store.through_turn), (epoch, 19));
        }
        // Off the active path: used for nothing, stored for nothing.
        let read = HistoryRead {
            epoch: 1,
            after_turn: 19,
            on_path: false,
            rows: fresh.clone(),
        };
        let (history, store) = assemble(Some(entry), read, 20, 26, 100, &counter);
        assert_eq!(history.len(), 2);
        assert!(store.is_none());
    }
}
