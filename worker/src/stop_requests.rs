//! Stop requests reaching the job that answers the message, in whichever worker process it
//! runs. The API records the request in the database (`db::stops::request_stop`) and then
//! publishes the message id on the namespace's stop channel; every worker process listens on
//! it (`subscription.rs`) and tells its job for that message, if it runs one.
//!
//! Nothing is missed between the two: a job registers its message here *before* it takes the
//! message (`queued` → `answering`), so a request that finds the message `answering` is
//! published after the job listens; a job that takes over a message whose stop was requested
//! earlier reads `stop_requested` when it takes it; and a request published while this
//! process's pub/sub connection was down is found in the database when the connection has
//! subscribed again (every running job's message is checked then), and every few seconds
//! (a publish that failed, a connection dropped silently). Those checks run on a task of
//! their own ([`keep_checking`]), so a slow database never holds up the subscription.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, watch};

use aichat_shared::db;
use aichat_shared::lock::lock;

use crate::abort_on_drop::AbortOnDrop;

/// The messages this process's jobs are answering, each with the switch that stops them.
#[derive(Default)]
pub struct StopRequests {
    running: Mutex<HashMap<i64, Running>>,
    /// Asks the checking task ([`keep_checking`]) to look in the database now.
    check_now: Arc<Notify>,
}

struct Running {
    stop: watch::Sender<bool>,
    /// Runs of the message's job in this process (a duplicate job can run beside the first).
    runs: usize,
}

/// Registers one run's message until dropped; [`Listening::receiver`] turns true at a stop
/// request.
pub struct Listening {
    requests: Arc<StopRequests>,
    message_id: i64,
    receiver: watch::Receiver<bool>,
}

impl Listening {
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.receiver.clone()
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let mut running = lock(&self.requests.running);
        if let Some(entry) = running.get_mut(&self.message_id) {
            entry.runs -= 1;
            if entry.runs == 0 {
                running.remove(&self.message_id);
            }
        }
    }
}

impl StopRequests {
    pub fn new() -> Arc<StopRequests> {
        Arc::new(StopRequests::default())
    }

    /// Starts listening for stop requests of `message_id`.
    pub fn listen(self: &Arc<Self>, message_id: i64) -> Listening {
        let mut running = lock(&self.running);
        let entry = running.entry(message_id).or_insert_with(|| Running {
            stop: watch::channel(false).0,
            runs: 0,
        });
        entry.runs += 1;
        Listening {
            requests: self.clone(),
            message_id,
            receiver: entry.stop.subscribe(),
        }
    }

    /// Stops the runs of `message_id` in this process; false when none runs here.
    pub fn stop(&self, message_id: i64) -> bool {
        match lock(&self.running).get(&message_id) {
            Some(entry) => {
                entry.stop.send_replace(true);
                true
            }
            None => false,
        }
    }

    fn running_messages(&self) -> Vec<i64> {
        lock(&self.running).keys().copied().collect()
    }

    /// Has the checking task look for recorded stop requests now, without waiting for it: the
    /// stop channel has just been subscribed (again), and what it carried while it was not
    /// reached nobody.
    pub fn check_soon(&self) {
        self.check_now.notify_one();
    }

    /// Stops the runs whose message has a recorded stop request: what the pub/sub channel may
    /// have carried while this process was not subscribed.
    async fn check_recorded(&self, db: &PgPool) {
        let running = self.running_messages();
        if running.is_empty() {
            return;
        }
        match db::stops::stop_requested(db, &running).await {
            Ok(ids) => {
                for id in ids {
                    self.stop(id);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not check the running messages for stop requests")
            }
        }
    }
}

/// How often the running messages are checked for a recorded stop request besides the
/// channel: a request whose publish failed, or that a connection dropped without a word
/// carried, still stops its run within this.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Starts the task that checks `requests`' running messages for recorded stop requests, every
/// [`CHECK_EVERY`] and at each [`StopRequests::check_soon`]; it ends when the returned handle
/// is dropped or when the registry is.
pub fn keep_checking(requests: &Arc<StopRequests>, db: PgPool) -> AbortOnDrop {
    let registry = Arc::downgrade(requests);
    let check_now = requests.check_now.clone();
    AbortOnDrop::spawn(check_until_gone(registry, check_now, db))
}

async fn check_until_gone(registry: Weak<StopRequests>, check_now: Arc<Notify>, db: PgPool) {
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = check_now.notified() => {}
        }
        let Some(requests) = registry.upgrade() else {
            return;
        };
        requests.check_recorded(&db).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_reaches_every_run_of_the_message_until_the_last_ends() {
        let requests = StopRequests::new();
        let first = requests.listen(7);
        let second = requests.listen(7);
        let other = requests.listen(8);
        assert!(requests.stop(7));
        assert!(*first.receiver().borrow());
        assert!(*second.receiver().borrow());
        assert!(!*other.receiver().borrow());
        drop(first);
        assert!(requests.stop(7));
        drop(second);
        assert!(!requests.stop(7));
        assert_eq!(requests.running_messages(), vec![8]);
    }
}
