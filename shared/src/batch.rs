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
        let (tx, rx) = queue_of(queue);
        let write = Arc::new(write);
        for _ in 0..writers.max(1) {
            let (rx, write) = (rx.clone(), write.clone());
            tokio::spawn(async move {
                while let Some(batch) = next_batch(&rx, max_batch).await {
                    let (items, answers): (Vec<T>, Vec<oneshot::Sender<A>>) =
                        batch.into_iter().unzip();
                    answer_each(answers, write(items).await);
                }
            });
        }
        Batcher { tx }
    }

    /// [`Batcher::start`] with each batch written in two stages: a writer gives the batch to
    /// `first`, hands what it returns to a task of its own running `then` (which answers each
    /// item, in order) and takes its next batch meanwhile. So a writer's next statement starts
    /// while the batch before it is still being finished, and the batches of one writer go
    /// through `then` in the order they went through `first`. At most one finished `first`
    /// waits for `then`: a slow `then` holds its writer back rather than piling batches up.
    pub fn start_staged<W, F, M, S, G>(
        writers: usize,
        max_batch: usize,
        queue: usize,
        first: W,
        then: S,
    ) -> Self
    where
        W: Fn(Vec<T>) -> F + Send + Sync + 'static,
        F: Future<Output = M> + Send,
        M: Send + 'static,
        S: Fn(M) -> G + Send + Sync + 'static,
        G: Future<Output = Vec<A>> + Send,
    {
        let (tx, rx) = queue_of(queue);
        let (first, then) = (Arc::new(first), Arc::new(then));
        for _ in 0..writers.max(1) {
            let (rx, first, then) = (rx.clone(), first.clone(), then.clone());
            let (staged, mut to_finish) = mpsc::channel::<(M, Vec<oneshot::Sender<A>>)>(1);
            tokio::spawn(async move {
                while let Some((written, answers)) = to_finish.recv().await {
                    answer_each(answers, then(written).await);
                }
            });
            tokio::spawn(async move {
                while let Some(batch) = next_batch(&rx, max_batch).await {
                    let (items, answers): (Vec<T>, Vec<oneshot::Sender<A>>) =
                        batch.into_iter().unzip();
                    let written = first(items).await;
                    if staged.send((written, answers)).await.is_err() {
                        break;
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

/// The way in to the writers of a batcher taking `queue` items at most, and their shared end.
type Queue<T, A> = (
    mpsc::Sender<(T, oneshot::Sender<A>)>,
    Arc<Mutex<mpsc::Receiver<(T, oneshot::Sender<A>)>>>,
);

fn queue_of<T, A>(queue: usize) -> Queue<T, A> {
    let (tx, rx) = mpsc::channel(queue.max(1));
    (tx, Arc::new(Mutex::new(rx)))
}

/// Gives each waiting caller its answer, in order; a caller that stopped waiting is skipped.
fn answer_each<A>(answers: Vec<oneshot::Sender<A>>, values: Vec<A>) {
    for (answer, value) in answers.into_iter().zip(values) {
        let _ = answer.send(value);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::{Mutex, mpsc};

    use super::Batcher;

    /// How long a step that is not blocked may take before the test calls it blocked.
    const BOUND: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_writer_takes_its_next_batch_while_the_last_one_is_finished_and_answers_in_order() {
        // `first` reports each batch it takes; `then` holds the first batch until released.
        let (taken_tx, mut taken) = mpsc::unbounded_channel::<Vec<u32>>();
        let (release_tx, release) = mpsc::unbounded_channel::<()>();
        let release = std::sync::Arc::new(Mutex::new(release));
        let batcher: Batcher<u32, u32> = Batcher::start_staged(
            1,
            1,
            16,
            move |items: Vec<u32>| {
                let taken_tx = taken_tx.clone();
                async move {
                    let _ = taken_tx.send(items.clone());
                    items
                }
            },
            move |items: Vec<u32>| {
                let release = release.clone();
                async move {
                    if items == [1] {
                        release.lock().await.recv().await;
                    }
                    items.into_iter().map(|i| i * 10).collect()
                }
            },
        );
        let one = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(1).await }
        });
        let first = tokio::time::timeout(BOUND, taken.recv()).await;
        assert_eq!(first.ok().flatten(), Some(vec![1]));
        let two = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(2).await }
        });
        // Batch 1 is held in its second stage; the writer has taken batch 2 all the same.
        let second = tokio::time::timeout(BOUND, taken.recv()).await;
        assert_eq!(second.ok().flatten(), Some(vec![2]));
        assert!(!one.is_finished() && !two.is_finished());
        let _ = release_tx.send(());
        let answers = tokio::time::timeout(BOUND, async { (one.await, two.await) }).await;
        match answers {
            Ok((Ok(one), Ok(two))) => assert_eq!((one, two), (Some(10), Some(20))),
            other => panic!("answers: {other:?}"),
        }
    }
}
