//! The fault suite stands on the test kit (`testkit/`): a fresh database and Redis namespace
//! per test, the real API in process, workers in process or as real processes (to SIGKILL /
//! SIGTERM them), the fake model over real HTTP, a private `redis-server` to stop and restart,
//! and the two checks every fault test ends with: `Env::audit` (every user message answered
//! exactly once, from the database) and `EventCounter` (every reply announced at most once,
//! from pub/sub). This crate adds the tests, the worker binary they signal
//! (`src/bin/faults-worker.rs`) and what more than one area of them needs: waiting for the
//! queue to settle (`settled`), PostgreSQL's deadlock count (`deadlocks`) and a reply slow
//! enough to interrupt mid-stream (`streaming`).
pub mod deadlocks;
pub mod settled;
pub mod streaming;

pub use aichat_testkit::*;
pub use deadlocks::{deadlocks_in, maintenance, stop_and_count_deadlocks};
pub use settled::queue_settled;
pub use streaming::{FLUSH_AT_ONCE, slow_long_reply};
