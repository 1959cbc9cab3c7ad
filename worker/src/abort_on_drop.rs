//! A task that lives as long as its handle: what runs beside the worker's jobs for them (its
//! pub/sub subscription, the check for recorded stop requests) ends when the handle is dropped.
use std::future::Future;

use tokio::task::JoinHandle;

/// Aborts its task when dropped.
pub struct AbortOnDrop(JoinHandle<()>);

impl AbortOnDrop {
    pub fn spawn(task: impl Future<Output = ()> + Send + 'static) -> Self {
        AbortOnDrop(tokio::spawn(task))
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
