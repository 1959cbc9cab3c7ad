//! The shared crate's tests against a real PostgreSQL: the SQL of `shared/src/db/` and the
//! conflict retry. One binary, a module per area.
mod planning;
mod retry;
mod saving;
mod versions;
