//! What every handler can reach.
use std::sync::Arc;

use aichat_shared::jobs::JobQueue;
use aichat_shared::keys::Namespace;
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use crate::settings::Settings;

#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub queue: JobQueue,
    pub ns: Namespace,
    pub settings: Arc<Settings>,
}
