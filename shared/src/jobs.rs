//! The completion job: what the API puts in the Redis queue and the worker takes out.
use std::time::Duration;

use apalis::prelude::TaskBuilder;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::domain::ContextOptions;
use crate::error::Result;
use crate::keys::Namespace;

/// Ask the model to answer one user message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionJob {
    /// The user message to answer.
    pub message_id: i64,
    pub ai_chat_id: i64,
    pub include_related_chat_context: bool,
    pub context_message_limit: i32,
    /// The id of the API request that queued it, so its log lines can be followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The user's daily token budget reserved for this message, to settle after the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::budget::Reservation>,
    /// The user the message is answered for: jobs of one user run at most
    /// `WORKER_PER_USER_CONCURRENCY` at once across the workers. Absent in jobs queued before
    /// it existed, which no per-user limit holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i64>,
    /// The database the message is in (`db::installation_id`), stamped by [`JobQueue`]: a
    /// worker drops a job of another database instead of answering whatever message now has
    /// that id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation: Option<String>,
}

impl CompletionJob {
    pub fn new(
        message_id: i64,
        ai_chat_id: i64,
        options: ContextOptions,
        request_id: Option<String>,
    ) -> Self {
        CompletionJob {
            message_id,
            ai_chat_id,
            include_related_chat_context: options.include_related_chat_context,
            context_message_limit: options.context_message_limit,
            request_id,
            budget: None,
            user_id: None,
            installation: None,
        }
    }

    /// The same job, answered for `user_id`.
    pub fn for_user(self, user_id: i64) -> Self {
        CompletionJob {
            user_id: Some(user_id),
            ..self
        }
    }
}

/// How long a pushed job's de-duplication key lives at most: a second push of the same message
/// within this window is a no-op. Longer than any re-enqueue grace period. The sweeper deletes
/// a message's keys sooner, once every job of it is finished ([`JobQueue::trim_done`]).
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// The apalis-redis queue configuration both sides use. The worker adds its heartbeat settings.
pub fn queue_config(ns: &Namespace) -> apalis_redis::Config {
    apalis_redis::Config::default()
        .queue(ns.completion_queue())
        // Nothing listens to apalis' own pub/sub events; they would cost a PUBLISH per push/ack.
        .emit_events(false)
        .idempotency_ttl(Some(IDEMPOTENCY_TTL))
}

/// The producer side of the completion queue.
#[derive(Clone)]
pub struct JobQueue {
    conn: ConnectionManager,
    config: apalis_redis::Config,
    installation: Option<String>,
    /// `Namespace::jobs_pushed`: a push that finds no job waiting publishes on it, after its
    /// jobs are in the queue.
    pushed: String,
}

impl JobQueue {
    pub fn new(conn: ConnectionManager, ns: &Namespace) -> Self {
        JobQueue {
            conn,
            config: queue_config(ns),
            installation: ns.installation().map(str::to_owned),
            pushed: ns.jobs_pushed(),
        }
    }

    /// The de-duplication key of a message's first job.
    pub fn message_job_key(&self, message_id: i64) -> String {
        self.job_key(format!("message:{message_id}"))
    }

    /// The de-duplication key of a re-drive of a dead job.
    pub fn redrive_job_key(&self, message_id: i64, dead_task_id: &str) -> String {
        self.job_key(format!("message:{message_id}:redrive:{dead_task_id}"))
    }

    /// The de-duplication key of the sweeper's rescue of a lost job.
    pub fn rescue_job_key(&self, message_id: i64, lost_task_id: &str) -> String {
        self.job_key(format!("message:{message_id}:rescue:{lost_task_id}"))
    }

    /// De-duplication keys carry the installation: apalis keeps them for a day, longer than a
    /// database that is dropped and created again keeps its ids apart.
    fn job_key(&self, key: String) -> String {
        match &self.installation {
            Some(id) => format!("{id}:{key}"),
            None => key,
        }
    }

    pub fn config(&self) -> &apalis_redis::Config {
        &self.config
    }

    /// Pushes the job; `key` de-duplicates pushes (a second push with the same key is dropped).
    /// Returns whether a new job was queued.
    #[tracing::instrument(skip(self))]
    pub async fn enqueue_completion(&self, job: &CompletionJob, key: &str) -> Result<bool> {
        self.push_one(job, key, &[]).await
    }

