//! Gathering work into batches: the API's sends and the worker's replies are each written by a
//! few writers that share one queue and take whatever is waiting in it.
use tokio::sync::{Mutex, mpsc};

/// The next batch for a writer: waits for one item, then takes those already waiting behind
/// it, up to `max` (at least one). `None` once every sender is gone and the queue is empty.
/// Writers sharing `rx` take turns; the lock is held only while gathering, not while writing.
pub async fn next_batch<T>(rx: &Mutex<mpsc::Receiver<T>>, max: usize) -> Option<Vec<T>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let max = max.max(1);
    let mut batch = Vec::with_capacity(max.min(rx.len() + 1));
    batch.push(first);
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some(batch)
}
