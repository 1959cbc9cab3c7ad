//! The completion worker's queries: what a job reads to build its prompt, and how it records
//! the reply or the failure.
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;

use crate::domain::{AiMessage, ContextMessage, MessageStatus, Role};
use crate::error::Result;

/// A user message whose job runs, with what its chat contributes to the prompt.
#[derive(Debug, Clone)]
pub struct CompletionSubject {
    pub message_id: i64,
    pub ai_chat_id: i64,
    pub content: String,
    /// This run took the message (`queued` or `answering` → `answering`): it is the one to
    /// answer it. False when the message no longer waits (answered, failed, cancelled).
    pub claimed: bool,
    /// Its user asked to stop it (`db::stops::request_stop`) while an earlier run answered
    /// it: the model is not asked again.
    pub stop_requested: bool,
    /// An assistant message already answers it in its latest regeneration: an earlier run of
    /// the job saved the reply.
    pub answered: bool,
    pub system_prompt: String,
    pub model: String,
    pub owner_id: i64,
    /// The linked related chat, only while the owner still takes part in it.
    pub related_chat_id: Option<i64>,
    /// What the message holds of its user's budget (`budget::Reservation::of_message`).
    pub budget_day: Option<NaiveDate>,
    pub budget_tokens: Option<i32>,
}

/// One earlier message of the conversation, as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryMessage {
    /// `user` or `assistant`.
    pub role: Role,
    pub content: String,
    /// Tokens of `content` as stored when the message was answered (or was the answer);
    /// `None` when not known yet.
    pub content_tokens: Option<i32>,
}

/// The reply to store for a user message.
#[derive(Debug, Clone)]
pub struct NewReply {
    pub content: String,
    /// Token counts as the provider reported them; `None` when it did not.
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub total_tokens: Option<i32>,
    pub model: String,
    pub latency_ms: i32,
    /// Tokens of `content`, kept for the history of later jobs.
    pub content_tokens: Option<i32>,
    /// Tokens of the user message it answers, stored on that message likewise.
    pub question_tokens: Option<i32>,
    /// Its user stopped it while it streamed: `content` is what was generated until then.
    pub stopped: bool,
    /// What it cost, an exact decimal in `currency`, from the prices of the model that
    /// answered (`model`); `None` when that model has no prices or the usage is unknown.
    pub cost: Option<String>,
    pub currency: Option<String>,
}

/// What a job's caller already holds of its chat's history (the workers' context cache): every
/// row of the active path up to turn `through_turn`, as read at the chat's `history_epoch`
/// `epoch`. Turns that have ended change only with that epoch (`migrations/…_history_epoch.sql`),
/// so while it is the same only the turns after `through_turn` need reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownHistory {
    pub epoch: i64,
    pub through_turn: i64,
}

/// A run of a completion job as [`claim_job`] found it: the message with its chat, the history
/// before it, and the related chat's lines.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub subject: CompletionSubject,
    pub history: HistoryRead,
    /// The related chat's latest lines, oldest first: `Some` when they were asked for and the
    /// chat has a related chat its owner still takes part in.
    pub related: Option<Vec<ContextMessage>>,
}

/// The history rows read with a job (none when the run did not take the message).
#[derive(Debug, Clone, Default)]
pub struct HistoryRead {
    /// The chat's `history_epoch` as the statement saw it, with the rows.
    pub epoch: i64,
    /// The rows are the turns after this one only, the caller's [`KnownHistory`] holding the
    /// rest; 0 when they are the whole history (its latest `limit` rows).
    pub after_turn: i64,
    /// The question is on the chat's active path (the only history a cache holds).
    pub on_path: bool,
    /// Oldest first, as [`list_history`] returns them.
    pub rows: Vec<HistoryRow>,
}

/// One message of a job's history, with its turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    /// The question the message belongs to (its own id for a question).
    pub turn: i64,
    /// Its turn had ended when read: its question is answered, failed or cancelled, so the
    /// turn changes only with the chat's `history_epoch`.
    pub ended: bool,
    pub message: HistoryMessage,
}