    /// Pushes one job under `key`, then publishes `then_publish` in the same script run;
    /// whether a new job was queued.
    async fn push_one(
        &self,
        job: &CompletionJob,
        key: &str,
        then_publish: &[(String, String)],
    ) -> Result<bool> {
        let (enqueued, scheduled) = self.push(&[self.task(job, key)?], then_publish).await?;
        Ok(enqueued + scheduled > 0)
    }

    /// Pushes several jobs in one round trip (one script run); each with its de-duplication
    /// key, as in [`JobQueue::enqueue_completion`]. Then, in the same run, publishes each
    /// `(channel, message)` of `then_publish` (`events::encode_events`): nothing is published
    /// unless every job was pushed.
    #[tracing::instrument(skip_all, fields(jobs = jobs.len()))]
    pub async fn enqueue_completions(
        &self,
        jobs: &[(CompletionJob, String)],
        then_publish: &[(String, String)],
    ) -> Result<()> {
        let tasks = jobs
            .iter()
            .map(|(job, key)| self.task(job, key))
            .collect::<Result<Vec<_>>>()?;
        self.push(&tasks, then_publish).await?;
        Ok(())
    }

    /// Every push: the tasks, then `then_publish`, then, if no job waited before them, the
    /// wake-up of the workers that found the queue empty, all in one script run; returns
    /// (queued, scheduled) as apalis counts them. Behind a backlog the workers fetch again as
    /// soon as they have room, so no wake-up is needed there.
    async fn push(
        &self,
        tasks: &[apalis_redis::RedisTask],
        then_publish: &[(String, String)],
    ) -> Result<(u32, u32)> {
        let mut conn = self.conn.clone();
        Ok(apalis_redis::queries::push_tasks_then_publish(
            &mut conn,
            &self.config,
            tasks,
            then_publish,
            Some(&self.pushed),
        )
        .await?)
    }
}

impl JobQueue {
    /// The apalis task of a completion job: its JSON arguments, stamped with this queue's
    /// installation, under the de-duplication `key`.
    fn task(&self, job: &CompletionJob, key: &str) -> Result<apalis_redis::RedisTask> {
        let args = match (&job.installation, &self.installation) {
            (None, Some(id)) => serde_json::to_vec(&CompletionJob {
                installation: Some(id.clone()),
                ..job.clone()
            })?,
            _ => serde_json::to_vec(job)?,
        };
        Ok(TaskBuilder::new(args).idempotency_key(key).build())
    }
}

/// Jobs followed per message before [`JobQueue::next_job_key`] gives up on it: a user's
/// retries each add one to the chain (`SEND_RATE_PER_MINUTE` paces them), lost jobs the
/// others. The keys live a day, so a chain this long takes a retry every half hour all day.
const MAX_GENERATIONS: usize = 50;

/// Where the chain of a message's jobs ends (`JobQueue::next_job_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextJob {
    /// A job of the message is still alive (waiting, scheduled, or in a worker's hands): it
    /// will run the message; pushing another would run it twice.
    Alive,
    /// No job of the message is alive: a new one goes under `key`, after the jobs of `chain`
    /// (the keys walked to get here, each with its job, oldest first; empty when the message
    /// never had one or its keys are gone). Push it with [`JobQueue::enqueue_next`], which
    /// keeps `chain` leading to it.
    Push {
        key: String,
        chain: Vec<(String, String)>,
    },
    /// The message lost more jobs in a row than anyone should follow.
    GaveUp,
}

impl NextJob {
    /// The job a push goes after: the latest of the message, done or dead or lost (`None` when
    /// there is none to go after, or nothing is to be pushed).
    pub fn last_job(&self) -> Option<&str> {
        match self {
            NextJob::Push { chain, .. } => chain.last().map(|(_, task)| task.as_str()),
            NextJob::Alive | NextJob::GaveUp => None,
        }
    }
}

impl JobQueue {
    /// Follows the de-duplication keys of `message_id`'s jobs, oldest first: its first push
    /// (`message:{id}`), then after each job a staff re-drive (`…:redrive:{task}`) or else a
    /// rescue (`…:rescue:{task}`, also what a user's retry pushes). The keys are deterministic,
    /// so two callers that find the same end push one job between them.
    pub async fn next_job_key(&self, message_id: i64) -> Result<NextJob> {
        self.chain_end(message_id, false).await
    }

