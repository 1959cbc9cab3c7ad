//! The worker's tests, one binary (each binary links the whole stack): real PostgreSQL and
//! Redis, the fake model over HTTP, workers started through the library or as the built
//! binary, jobs queued exactly as the API queues them. One module per area.
mod common;

mod backlog;
mod job_keys;
mod kill;
mod lifecycle;
mod prompt;
mod rate_limit;
mod retries;
mod streaming;
mod user_turns;
