//! The fault suite stands on the test kit (`testkit/`): a fresh database and Redis namespace
//! per test, the real API in process, workers in process or as real processes (to SIGKILL /
//! SIGTERM them), the fake model over real HTTP, a private `redis-server` to stop and restart,
//! and the two checks every fault test ends with: `Env::audit` (every user message answered
//! exactly once, from the database) and `EventCounter` (every reply announced at most once,
//! from pub/sub). This crate adds the tests and the worker binary they signal
//! (`src/bin/faults-worker.rs`).
pub use aichat_testkit::*;