    /// [`next_job_key`](Self::next_job_key) for a message whose jobs are done with it: its
    /// regeneration after it was answered. A job of it still alive is the one that answered
    /// it, finishing; the new job goes after it (its rescue key, which a sweep following the
    /// chain finds taken).
    pub async fn next_job_key_after_answer(&self, message_id: i64) -> Result<NextJob> {
        self.chain_end(message_id, true).await
    }

    async fn chain_end(&self, message_id: i64, past_alive: bool) -> Result<NextJob> {
        let mut conn = self.conn.clone();
        let mut key = self.message_job_key(message_id);
        let mut chain = Vec::new();
        for _ in 0..MAX_GENERATIONS {
            let task: Option<String> = conn.get(self.stored_key(&key)).await?;
            let Some(task) = task else {
                return Ok(NextJob::Push { key, chain });
            };
            if !past_alive && self.alive(&task).await? {
                return Ok(NextJob::Alive);
            }
            let redrive = self.redrive_job_key(message_id, &task);
            let redriven: bool = conn.exists(self.stored_key(&redrive)).await?;
            let next = if redriven {
                redrive
            } else {
                self.rescue_job_key(message_id, &task)
            };
            chain.push((std::mem::replace(&mut key, next), task));
        }
        Ok(NextJob::GaveUp)
    }

    /// Pushes `job` where `next` says ([`NextJob::Push`]; anything else pushes nothing), and
    /// returns whether a new job was queued. Each `(channel, message)` of `then_publish`
    /// (`events::encode_events`) is published in the push's own script run, once the job is
    /// there, before any worker can take it (also when the push was dropped, its key taken by
    /// another push since `next` was read: that job was pushed without them). Then sets again
    /// each key of the chain that led there, where it is missing: the sweeper deletes a
    /// message's keys once all its jobs are finished (`trim_done`), and a chain read just
    /// before that would otherwise leave the new job where no walk from the message's first key
    /// finds it (a later sweep would push a second one). A key taken meanwhile by another push
    /// is left alone. A restore that fails is logged, not returned: the job is queued, and its
    /// caller must not undo what it queued it for.
    pub async fn enqueue_next(
        &self,
        job: &CompletionJob,
        next: &NextJob,
        then_publish: &[(String, String)],
    ) -> Result<bool> {
        let NextJob::Push { key, chain, .. } = next else {
            return Ok(false);
        };
        let pushed = self.push_one(job, key, then_publish).await?;
        if !chain.is_empty() {
            let ttl = IDEMPOTENCY_TTL.as_secs();
            let mut restore = redis::pipe();
            for (key, task) in chain {
                restore
                    .cmd("set")
                    .arg(self.stored_key(key))
                    .arg(task)
                    .arg("nx")
                    .arg("ex")
                    .arg(ttl)
                    .ignore();
            }
            let mut conn = self.conn.clone();
            if let Err(err) = restore.query_async::<()>(&mut conn).await {
                tracing::warn!(error = %err, message_id = job.message_id,
                    "could not set the chain's keys again after a push; a sweep may push its job again");
            }
        }
        Ok(pushed)
    }

    /// The Redis key under which apalis-redis stores the de-duplication `key` (its job's id).
    pub fn stored_key(&self, key: &str) -> String {
        format!("{}:{key}", self.config.idempotency_key_set())
    }

    /// A job is alive while its data exists and it is neither done nor dead: it waits, is
    /// scheduled for a retry, or is in some worker's hands (a dead worker's jobs come back to
    /// the queue after the orphan window).
    async fn alive(&self, task: &str) -> Result<bool> {
        let mut conn = self.conn.clone();
        let (exists, done, dead): (bool, bool, bool) = redis::pipe()
            .hexists(self.config.job_data_hash(), task)
            .sismember(self.config.done_jobs_set(), task)
            .sismember(self.config.dead_jobs_set(), task)
            .query_async(&mut conn)
            .await?;
        Ok(exists && !done && !dead)
    }
}

