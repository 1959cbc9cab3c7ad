//! Claiming several completion jobs' messages in one statement: the workers' jobs that start
//! at the same time take their messages and read their prompts' rows together, in one round
//! trip and one commit (`worker/src/claim_batch.rs` gathers them).
//!
//! Each claim answers exactly as [`completions::claim_job`] would have for it alone: the batch
//! statement handles the usual case, and the ones it leaves (a message whose row another
//! transaction holds or that is no job's, a question off its chat's active path) are finished
//! here by the single statement.
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::completions::{self, ClaimedJob, JobRow, KnownHistory};
use crate::domain::{MessageStatus, Role};
use crate::error::Result;

/// One job's claim: [`completions::claim_job`]'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimRequest {
    pub message_id: i64,
    pub known: Option<KnownHistory>,
    pub history_limit: i64,
    pub related_limit: Option<i64>,
}

/// [`completions::claim_job`] for each of `claims`, the result aligned with them.
///
/// The statement takes the messages' rows `for no key update skip locked`, in id order, and
/// holds no other row (the lock order of `db/mod.rs`): it never waits while holding, so it
/// closes no cycle. The subject's columns are read from the held row, and the update takes it
/// by its `ctid` (no second lookup). A message the statement returned nothing for (its row was
/// held, or changed by a transaction that committed after the statement's snapshot so that the
/// update missed it, or it is gone or no user message) is claimed afterwards by the single
/// statement, which waits for a held row as a lone claim always has, and says `None` for the
/// others. The same message twice in one batch is claimed by both, as two runs of its job
/// claiming it one after the other would be.
///
/// The history on the active path is read in the statement, as [`completions::claim_job`]
/// reads it (the same `where`, order and limit); a question off the path has its ancestors
/// walked by the single read afterwards, without claiming again.
#[tracing::instrument(skip_all, fields(claims = claims.len()))]
pub async fn claim_jobs(
    db: &mut PgConnection,
    claims: &[ClaimRequest],
) -> Result<Vec<Option<ClaimedJob>>> {
    let n = claims.len();
    let mut ids = Vec::with_capacity(n);
    let mut epochs = Vec::with_capacity(n);
    let mut through_turns = Vec::with_capacity(n);
    let mut history_limits = Vec::with_capacity(n);
    let mut related_limits = Vec::with_capacity(n);
    for claim in claims {
        ids.push(claim.message_id);
        epochs.push(claim.known.map(|k| k.epoch));
        through_turns.push(claim.known.map_or(0, |k| k.through_turn));
        history_limits.push(claim.history_limit);
        related_limits.push(claim.related_limit);
    }
    let rows = sqlx::query_as!(
        JobRow,
        r#"with async_commit as (
               select set_config('synchronous_commit', 'off', true)
           ), input as (
               select * from unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                                    $5::bigint[])
                   with ordinality as t(id, epoch, through_turn, history_limit, related_limit,
                                        ord)
           ), locked as materialized (
               -- The rows as they are once held: the subject's columns with them (no second
               -- lookup), and the `ctid` the update takes its row by.
               select m.id, m.ctid, m.ai_chat_id, m.content, m.active, m.reply_version,
                      m.budget_day, m.budget_tokens, m.status, m.stop_requested_at
               from ai_messages m
               where m.id = any($1::bigint[]) and m.role = $11
               order by m.id
               for no key update skip locked
           ), claimed as (
               update ai_messages m set status = $6
               from async_commit, locked l
               where m.ctid = l.ctid and m.id = l.id and l.status in ($6, $7)
               returning m.id
           ), subject as materialized (
               select i.ord, i.history_limit, i.related_limit,
                      m.id, m.ai_chat_id, m.content, m.active, m.reply_version,
                      m.budget_day, m.budget_tokens,
                      c.id is not null as claimed, m.status,
                      c.id is not null and m.stop_requested_at is not null as stop_requested,
                      a.system_prompt, a.model, a.user_id as owner_id, a.history_epoch,
                      case when exists (select 1 from chat_participants p
                                        where p.chat_id = a.related_chat_id
                                          and p.user_id = a.user_id)
                           then a.related_chat_id end as related_chat_id,
                      case when a.history_epoch = i.epoch then i.through_turn else 0 end
                          as after_turn
               from input i
               join locked m on m.id = i.id
               -- by its key whatever the statistics say, as in `completions::read_job`
               cross join lateral (
                   select a.system_prompt, a.model, a.user_id, a.history_epoch,
                          a.related_chat_id
                   from ai_chats a where a.id = m.ai_chat_id limit 1
               ) a
               left join claimed c on c.id = m.id
           )
           select s.ord as "ord!", s.id as "message_id!", s.ai_chat_id as "ai_chat_id!", s.content as "content!",
                  s.claimed as "claimed!", s.stop_requested as "stop_requested!",
                  exists (select 1 from ai_messages r
                          where r.reply_to = s.id and r.version = s.reply_version) as "answered!",
                  s.system_prompt as "system_prompt!", s.model as "model!",
                  s.owner_id as "owner_id!", s.related_chat_id, s.budget_day, s.budget_tokens,
                  s.history_epoch as "history_epoch!", s.after_turn as "after_turn!",
                  s.active as "active!",
                  coalesce(h.turns, '{}') as "turns!: Vec<i64>",
                  coalesce(h.ended, '{}') as "ended!: Vec<bool>",
                  coalesce(h.roles, '{}') as "roles!: Vec<Role>",
                  coalesce(h.contents, '{}') as "contents!: Vec<String>",
                  coalesce(h.tokens, '{}') as "tokens!: Vec<Option<i32>>",
                  coalesce(r.senders, '{}') as "senders!: Vec<String>",
                  coalesce(r.lines, '{}') as "lines!: Vec<String>",
                  coalesce(r.times, '{}') as "times!: Vec<DateTime<Utc>>"
           from subject s
           -- `completions::read_job`'s `on_path`, for each claimed question on its path
           cross join lateral (
               select array_agg(x.turn order by x.turn, x.id) as turns,
                      array_agg(x.ended order by x.turn, x.id) as ended,
                      array_agg(x.role order by x.turn, x.id) as roles,
                      array_agg(x.content order by x.turn, x.id) as contents,
                      array_agg(x.content_tokens order by x.turn, x.id) as tokens
               from (
                   select coalesce(m.reply_to, m.id) as turn, m.id, m.role, m.content,
                          m.content_tokens, m.role = $10 or m.status not in ($6, $7) as ended
                   from ai_messages m
                   where s.claimed and s.active
                     and m.ai_chat_id = s.ai_chat_id and m.active
                     and coalesce(m.reply_to, m.id) < s.id
                     and coalesce(m.reply_to, m.id) > s.after_turn
                     -- a failed or cancelled question counts only with an active reply, looked
                     -- up by its key: `offset 0` keeps the planner from hashing every active
                     -- message of the table instead (its choice in a young table's generic plan)
                     and (m.role = $10 or m.status not in ($8, $9)
                          or exists (select 1 from ai_messages r
                                     where r.reply_to = m.id and r.active offset 0))
                   order by coalesce(m.reply_to, m.id) desc, m.id desc
                   limit s.history_limit
               ) x
           ) h
           cross join lateral (
               select array_agg(x.sender order by x.id) as senders,
                      array_agg(x.content order by x.id) as lines,
                      array_agg(x.timestamp order by x.id) as times
               from (
                   select m.id, u.username as sender, m.content, m.timestamp
                   from chat_messages m join users u on u.id = m.sender_id
                   where s.claimed and m.chat_id = s.related_chat_id
                   order by m.id desc
                   limit coalesce(s.related_limit, 0)
               ) x
           ) r
           -- A row changed and committed after the statement's snapshot is held in its newest
           -- version, which the update (under that snapshot) does not see: such a claim it
           -- missed is left to the single statement, as a held row is.
           where s.claimed or s.status not in ($6, $7)
           order by s.ord"#,
        &ids,
        epochs.as_slice() as &[Option<i64>],
        &through_turns,
        &history_limits,
        related_limits.as_slice() as &[Option<i64>],
        MessageStatus::Answering.as_str(),
        MessageStatus::Queued.as_str(),
        MessageStatus::Failed.as_str(),
        MessageStatus::Cancelled.as_str(),
        Role::Assistant.as_str(),
        Role::User.as_str(),
    )
    .fetch_all(&mut *db)
    .await?;
    let mut jobs: Vec<Option<ClaimedJob>> = vec![None; n];
    for row in rows {
        let slot = usize::try_from(row.ord - 1).ok();
        let Some((claim, slot)) = slot.and_then(|i| Some((claims.get(i)?, jobs.get_mut(i)?)))
        else {
            continue;
        };
        let walk = row.claimed && !row.active;
        let mut job = row.into_job(claim.related_limit.is_some());
        if walk
            && let Some(read) = completions::read_job(
                &mut *db,
                claim.message_id,
                false,
                None,
                claim.history_limit,
                None,
            )
            .await?
        {
            job.history = read.history;
        }
        *slot = Some(job);
    }
    // No row: another transaction held it or changed it while the statement ran, or it is no
    // job's message (gone, or a reply).
    for (claim, slot) in claims.iter().zip(&mut jobs) {
        if slot.is_none() {
            *slot = completions::claim_job(
                &mut *db,
                claim.message_id,
                claim.known,
                claim.history_limit,
                claim.related_limit,
            )
            .await?;
        }
    }
    Ok(jobs)
}