/// Takes the user message `message_id` for a run of its job and reads, in the same statement
/// (one round trip, one snapshot, one commit), everything the prompt is built from: the message
/// with its chat, the history before it ([`list_history`]'s rows, only the turns after
/// `known.through_turn` when `known.epoch` is still the chat's), and when `related_limit` is
/// given, the related chat's latest lines.
///
/// A message that waits (`queued`, or `answering` when an earlier run died) becomes
/// `answering` and `claimed`; the history and lines are read only then. `None` when the
/// message no longer exists (deleted with its chat) or is not a user message.
///
/// The message's other columns are read as the statement began: when a concurrent statement
/// ended the message meanwhile (a save, a cancel), `claimed` is false and the rest may be
/// older than that change; a caller that is not `claimed` reads what it needs again.
///
/// Committed with `synchronous_commit = off` (local to this statement's transaction): the
/// claim is bookkeeping that a crash may lose without harm. Its change is visible to every
/// other transaction at once, as any commit's; only its WAL flush is not waited for. Lost in a
/// crash, the message is `queued` again: the job's next run claims it, and a stop finding it
/// `queued` cancels it, after which no reply can be saved for it (`save_replies` takes only a
/// message that waits).
#[tracing::instrument(skip(db))]
pub async fn claim_job(
    db: impl PgExecutor<'_>,
    message_id: i64,
    known: Option<KnownHistory>,
    history_limit: i64,
    related_limit: Option<i64>,
) -> Result<Option<ClaimedJob>> {
    read_job(db, message_id, true, known, history_limit, related_limit).await
}

/// The conversation before user message `question_id` as its branch has it: the latest `limit`
/// user and assistant messages, oldest first; what [`claim_job`] reads, without taking the
/// message. Empty when it is not a user message.
///
/// The turns are the question's ancestors (`parent_id`): on the active path these are the turns
/// the user sees before it, and for a question left in another branch, that branch's. Each turn
/// gives its question and one reply: the active one, else the one it showed last
/// (`reply_version`), else the newest. A question that failed or was cancelled without any reply
/// counts for nothing (the user saw an error or stopped it, so the model should not answer it
/// now); queued ones stay, they are part of what the user said. A stopped reply counts as it
/// was saved: the text the user saw. Replies are placed right after the question they answer
/// (`reply_to`), not by their own id, so a reply saved late still follows its question.
///
/// Two ways to the same turns, one of which reads nothing: a question on the active path (the
/// usual case) reads the chat's active messages before its turn from
/// `ai_messages_active_turn_idx`, `(ai_chat_id, coalesce(reply_to, id) desc, id desc) where
/// active`: the scan starts at the newest turn before it and stops after `limit` rows (or at the
/// turn already known), whatever the length of the chat. A question off the path walks its
/// ancestors, one message by its key and one question's replies by
/// `ai_messages_reply_to_version_idx` per turn, at most `limit`.
pub async fn list_history(
    db: impl PgExecutor<'_>,
    question_id: i64,
    limit: i64,
) -> Result<Vec<HistoryMessage>> {
    let read = read_job(db, question_id, false, None, limit, None).await?;
    Ok(read
        .map(|job| job.history.rows.into_iter().map(|r| r.message).collect())
        .unwrap_or_default())
}