/// How many completion jobs are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Queued or scheduled, not yet taken by a worker.
    pub waiting: u64,
    /// Taken by a live worker.
    pub in_flight: u64,
    /// Ended for good (the model could not answer); re-drivable.
    pub dead: u64,
}

/// Counts in one round trip; worker in-flight sets are named in the workers set. (apalis-redis
/// keeps the dead jobs in a plain set, the scheduled ones in a sorted set.)
const DEPTH_SCRIPT: &str = r#"
local running = 0
for _, worker in ipairs(redis.call('zrange', KEYS[2], 0, -1)) do
  running = running + redis.call('scard', ARGV[1] .. ':' .. worker)
end
return { redis.call('llen', KEYS[1]) + redis.call('zcard', KEYS[4]), running, redis.call('scard', KEYS[3]) }
"#;

impl JobQueue {
    pub async fn depth(&self) -> Result<QueueDepth> {
        Ok(self.depth_and_oldest_age().await?.0)
    }
}

/// The age of the oldest job waiting to be taken, in milliseconds of the Redis server's clock
/// (`TIME`), so every API and worker reads the same figure: appended to [`DEPTH_SCRIPT`]'s
/// counts, over the same keys. Two candidates, each found in O(log n):
/// - the head of the active list, the next job a fetch takes (jobs reach the list at their
///   push, from the scheduled set once due, oldest first, or from a stopped or dead worker):
///   waiting since its task id, a ULID, was made at its push;
/// - the first due job of the scheduled set, where retries wait (and pushes landed before the
///   vendored apalis-redis pushed due jobs onto the list): its score is when it became due, in
///   whole seconds; the ULID holds the milliseconds of a push within that second. Jobs due
///   later are not waiting yet.
const OLDEST_WAITING_LUA: &str = r#"
local function ulid_ms(id)
  local alphabet = '0123456789ABCDEFGHJKMNPQRSTVWXYZ'
  if type(id) ~= 'string' or #id ~= 26 then return nil end
  local ms = 0
  for i = 1, 10 do
    local digit = string.find(alphabet, string.upper(string.sub(id, i, i)), 1, true)
    if not digit then return nil end
    ms = ms * 32 + digit - 1
  end
  return ms
end
local time = redis.call('time')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local since = ulid_ms(redis.call('lindex', KEYS[1], 0))
local due = redis.call('zrangebyscore', KEYS[4], '-inf', time[1], 'LIMIT', 0, 1, 'WITHSCORES')
if due[1] then
  local at = math.max(tonumber(due[2]) * 1000, ulid_ms(due[1]) or 0)
  if not since or at < since then since = at end
end
local age = 0
if since and now > since then age = now - since end
table.insert(counts, age)
return counts
"#;

/// [`DEPTH_SCRIPT`] and [`OLDEST_WAITING_LUA`] as one script (one round trip).
static DEPTH_AND_AGE_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        "local function depth(){DEPTH_SCRIPT}end\nlocal counts = depth()\n{OLDEST_WAITING_LUA}"
    ))
});

impl JobQueue {
    /// [`JobQueue::depth`], and how long the oldest job waiting to be taken has waited (zero
    /// when none waits): the scaling signal for workers.
    pub async fn depth_and_oldest_age(&self) -> Result<(QueueDepth, Duration)> {
        let mut conn = self.conn.clone();
        let (waiting, in_flight, dead, age_ms): (u64, u64, u64, u64) = DEPTH_AND_AGE_SCRIPT
            .key(self.config.active_jobs_list())
            .key(self.config.workers_set())
            .key(self.config.dead_jobs_set())
            .key(self.config.scheduled_jobs_set())
            .arg(self.config.inflight_jobs_set())
            .invoke_async(&mut conn)
            .await?;
        let depth = QueueDepth {
            waiting,
            in_flight,
            dead,
        };
        Ok((depth, Duration::from_millis(age_ms)))
    }

