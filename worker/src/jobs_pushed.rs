//! Waking the queue consumer when jobs are pushed. A push of completion jobs that finds no job
//! waiting publishes on the namespace's `jobs_pushed` channel in its own script run (`JobQueue`,
//! `vendor/apalis-redis/PATCHED.md`); the worker's pub/sub connection (`subscription.rs`)
//! signals [`JobsPushed`], and the consumer's poll strategy (`monitor.rs`) waits on it beside
//! its `WORKER_POLL_INTERVAL_MS` timer. A worker that found the queue empty takes a new job
//! within a round trip of its push instead of at its next poll.
//!
//! The timer stays, as the fallback: a signal that arrives while a fetch is under way is taken
//! by that fetch (which may have run just before the push), and one published while the
//! subscription is down is lost; either job is taken at the next poll, as without the signal.
//! A worker with a backlog never waits on either: apalis fetches again as soon as it has taken
//! what the last fetch brought (which is why a push behind waiting jobs publishes nothing).
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use futures::task::AtomicWaker;

/// Pushes seen since the consumer last looked, as one flag: any number of pushes between two
/// looks make one item. Clones share the flag; one consumer polls it at a time.
#[derive(Clone, Default)]
pub struct JobsPushed(Arc<Inner>);

#[derive(Default)]
struct Inner {
    pushed: AtomicBool,
    consumer: AtomicWaker,
}

impl JobsPushed {
    /// Jobs were pushed: the consumer's next look yields an item.
    pub fn signal(&self) {
        self.0.pushed.store(true, Ordering::Release);
        self.0.consumer.wake();
    }
}

impl Stream for JobsPushed {
    type Item = ();

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        let inner = &self.0;
        if inner.pushed.swap(false, Ordering::AcqRel) {
            return Poll::Ready(Some(()));
        }
        inner.consumer.register(cx.waker());
        // A signal between the swap and the registration woke nobody: look again.
        if inner.pushed.swap(false, Ordering::AcqRel) {
            return Poll::Ready(Some(()));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use futures::task::noop_waker_ref;

    #[test]
    fn pushes_between_two_looks_make_one_item() {
        let mut pushed = JobsPushed::default();
        let signal = pushed.clone();
        let mut cx = Context::from_waker(noop_waker_ref());
        assert_eq!(pushed.poll_next_unpin(&mut cx), Poll::Pending);
        signal.signal();
        signal.signal();
        assert_eq!(pushed.poll_next_unpin(&mut cx), Poll::Ready(Some(())));
        assert_eq!(pushed.poll_next_unpin(&mut cx), Poll::Pending);
    }
}