/// [`claim_job`], or with `claim` false the same reads without taking the message.
#[tracing::instrument(skip(db))]
pub(super) async fn read_job(
    db: impl PgExecutor<'_>,
    message_id: i64,
    claim: bool,
    known: Option<KnownHistory>,
    history_limit: i64,
    related_limit: Option<i64>,
) -> Result<Option<ClaimedJob>> {
    let row = sqlx::query_as!(
        JobRow,
        r#"with recursive async_commit as (
               select set_config('synchronous_commit', 'off', true) where $7
           ), claimed as (
               update ai_messages set status = $3
               from async_commit
               where id = $1 and role = $8 and status in ($3, $4)
               returning id, stop_requested_at
           ), subject as materialized (
               select m.id, m.ai_chat_id, m.content, m.active, m.parent_id, m.reply_version,
                      m.budget_day, m.budget_tokens,
                      c.id is not null as claimed,
                      c.stop_requested_at is not null as stop_requested,
                      (c.id is not null or not $7) as reads,
                      a.system_prompt, a.model, a.user_id as owner_id, a.history_epoch,
                      case when exists (select 1 from chat_participants p
                                        where p.chat_id = a.related_chat_id
                                          and p.user_id = a.user_id)
                           then a.related_chat_id end as related_chat_id,
                      case when a.history_epoch = $9 then $10::bigint else 0 end as after_turn
               from ai_messages m
               -- by its key whatever the statistics say (`limit` keeps it a nested loop): a
               -- young table's estimates once made this a scan of every chat
               cross join lateral (
                   select a.system_prompt, a.model, a.user_id, a.history_epoch,
                          a.related_chat_id
                   from ai_chats a where a.id = m.ai_chat_id limit 1
               ) a
               left join claimed c on c.id = m.id
               where m.id = $1 and m.role = $8
           ), on_path as (
               select coalesce(m.reply_to, m.id) as turn, m.id, m.role, m.content,
                      m.content_tokens, m.role = $6 or m.status not in ($3, $4) as ended
               from ai_messages m
               where (select reads and active from subject)
                 and m.ai_chat_id = (select ai_chat_id from subject) and m.active
                 and coalesce(m.reply_to, m.id) < $1
                 and coalesce(m.reply_to, m.id) > (select after_turn from subject)
                 -- a failed or cancelled question counts only with an active reply, looked
                 -- up by its key: `offset 0` keeps the planner from hashing every active
                 -- message of the table instead (its choice in a young table's generic plan)
                 and (m.role = $6 or m.status not in ($5, $11)
                      or exists (select 1 from ai_messages r
                                 where r.reply_to = m.id and r.active offset 0))
               order by coalesce(m.reply_to, m.id) desc, m.id desc
               limit $2
           ), turns(id, depth) as (
               select s.parent_id, 1::bigint from subject s where s.reads and not s.active
               union all
               select p.parent_id, t.depth + 1 from turns t join ai_messages p on p.id = t.id
               where t.depth < $2::bigint
           ), off_path as (
               select q.id as turn, v.id, v.role, v.content, v.content_tokens, false as ended
               from turns t
               join ai_messages q on q.id = t.id
               left join lateral (
                   select r.id, r.role, r.content, r.content_tokens from ai_messages r
                   where r.reply_to = q.id
                   order by r.active desc, r.version = q.reply_version desc, r.version desc
                   limit 1
               ) r on true
               cross join lateral (values (q.id, q.role, q.content, q.content_tokens),
                                          (r.id, r.role, r.content, r.content_tokens))
                   as v(id, role, content, content_tokens)
               where v.id is not null
                 and (v.id <> q.id or r.id is not null or q.status not in ($5, $11))
               order by q.id desc, v.id desc
               limit $2
           ), history as (
               select * from on_path union all select * from off_path
           ), related as (
               select m.id, u.username as sender, m.content, m.timestamp
               from chat_messages m join users u on u.id = m.sender_id
               where (select reads from subject)
                 and m.chat_id = (select related_chat_id from subject)
               order by m.id desc
               limit coalesce($12::bigint, 0)
           )
           select 1::bigint as "ord!", s.id as "message_id!", s.ai_chat_id as "ai_chat_id!", s.content as "content!",
                  s.claimed as "claimed!", s.stop_requested as "stop_requested!",
                  exists (select 1 from ai_messages r
                          where r.reply_to = s.id and r.version = s.reply_version) as "answered!",
                  s.system_prompt as "system_prompt!", s.model as "model!",
                  s.owner_id as "owner_id!", s.related_chat_id, s.budget_day, s.budget_tokens,
                  s.history_epoch as "history_epoch!", s.after_turn as "after_turn!",
                  s.active as "active!",
                  array(select h.turn from history h order by h.turn, h.id) as "turns!: Vec<i64>",
                  array(select h.ended from history h order by h.turn, h.id) as "ended!: Vec<bool>",
                  array(select h.role from history h order by h.turn, h.id) as "roles!: Vec<Role>",
                  array(select h.content from history h order by h.turn, h.id) as "contents!: Vec<String>",
                  array(select h.content_tokens from history h order by h.turn, h.id)
                      as "tokens!: Vec<Option<i32>>",
                  array(select r.sender from related r order by r.id) as "senders!: Vec<String>",
                  array(select r.content from related r order by r.id) as "lines!: Vec<String>",
                  array(select r.timestamp from related r order by r.id)
                      as "times!: Vec<DateTime<Utc>>"
           from subject s"#,
        message_id,
        history_limit,
        MessageStatus::Answering.as_str(),
        MessageStatus::Queued.as_str(),
        MessageStatus::Failed.as_str(),
        Role::Assistant.as_str(),
        claim,
        Role::User.as_str(),
        known.map(|k| k.epoch),
        known.map_or(0, |k| k.through_turn),
        MessageStatus::Cancelled.as_str(),
        related_limit,
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(|row| row.into_job(related_limit.is_some())))
}