    /// Sets the queue gauges ([`describe_queue_gauges`]) from one read of the queue; on a
    /// Redis error they keep their last values and the error is logged. `/metrics` of both
    /// binaries calls it at scrape time, so any replica scraped tells the whole queue.
    pub async fn record_queue_gauges(&self) {
        match self.depth_and_oldest_age().await {
            Ok((depth, age)) => {
                for (state, jobs) in [
                    ("waiting", depth.waiting),
                    ("in_flight", depth.in_flight),
                    ("dead", depth.dead),
                ] {
                    metrics::gauge!(QUEUE_JOBS_GAUGE, "state" => state).set(jobs as f64);
                }
                metrics::gauge!(OLDEST_JOB_AGE_GAUGE).set(age.as_secs_f64());
            }
            Err(err) => tracing::warn!(error = %err, "could not read the queue depth"),
        }
    }
}

/// Completion jobs by state, read at scrape time.
pub const QUEUE_JOBS_GAUGE: &str = "queue_jobs";
/// How long the oldest waiting job has waited: what to scale workers on (README, "Scaling
/// workers").
pub const OLDEST_JOB_AGE_GAUGE: &str = "aichat_queue_oldest_job_age_seconds";

/// Describes the queue gauges and registers them at zero, so an idle process lists them.
pub fn describe_queue_gauges() {
    metrics::describe_gauge!(
        QUEUE_JOBS_GAUGE,
        "Completion jobs in the queue, by state (waiting, in_flight, dead), read at scrape time"
    );
    metrics::describe_gauge!(
        OLDEST_JOB_AGE_GAUGE,
        metrics::Unit::Seconds,
        "Time the oldest completion job waiting to be taken by a worker has waited (0 when none waits), by the Redis server's clock, read at scrape time"
    );
    for state in ["waiting", "in_flight", "dead"] {
        metrics::gauge!(QUEUE_JOBS_GAUGE, "state" => state).increment(0.0);
    }
    metrics::gauge!(OLDEST_JOB_AGE_GAUGE).increment(0.0);
}

/// Forgets up to ARGV[1] finished jobs: their id in the done set, their arguments and their
/// metadata (apalis-redis keeps them forever; its own `vacuum` reads the whole data hash). Then
/// the de-duplication keys of each one's message, once every job of that message is finished:
/// the chain (`JobQueue::next_job_key`) is walked from the message's first key (the job's own
/// key without its `:rescue:{task}` or `:redrive:{task}` suffix), at most ARGV[2] links, and
/// its keys are deleted when it ends (no next key) and every job on it is finished (its data
/// gone, or in the done set). A chain with a job waiting, running or dead keeps its keys, so a
/// sweep or a staff re-drive finds it; a chain whose last job is done is what a new push starts
/// afresh from the first key, as for a message that never had a job.
/// KEYS: done set, data hash, metadata prefix, de-duplication key prefix.
const TRIM_DONE_SCRIPT: &str = r#"
local ids = redis.call('spop', KEYS[1], ARGV[1])
local keys = {}
for i, id in ipairs(ids) do
  keys[i] = redis.call('hget', KEYS[3] .. ':' .. id, 'idempotency_key')
  redis.call('hdel', KEYS[2], id)
  redis.call('del', KEYS[3] .. ':' .. id)
end
local function finished(task)
  return redis.call('hexists', KEYS[2], task) == 0 or redis.call('sismember', KEYS[1], task) == 1
end
local function key(name)
  return KEYS[4] .. ':' .. name
end
for i = 1, #ids do
  local own = keys[i]
  if own and #own > 0 then
    local first = string.match(own, '^(.*):rescue:[^:]*$') or string.match(own, '^(.*):redrive:[^:]*$') or own
    local chain, name, ended = {}, first, false
    for _ = 1, tonumber(ARGV[2]) do
      local task = redis.call('get', key(name))
      if not task then
        ended = true
        break
      end
      if not finished(task) then
        break
      end
      table.insert(chain, key(name))
      local redrive = first .. ':redrive:' .. task
      if redis.call('exists', key(redrive)) == 1 then
        name = redrive
      else
        name = first .. ':rescue:' .. task
      end
    end
    if ended and #chain > 0 then
      redis.call('del', unpack(chain))
    end
  end
end
return #ids
"#;

