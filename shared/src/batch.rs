//! Gathering work into batches: the API's sends and the worker's replies are each written by a
//! few writers that share one queue and take whatever is waiting in it. A lone item on an idle
//! process is written at once: batching adds no wait, it only gathers what is already waiting.
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::{Error, Result};

/// The way in to a set of writers: [`Batcher::submit`] hands an item over and waits for its
/// answer. Cloned into every caller; the writers stop once every clone is dropped.
pub struct Batcher<T, A> {
    tx: mpsc::Sender<(T, oneshot::Sender<A>)>,
}

impl<T, A> Clone for Batcher<T, A> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static, A: Send + 'static> Batcher<T, A> {
    /// Starts `writers` writers; each takes up to `max_batch` of the items waiting (at most
    /// `queue` wait before callers wait to be taken in) and gives them to `write`, which
    /// answers each item, in order.
    pub fn start<W, F>(writers: usize, max_batch: usize, queue: usize, write: W) -> Self
    where
        W: Fn(Vec<T>) -> F + Send + Sync + 'static,
        F: Future<Output = Vec<A>> + Send,
    {
        let (tx, rx) = mpsc::channel::<(T, oneshot::Sender<A>)>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let write = Arc::new(write);
        for _ in 0..writers.max(1) {
            let (rx, write) = (rx.clone(), write.clone());
            tokio::spawn(async move {
                while let Some(batch) = next_batch(&rx, max_batch).await {
                    let (items, answers): (Vec<T>, Vec<oneshot::Sender<A>>) =
                        batch.into_iter().unzip();
                    for (answer, value) in answers.into_iter().zip(write(items).await) {
                        let _ = answer.send(value);
                    }
                }
            });
        }
        Batcher { tx }
    }

    /// Hands `item` to the writers and waits for its answer; `None` when the writers are gone
    /// (the process is stopping) or answered nothing for it.
    pub async fn submit(&self, item: T) -> Option<A> {
        let (answer, answered) = oneshot::channel();
        self.tx.send((item, answer)).await.ok()?;
        answered.await.ok()
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, Result<R, Arc<Error>>> {
    /// [`Batcher::submit`] for writers whose answers share the batch's error
    /// ([`each_answer`]): writers that are gone answer as an unreachable database does, so the
    /// caller retries rather than losing the item.
    pub async fn answer(&self, item: T) -> Result<R, Arc<Error>> {
        self.submit(item)
            .await
            .unwrap_or_else(|| Err(Arc::new(writers_gone())))
    }
}

/// The next batch for a writer: waits for one item, then takes those already waiting behind
/// it, up to `max` (at least one). `None` once every sender is gone and the queue is empty.
/// Writers sharing `rx` take turns; the lock is held only while gathering, not while writing.
async fn next_batch<T>(rx: &Mutex<mpsc::Receiver<T>>, max: usize) -> Option<Vec<T>> {
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

/// Writes `items` with `all` (one statement for the batch); if PostgreSQL refused that
/// statement and there are several items, writes each with `one`, so an item that cannot be
/// written never fails its neighbours. Only a refused statement was rolled back: after any
/// other failure the batch may be written, and writing it item by item would write it twice,
/// so that failure is the whole batch's (`Err`). `what` names the batch in the log.
pub async fn all_or_each<'a, T, R, All, AllFut, One, OneFut>(
    what: &str,
    items: &'a [T],
    all: All,
    mut one: One,
) -> Result<Vec<Result<R>>>
where
    All: FnOnce() -> AllFut,
    AllFut: Future<Output = Result<Vec<R>>>,
    One: FnMut(&'a T) -> OneFut,
    OneFut: Future<Output = Result<R>>,
{
    let err = match all().await {
        Ok(written) => return Ok(written.into_iter().map(Ok).collect()),
        Err(err) => err,
    };
    if items.len() == 1 || !err.is_refused_by_database() {
        return Err(err);
    }
    tracing::warn!(error = %err, items = items.len(), "a batch of {what} was refused; writing them one by one");
    let mut written = Vec::with_capacity(items.len());
    for item in items {
        written.push(one(item).await);
    }
    Ok(written)
}

/// The answers of [`all_or_each`] for `items` items, each shareable by the caller that waits
/// for it: an item's own result, or the whole batch's error for every item.
pub fn each_answer<R>(written: Result<Vec<Result<R>>>, items: usize) -> Vec<Result<R, Arc<Error>>> {
    match written {
        Ok(written) => written
            .into_iter()
            .map(|one| one.map_err(Arc::new))
            .collect(),
        Err(err) => {
            let err = Arc::new(err);
            (0..items).map(|_| Err(err.clone())).collect()
        }
    }
}

/// What an item hears when its writers are gone: the database could not be reached, so the
/// caller retries (or answers 503) rather than losing it.
fn writers_gone() -> Error {
    Error::Database(sqlx::Error::PoolClosed)
}
