//! Everything the API and the worker share: settings, domain types, database access,
//! job and event types, Redis naming and telemetry.
pub mod announce;
pub mod backoff;
pub mod batch;
pub mod budget;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod events;
pub mod jobs;
pub mod keys;
pub mod lock;
pub mod models;
pub mod partial;
pub mod redis_conn;
pub mod signals;
pub mod telemetry;

pub use error::Error;