impl JobQueue {
    /// Removes the data of at most `limit` finished jobs, and the de-duplication keys of their
    /// messages whose jobs are all finished (`TRIM_DONE_SCRIPT`); returns how many jobs it
    /// removed. Nothing reads a finished job's data again: its message is answered, or failed
    /// for good until a user's retry, which pushes a new job.
    pub async fn trim_done(&self, limit: usize) -> Result<u64> {
        let mut conn = self.conn.clone();
        let removed: u64 = redis::Script::new(TRIM_DONE_SCRIPT)
            .key(self.config.done_jobs_set())
            .key(self.config.job_data_hash())
            .key(self.config.job_meta_hash())
            .key(self.config.idempotency_key_set())
            .arg(limit)
            .arg(MAX_GENERATIONS)
            .invoke_async(&mut conn)
            .await?;
        Ok(removed)
    }
}

/// A completion job the worker gave up on (it sits in the queue's dead set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadJob {
    pub task_id: String,
    pub message_id: i64,
    pub ai_chat_id: i64,
    pub attempts: i64,
}

/// A dead job as listed, from its stored arguments and attempts; `None` when the arguments are
/// gone or unreadable.
fn dead_job_of(task_id: String, args: Option<&[u8]>, attempts: Option<i64>) -> Option<DeadJob> {
    let job = serde_json::from_slice::<CompletionJob>(args?).ok()?;
    Some(DeadJob {
        task_id,
        message_id: job.message_id,
        ai_chat_id: job.ai_chat_id,
        attempts: attempts.unwrap_or(0),
    })
}

impl JobQueue {
    /// Dead jobs, at most `limit`, newest task id (ULIDs sort by time) first: the set's members,
    /// then the listed jobs' arguments in one round trip and their attempts in another.
    pub async fn dead_jobs(&self, limit: usize) -> Result<Vec<DeadJob>> {
        let mut conn = self.conn.clone();
        let mut ids: Vec<String> = conn.smembers(self.config.dead_jobs_set()).await?;
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids.truncate(limit);
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let args: Vec<Option<Vec<u8>>> = conn.hmget(self.config.job_data_hash(), &ids).await?;
        let mut pipe = redis::pipe();
        for task_id in &ids {
            pipe.hget(self.meta_key(task_id), "attempts");
        }
        let attempts: Vec<Option<i64>> = pipe.query_async(&mut conn).await?;
        let mut jobs = Vec::with_capacity(ids.len());
        for ((task_id, args), attempts) in ids.into_iter().zip(args).zip(attempts) {
            if let Some(job) = dead_job_of(task_id, args.as_deref(), attempts) {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    /// One dead job, if `task_id` is in the dead set and its arguments are readable.
    pub async fn dead_job(&self, task_id: &str) -> Result<Option<DeadJob>> {
        let mut conn = self.conn.clone();
        let dead: bool = conn.sismember(self.config.dead_jobs_set(), task_id).await?;
        if !dead {
            return Ok(None);
        }
        let args: Option<Vec<u8>> = conn.hget(self.config.job_data_hash(), task_id).await?;
        let attempts: Option<i64> = conn.hget(self.meta_key(task_id), "attempts").await?;
        Ok(dead_job_of(task_id.to_owned(), args.as_deref(), attempts))
    }

    /// The stored arguments of a job.
    pub async fn job_args(&self, task_id: &str) -> Result<Option<CompletionJob>> {
        let mut conn = self.conn.clone();
        let args: Option<Vec<u8>> = conn.hget(self.config.job_data_hash(), task_id).await?;
        Ok(args.and_then(|a| serde_json::from_slice(&a).ok()))
    }

    /// The hash of a job's metadata (its attempts, status, ...), as apalis-redis names it.
    fn meta_key(&self, task_id: &str) -> String {
        format!("{}:{task_id}", self.config.job_meta_hash())
    }

    /// Forgets a dead job (after it was re-driven or its message is gone).
    pub async fn remove_dead_job(&self, task_id: &str) -> Result<()> {
        self.remove_dead_jobs(&[task_id]).await
    }

    /// Forgets dead jobs, in one round trip.
    pub async fn remove_dead_jobs(&self, task_ids: &[&str]) -> Result<()> {
        if task_ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .srem(self.config.dead_jobs_set(), task_ids)
            .hdel(self.config.job_data_hash(), task_ids);
        for task_id in task_ids {
            pipe.del(self.meta_key(task_id));
        }
        let mut conn = self.conn.clone();
        pipe.exec_async(&mut conn).await?;
        Ok(())
    }
}
