//! Stopping without losing or doubling work (SIGTERM, Ctrl-C, or the embedding program).
//!
//! apalis 1.0 stops a worker's poll loop at the signal, but from then on it neither
//! acknowledges the jobs that finish nor heart-beats, and its stream only ends at the monitor's
//! terminator. Left alone, every job of a stopping worker would stay in its in-flight set until
//! the orphan window passed and another worker ran it again. So the worker does its own:
//! 1. at the signal, no new job starts (apalis) and jobs that have not reached the model yet
//!    give up (`JobContext::shutdown`);
//! 2. while running jobs finish, this process keeps its worker registration alive, so no other
//!    worker takes them over ([`Stopping::keep_alive`]);
//! 3. the stop ends as soon as no job runs, or when the grace period is over: then the jobs
//!    still waiting on the model are abandoned ([`Stopping::drain`]);
//! 4. the worker's in-flight set is settled in one script ([`Stopping::settle`]): jobs that
//!    finished are acknowledged as apalis would have (done, or dead), every other one goes
//!    straight back to the queue for another worker, and the worker leaves the workers set.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aichat_shared::lock::lock;
use redis::aio::ConnectionManager;
use tokio::sync::watch;

/// How a job that ran during the stop ended, i.e. what its acknowledgement must say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Finished (answered, or nothing to do): the done set.
    Done,
    /// Given up for good: the dead set, re-drivable by staff.
    Dead,
    /// Must run again: back to the queue.
    Retry,
}

/// What the stop did with the worker's jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// Jobs that finished during the stop and were acknowledged here.
    pub acknowledged: u64,
    /// Jobs put back in the queue (abandoned, not started, or to be retried).
    pub handed_back: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// True when every running job ended within the grace period.
    pub in_time: bool,
    /// Jobs still running when the grace period ended.
    pub abandoned: usize,
}

/// Shared by the worker and its jobs: running jobs, what finished after the signal, and the
/// names this process registered under.
pub struct Stopping {
    /// Running jobs by the name of the consumer that took them (a consumer that failed and
    /// was started again under a new name leaves its jobs running under the old one); a name
    /// with none is not in the map.
    running: watch::Sender<HashMap<String, usize>>,
    abandon: watch::Sender<bool>,
    begun: AtomicBool,
    finished: Mutex<HashMap<String, Vec<(String, Ack)>>>,
    names: Mutex<Vec<String>>,
}

/// Counts one running job until dropped.
pub struct RunningJob {
    stopping: Arc<Stopping>,
    worker: String,
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        self.stopping.running.send_modify(|running| {
            if let Some(n) = running.get_mut(&self.worker) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    running.remove(&self.worker);
                }
            }
        });
    }
}

impl Stopping {
    pub fn new() -> Arc<Stopping> {
        Arc::new(Stopping {
            running: watch::channel(HashMap::new()).0,
            abandon: watch::channel(false).0,
            begun: AtomicBool::new(false),
            finished: Mutex::new(HashMap::new()),
            names: Mutex::new(Vec::new()),
        })
    }

    /// Counts a job taken by the consumer named `worker` as running, until the guard drops.
    pub fn job_started(self: &Arc<Self>, worker: &str) -> RunningJob {
        self.running
            .send_modify(|running| *running.entry(worker.to_owned()).or_default() += 1);
        RunningJob {
            stopping: self.clone(),
            worker: worker.to_owned(),
        }
    }

    pub fn running(&self) -> usize {
        self.running.borrow().values().sum()
    }

    /// Turns true when the grace period is over: a job still waiting on the model gives up.
    pub fn abandoned(&self) -> watch::Receiver<bool> {
        self.abandon.subscribe()
    }

    /// A worker name this process registered (one per start of the queue consumer).
    pub fn register_name(&self, name: &str) {
        lock(&self.names).push(name.to_owned());
    }

    pub fn current_name(&self) -> Option<String> {
        lock(&self.names).last().cloned()
    }