/// A row of [`read_job`] or of the batched claim (`db::claims`): the message with its chat,
/// and the history and related lines as parallel arrays (one round trip for all of them).
#[derive(Debug)]
pub(super) struct JobRow {
    /// The position of the claim in its batch, from 1.
    pub ord: i64,
    pub message_id: i64,
    pub ai_chat_id: i64,
    pub content: String,
    pub claimed: bool,
    pub stop_requested: bool,
    pub answered: bool,
    pub system_prompt: String,
    pub model: String,
    pub owner_id: i64,
    pub related_chat_id: Option<i64>,
    pub budget_day: Option<NaiveDate>,
    pub budget_tokens: Option<i32>,
    pub history_epoch: i64,
    pub after_turn: i64,
    pub active: bool,
    pub turns: Vec<i64>,
    pub ended: Vec<bool>,
    pub roles: Vec<Role>,
    pub contents: Vec<String>,
    pub tokens: Vec<Option<i32>>,
    pub senders: Vec<String>,
    pub lines: Vec<String>,
    pub times: Vec<DateTime<Utc>>,
}

impl JobRow {
    /// The job as read; `related_asked`: the related chat's lines were asked for.
    pub(super) fn into_job(self, related_asked: bool) -> ClaimedJob {
        let related = match (related_asked, self.related_chat_id) {
            (true, Some(_)) => Some(
                self.senders
                    .into_iter()
                    .zip(self.lines)
                    .zip(self.times)
                    .map(|((sender, content), timestamp)| ContextMessage {
                        sender,
                        content,
                        timestamp,
                    })
                    .collect(),
            ),
            _ => None,
        };
        let rows = self
            .turns
            .into_iter()
            .zip(self.ended)
            .zip(self.roles)
            .zip(self.contents.into_iter().zip(self.tokens))
            .map(
                |(((turn, ended), role), (content, content_tokens))| HistoryRow {
                    turn,
                    ended,
                    message: HistoryMessage {
                        role,
                        content,
                        content_tokens,
                    },
                },
            )
            .collect();
        ClaimedJob {
            subject: CompletionSubject {
                message_id: self.message_id,
                ai_chat_id: self.ai_chat_id,
                content: self.content,
                claimed: self.claimed,
                stop_requested: self.stop_requested,
                answered: self.answered,
                system_prompt: self.system_prompt,
                model: self.model,
                owner_id: self.owner_id,
                related_chat_id: self.related_chat_id,
                budget_day: self.budget_day,
                budget_tokens: self.budget_tokens,
            },
            history: HistoryRead {
                epoch: self.history_epoch,
                after_turn: self.after_turn,
                on_path: self.active,
                rows,
            },
            related,
        }
    }
}

