//! When a test's completion queue has settled: nothing left to run, and every job that ran
//! acknowledged done exactly once.
use std::time::Duration;

use aichat_testkit::{Env, QueueSnapshot, eventually};

/// Waits until the queue holds nothing waiting, scheduled or in any worker's hands and `ended`
/// jobs have ended; insists that all of them were acknowledged done (none dead, none run twice,
/// no job more).
pub async fn queue_settled(env: &Env, ended: u64) -> QueueSnapshot {
    let snapshot = eventually(Duration::from_secs(30), "the queue settled", || async {
        let s = env.queue_snapshot().await;
        let idle =
            s.waiting == 0 && s.scheduled == 0 && s.in_flight.iter().all(|(_, jobs)| *jobs == 0);
        (idle && s.done + s.dead >= ended).then_some(s)
    })
    .await;
    assert_eq!(
        (snapshot.done, snapshot.dead),
        (ended, 0),
        "every job acknowledged done, none dead or run twice, no job more: {snapshot:?}"
    );
    snapshot
}