    /// The names to keep registered: the current consumer's, and every earlier one's that
    /// still has jobs running here.
    fn live_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.running.borrow().keys().cloned().collect();
        if let Some(current) = self.current_name()
            && !names.contains(&current)
        {
            names.push(current);
        }
        names
    }

    /// Marks the start of the stop: from now on finished jobs are remembered for [`settle`].
    ///
    /// [`settle`]: Stopping::settle
    pub fn begin(&self) {
        self.begun.store(true, Ordering::SeqCst);
    }

    pub fn has_begun(&self) -> bool {
        self.begun.load(Ordering::SeqCst)
    }

    /// Remembers how a job ended, when the stop has begun (apalis no longer acknowledges it).
    pub fn record(&self, worker: &str, task_id: String, ack: Ack) {
        if self.has_begun() {
            lock(&self.finished)
                .entry(worker.to_owned())
                .or_default()
                .push((task_id, ack));
        }
    }

    /// Waits until no job runs, or `grace` passes; then abandons what still runs and gives it
    /// a moment to let go.
    pub async fn drain(&self, grace: Duration) -> Drained {
        let mut running = self.running.subscribe();
        if tokio::time::timeout(grace, running.wait_for(HashMap::is_empty))
            .await
            .is_ok()
        {
            return Drained {
                in_time: true,
                abandoned: 0,
            };
        }
        let abandoned = self.running();
        let _ = self.abandon.send(true);
        let _ =
            tokio::time::timeout(Duration::from_secs(2), running.wait_for(HashMap::is_empty)).await;
        Drained {
            in_time: false,
            abandoned,
        }
    }

    /// Refreshes the registrations every `interval` until `done` turns true, so other
    /// workers do not take over jobs this process is still finishing: the current
    /// consumer's, and each earlier consumer's while jobs it took still run here (after a
    /// consumer failed, apalis starts a new one under a new name, and nothing else would keep
    /// the old name alive). A name already gone from the set (taken over, or settled) is not
    /// added back.
    pub async fn keep_alive(
        &self,
        mut conn: ConnectionManager,
        workers_set: String,
        interval: Duration,
        mut done: watch::Receiver<bool>,
    ) {
        loop {
            let names = self.live_names();
            if !names.is_empty() {
                let now = unix_seconds();
                let mut refresh = redis::cmd("ZADD");
                refresh.arg(&workers_set).arg("XX");
                for name in &names {
                    refresh.arg(now).arg(name);
                }
                let refreshed: redis::RedisResult<i64> = refresh.query_async(&mut conn).await;
                if let Err(err) = refreshed {
                    tracing::warn!(error = %err, "could not refresh the worker registration");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = done.wait_for(|d| *d) => return,
            }
        }
    }

    /// Acknowledges what finished during the stop, hands everything else of this process's
    /// in-flight sets back to the queue, and removes its registrations.
    pub async fn settle(
        &self,
        conn: &mut ConnectionManager,
        config: &apalis_redis::Config,
    ) -> redis::RedisResult<Settled> {
        let names = lock(&self.names).clone();
        let finished = std::mem::take(&mut *lock(&self.finished));
        let mut settled = Settled::default();
        for name in names {
            let mut invocation = SETTLE_SCRIPT.prepare_invoke();
            invocation
                .key(format!("{}:{name}", config.inflight_jobs_set()))
                .key(config.workers_set())
                .key(config.active_jobs_list())
                .key(config.done_jobs_set())
                .key(config.dead_jobs_set())
                .key(config.job_meta_hash())
                .key(config.signal_list())
                .arg(&name)
                .arg(unix_seconds());
            for (task_id, ack) in finished.get(&name).into_iter().flatten() {
                let status = match ack {
                    Ack::Done => "Done",
                    Ack::Dead => "Killed",
                    Ack::Retry => "Retry",
                };
                invocation.arg(task_id).arg(status);
            }
            let (acknowledged, handed_back): (u64, u64) = invocation.invoke_async(conn).await?;
            settled.acknowledged += acknowledged;
            settled.handed_back += handed_back;
        }
        Ok(settled)
    }
}

fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// KEYS: in-flight set, workers set, active list, done set, dead set, meta prefix, signal list.
/// ARGV: worker name, now, then pairs of task id and outcome (`Done`, `Killed`, `Retry`).
/// The name's registration goes, with its metadata hash (`{workers set}:metadata:{name}`, which
/// apalis writes at registration and never deletes).
/// Returns {acknowledged, handed back}.
static SETTLE_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local outcome = {}
for i = 3, #ARGV, 2 do outcome[ARGV[i]] = ARGV[i + 1] end
local acknowledged, handed_back = 0, 0
for _, id in ipairs(redis.call('smembers', KEYS[1])) do
  local o = outcome[id]
  if o == 'Done' then
    redis.call('sadd', KEYS[4], id)
    redis.call('hset', KEYS[6] .. ':' .. id, 'status', 'Done', 'done_at', ARGV[2])
    acknowledged = acknowledged + 1
  elseif o == 'Killed' then
    redis.call('sadd', KEYS[5], id)
    redis.call('hset', KEYS[6] .. ':' .. id, 'status', 'Killed', 'done_at', ARGV[2])
    acknowledged = acknowledged + 1
  else
    redis.call('rpush', KEYS[3], id)
    handed_back = handed_back + 1
  end
end
redis.call('del', KEYS[1])
redis.call('zrem', KEYS[2], ARGV[1])
redis.call('del', KEYS[2] .. ':metadata:' .. ARGV[1])
if handed_back > 0 then
  redis.call('del', KEYS[7])
  redis.call('lpush', KEYS[7], 1)
end
return {acknowledged, handed_back}
"#,
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_ends_when_the_last_job_ends() {
        let stopping = Stopping::new();
        let job = stopping.job_started("w");
        let waiter = {
            let stopping = stopping.clone();
            tokio::spawn(async move { stopping.drain(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(job);
        let drained = waiter.await.unwrap();
        assert!(drained.in_time);
        assert!(!*stopping.abandoned().borrow());
    }

    #[tokio::test]
    async fn drain_abandons_jobs_still_running_after_the_grace() {
        let stopping = Stopping::new();
        let job = stopping.job_started("w");
        let mut abandoned = stopping.abandoned();
        let holder = tokio::spawn(async move {
            let _ = abandoned.wait_for(|a| *a).await;
            drop(job);
        });
        let drained = stopping.drain(Duration::from_millis(50)).await;
        assert_eq!(
            drained,
            Drained {
                in_time: false,
                abandoned: 1
            }
        );
        holder.await.unwrap();
        assert_eq!(stopping.running(), 0);
    }

    #[test]
    fn only_jobs_finishing_during_the_stop_are_remembered() {
        let stopping = Stopping::new();
        stopping.record("w", "a".into(), Ack::Done);
        stopping.begin();
        stopping.record("w", "b".into(), Ack::Dead);
        let finished = lock(&stopping.finished);
        assert_eq!(finished["w"], vec![("b".to_owned(), Ack::Dead)]);
    }
}