/// Stores the assistant reply to `user_message_id` and marks the user message `answered`, in
/// one statement (so one round trip and one commit, both writes or neither).
///
/// Returns the new message, or `None` when there is nothing to do: another run of the job
/// already saved a reply (the unique `(reply_to, version)` index keeps exactly one per
/// regeneration), or the user message is gone or no longer waits (failed, or cancelled by its
/// user).
///
/// The reply gets the question's `reply_version`; it is active when its question is, and then
/// the question's other replies no longer are.
pub async fn save_reply(
    db: impl PgExecutor<'_>,
    user_message_id: i64,
    reply: &NewReply,
) -> Result<Option<AiMessage>> {
    let saved = save_replies(db, &[(user_message_id, reply)]).await?;
    Ok(saved.into_iter().next().flatten())
}

/// [`save_reply`] for several replies at once: one statement, one commit. The result is
/// aligned with `replies`. When the same user message appears more than once, only its first
/// reply can be stored; the others come back `None`, as when another run answered first.
///
/// Locks (the order of `db/mod.rs`): first the chats of the questions, `for key share`, in id
/// order (so a chat being deleted is waited for before any message row is held, and the
/// foreign-key checks at the end of the statement find the lock already taken); then the
/// questions, in id order. Two batches answering the same messages (a job run twice) wait for
/// each other on the first question they share; sends, which hold only key-share chat locks,
/// never wait for a reply save.
#[tracing::instrument(skip_all, fields(replies = replies.len()))]
pub async fn save_replies(
    db: impl PgExecutor<'_>,
    replies: &[(i64, &NewReply)],
) -> Result<Vec<Option<AiMessage>>> {
    let n = replies.len();
    let mut questions = Vec::with_capacity(n);
    let mut contents = Vec::with_capacity(n);
    let mut prompt_tokens = Vec::with_capacity(n);
    let mut completion_tokens = Vec::with_capacity(n);
    let mut total_tokens = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    let mut content_tokens = Vec::with_capacity(n);
    let mut question_tokens = Vec::with_capacity(n);
    let mut stopped = Vec::with_capacity(n);
    let mut costs = Vec::with_capacity(n);
    let mut currencies = Vec::with_capacity(n);
    for (question, reply) in replies {
        questions.push(*question);
        contents.push(reply.content.as_str());
        prompt_tokens.push(reply.prompt_tokens);
        completion_tokens.push(reply.completion_tokens);
        total_tokens.push(reply.total_tokens);
        models.push(reply.model.as_str());
        latencies.push(reply.latency_ms);
        content_tokens.push(reply.content_tokens);
        question_tokens.push(reply.question_tokens);
        stopped.push(reply.stopped);
        costs.push(reply.cost.as_deref());
        currencies.push(reply.currency.as_deref());
    }
    let rows = sqlx::query_as!(
        AiMessage,
        r#"with input as (
             select distinct on (t.question_id) t.*
             from unnest($1::bigint[], $2::text[], $3::integer[], $4::integer[], $5::integer[],
                         $6::text[], $7::integer[], $8::integer[], $9::integer[], $13::boolean[],
                         $16::text[], $17::text[])
                  with ordinality as t(question_id, content, prompt_tokens, completion_tokens,
                      total_tokens, model, latency_ms, content_tokens, question_tokens, stopped,
                      cost, currency, ord)
             order by t.question_id, t.ord
         ), chats as materialized (
             -- `id = any` of an array: an index lookup per chat, never a scan of every chat
             select a.id from ai_chats a
             where a.id = any(array(select q.ai_chat_id from ai_messages q
                                    where q.id = any($1::bigint[])))
             order by a.id
             for key share
         ), questions as materialized (
             select q.id, q.ai_chat_id, q.reply_version, q.active
             from ai_messages q join chats c on c.id = q.ai_chat_id
             -- `id = any`: a lookup per question; as a semi-join with the input, analyzed
             -- statistics made it a scan of every waiting message's index entry per batch
             where q.id = any($1::bigint[]) and q.status in ($14, $15)
             order by q.id
             for no key update of q
         ), m as (
             insert into ai_messages as m (ai_chat_id, role, content, status, prompt_tokens,
                 completion_tokens, total_tokens, model, latency_ms, reply_to, content_tokens,
                 stopped, parent_id, version, active, cost, currency)
             select u.ai_chat_id, $10, i.content, $11, i.prompt_tokens, i.completion_tokens,
                 i.total_tokens, i.model, i.latency_ms, u.id, i.content_tokens, i.stopped,
                 u.id, u.reply_version, u.active, i.cost::numeric, i.currency
             from input i join questions u on u.id = i.question_id
             order by u.id
             on conflict (reply_to, version) where reply_to is not null do nothing
             returning m.id, m.ai_chat_id as ai_chat, m.role as "role: Role", m.content, m.timestamp,
                 m.prompt_tokens, m.completion_tokens, m.total_tokens, m.status as "status: MessageStatus", m.error,
                 m.model, m.reply_to, m.stopped, m.parent_id, m.version, m.active,
                 m.cost::text as "cost?", m.currency
         ), answered as (
             update ai_messages q set status = $12, error = null,
                 content_tokens = coalesce(i.question_tokens, q.content_tokens)
             from m join input i on i.question_id = m.reply_to
             where q.id = m.reply_to
         ), superseded as (
             -- Not `and o.active`: rows are found as the statement's snapshot had them, and a
             -- branch switch that committed while this waited for the chat may have made one
             -- active since; the update reads each row again before it writes.
             -- Only past version 1: a question waits with `reply_version` 1 only while it has
             -- no reply (a requeue gives it the version after its replies'), so a first reply
             -- has none to supersede and costs no lookup.
             update ai_messages o set active = false
             from m
             where m.active and m.version > 1 and o.reply_to = m.reply_to and o.id <> m.id
         )
         select * from m"#,
        &questions,
        // sqlx's check knows `text[]` only as `[String]` and `integer[]` only as `[i32]`;
        // borrowed strings and nullable integers encode to the same types, so these binds
        // state theirs (the cast to a named type skips that check, not the encoding).
        contents.as_slice() as &[&str],
        prompt_tokens.as_slice() as &[Option<i32>],
        completion_tokens.as_slice() as &[Option<i32>],
        total_tokens.as_slice() as &[Option<i32>],
        models.as_slice() as &[&str],
        &latencies,
        content_tokens.as_slice() as &[Option<i32>],
        question_tokens.as_slice() as &[Option<i32>],
        Role::Assistant.as_str(),
        MessageStatus::Complete.as_str(),
        MessageStatus::Answered.as_str(),
        &stopped,
        MessageStatus::Queued.as_str(),
        MessageStatus::Answering.as_str(),
        // Decimal strings, cast in SQL: exact, and no decimal type on this side.
        costs.as_slice() as &[Option<&str>],
        currencies.as_slice() as &[Option<&str>],
    )
    .fetch_all(db)
    .await?;
    let mut saved: Vec<Option<AiMessage>> = vec![None; n];
    for row in rows {
        // The first slot asking for this message gets its reply.
        let slot = row
            .reply_to
            .and_then(|q| questions.iter().position(|&asked| asked == q));
        if let Some(slot) = slot.and_then(|i| saved.get_mut(i)) {
            *slot = Some(row);
        }
    }
    Ok(saved)
}

/// Marks a user message `failed` with a user-safe `error`, unless it has been answered (or
/// cancelled) in the meantime. Returns whether it changed.
#[tracing::instrument(skip(db, error))]
pub async fn mark_failed(db: impl PgExecutor<'_>, message_id: i64, error: &str) -> Result<bool> {
    let done = sqlx::query!(
        r#"update ai_messages m set status = $3, error = $2,
               -- a failed regeneration: the question shows again the reply it showed (its
               -- active one), which a later return to its branch then finds by this version
               reply_version = coalesce((select r.version from ai_messages r
                                         where r.reply_to = m.id and r.active),
                                        m.reply_version)
           where m.id = $1 and m.role = $4 and m.status in ($5, $6)"#,
        message_id,
        error,
        MessageStatus::Failed.as_str(),
        Role::User.as_str(),
        MessageStatus::Queued.as_str(),
        MessageStatus::Answering.as_str(),
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
