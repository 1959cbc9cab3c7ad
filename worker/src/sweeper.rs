//! The sweeper: queues again every user message left waiting (`queued`, or `answering` by a
//! worker whose job is gone) with no live job behind it, and forgets finished jobs
//! (apalis-redis would keep their data in Redis forever).
//!
//! The API commits a message before pushing its job, and removes it if the push fails; that
//! leaves three ways for a committed message to have no job that will ever answer it:
//! - Redis lost its data (a restart without persistence, a fail-over to a replica that missed
//!   the last writes): the job is gone, the message waits forever;
//! - the job died without marking the message (apalis-redis kills a job after 25 failed runs:
//!   a database down for longer than the ~5 minutes those runs span);
//! - the API process died between its commit and its push (of a send, a user's retry or a
//!   staff re-drive, which all commit the message as `queued` before pushing its job).
//!
//! Every `WORKER_SWEEP_INTERVAL_SECS` one worker (a Redis lock elects it) looks at messages
//! waiting for longer than `WORKER_SWEEP_GRACE_SECS` (since `dispatched_at`, or their
//! `timestamp` when it is empty) and follows each one's job keys (`JobQueue::next_job_key`):
//! the first push (`message:{id}`), a staff re-drive (`message:{id}:redrive:{task}`) or an
//! earlier rescue or user retry (`message:{id}:rescue:{task}`). If the last job is still alive (waiting, scheduled or
//! in flight) nothing happens; otherwise a new job is pushed under the next rescue key. The
//! keys are deterministic, so two sweepers rescuing the same message push one job, and the
//! reply write is idempotent anyway (one reply per message). The trim deletes a message's keys
//! once every job of it is finished (`JobQueue::trim_done`): its next push, if any, starts
//! again from the first key, and a push that read the chain just before puts the chain's keys
//! back (`JobQueue::enqueue_next`).
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::sync::watch;

use aichat_shared::db::{self, stale::StaleMessage};
use aichat_shared::jobs::{CompletionJob, JobQueue, NextJob};

use crate::metrics;

/// Stale messages read from PostgreSQL at a time.
const PAGE: usize = 200;
/// Finished jobs forgotten per Redis call, and calls per sweep: a sweep removes up to 50,000,
/// far more than a worker finishes between two sweeps, in calls short enough not to stall Redis.
const TRIM_BATCH: usize = 1_000;
const TRIM_ROUNDS: usize = 50;

pub struct Sweeper {
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub queue: JobQueue,
    pub interval: Duration,
    pub grace: Duration,
    /// Stale messages one sweep looks at, at most (`WORKER_SWEEP_MAX_MESSAGES`).
    pub max_messages: usize,
}

/// What one sweep found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Stale `queued` messages looked at.
    pub stale: u64,
    /// Of those, messages given a new job.
    pub requeued: u64,
    /// Finished jobs whose data was removed from Redis.
    pub trimmed: u64,
}

impl Sweeper {
    /// Sweeps every interval (with ±25 % jitter) until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut cursor = 0;
        loop {
            let pause = self.interval.mul_f64(rand::rng().random_range(0.75..1.25));
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.sweep(&mut cursor).await {
                Ok(swept) if swept.requeued > 0 => tracing::warn!(
                    stale = swept.stale,
                    requeued = swept.requeued,
                    "queued messages without a live job were queued again"
                ),
                Ok(_) => {}
                Err(err) => tracing::warn!(error = format!("{err:#}"), "sweep failed"),
            }
        }
    }

    /// One sweep, if this worker wins the sweep lock: finished jobs forgotten, then up to
    /// `max_messages` stale messages after `cursor` (wrapping around at the end) looked at.
    pub async fn sweep(&self, cursor: &mut i64) -> anyhow::Result<Swept> {
        let mut conn = self.redis.clone();
        let lock_ms = (self.interval.as_millis() as u64).saturating_mul(4) / 5;
        let won: Option<String> = redis::cmd("SET")
            .arg(format!("{}:sweeper", self.queue.config().queue.as_ref()))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(lock_ms.max(100))
            .query_async(&mut conn)
            .await
            .context("taking the sweep lock")?;
        if won.is_none() {
            return Ok(Swept::default());
        }
        let mut trimmed = 0;
        for _ in 0..TRIM_ROUNDS {
            let removed = self
                .queue
                .trim_done(TRIM_BATCH)
                .await
                .context("trimming finished jobs")?;
            trimmed += removed;
            if removed < TRIM_BATCH as u64 {
                break;
            }
        }
        let mut swept = Swept {
            trimmed,
            ..Swept::default()
        };
        // Counted also when the sweep stops at an error: what it queued is queued.
        let swept_stale = self.sweep_stale(cursor, &mut swept).await;
        metrics::swept(swept.requeued);
        swept_stale?;
        Ok(swept)
    }

    /// Pages of `PAGE` stale messages from the cursor on, each queued again if its job is gone,
    /// until `max_messages` were looked at or the end of the table: after Redis lost a backlog,
    /// one sweep re-queues up to `max_messages` of it, and the next goes on from where this one
    /// stopped.
    async fn sweep_stale(&self, cursor: &mut i64, swept: &mut Swept) -> anyhow::Result<()> {
        while (swept.stale as usize) < self.max_messages {
            let limit = PAGE.min(self.max_messages - swept.stale as usize);
            let stale = db::stale::list_stale_queued(
                &self.db,
                *cursor,
                self.grace.as_secs_f64(),
                limit as i64,
            )
            .await
            .context("listing stale queued messages")?;
            *cursor = match stale.last() {
                Some(last) if stale.len() == limit => last.id,
                _ => 0,
            };
            swept.stale += stale.len() as u64;
            for message in stale {
                if self.requeue(message).await? {
                    swept.requeued += 1;
                }
            }
            if *cursor == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Queues `message` again if its last job is gone; true when this call pushed one.
    async fn requeue(&self, message: StaleMessage) -> anyhow::Result<bool> {
        let StaleMessage {
            id: message_id,
            ai_chat_id,
            user_id,
            options,
        } = message;
        let next = self.queue.next_job_key(message_id).await?;
        let key = match &next {
            NextJob::Push { key, .. } => key,
            NextJob::Alive => return Ok(false),
            NextJob::GaveUp => {
                tracing::error!(
                    message_id,
                    "a queued message lost its jobs too many times in a row; leaving it to staff"
                );
                return Ok(false);
            }
        };
        let lost_task = next.last_job();
        let stored = match lost_task {
            Some(task) => self.queue.job_args(task).await.ok().flatten(),
            None => None,
        };
        // Without the lost job's arguments the job is made anew, for the chat's owner, so the
        // per-user limit holds it as it held the original.
        let job = stored.unwrap_or_else(|| {
            CompletionJob::new(
                message_id,
                ai_chat_id,
                options,
                Some(format!("sweep-{message_id}")),
            )
            .for_user(user_id)
        });
        if !self
            .queue
            .enqueue_next(&job, &next, &[])
            .await
            .context("queueing a swept message")?
        {
            return Ok(false);
        }
        tracing::warn!(
            message_id,
            key,
            lost_task = lost_task.unwrap_or("-"),
            "a queued message had no live job; queued it again"
        );
        if let Err(err) = db::retry::on_conflict("sweeper", || {
            db::ai_messages::mark_dispatched(&self.db, message_id)
        })
        .await
        {
            tracing::warn!(error = %err, message_id, "could not record the re-dispatch");
        }
        Ok(true)
    }
}
