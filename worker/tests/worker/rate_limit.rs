//! The shared rate limit's Redis script, driven directly: request and token budgets,
//! settling reservations to real usage, oversized requests, deadlines and cancellation.
use std::time::Duration;

use aichat_shared::keys::Namespace;
use aichat_worker::rate_limit::{Admission, Limits, RateLimitError, RateLimiter};
use redis::AsyncCommands;
use tokio::sync::watch;
use tokio::time::Instant;

struct Env {
    ns: String,
    conn: redis::aio::ConnectionManager,
}

impl Env {
    async fn start() -> Env {
        let conn = aichat_shared::redis_conn::connect(&aichat_testkit::redis_url())
            .await
            .expect("connect to redis");
        Env {
            ns: aichat_testkit::unique_name("aichat_wtest"),
            conn,
        }
    }

    fn limiter(&self, requests: u64, tokens: u64) -> RateLimiter {
        RateLimiter::new(
            self.conn.clone(),
            Namespace::new(self.ns.clone()),
            Limits {
                requests,
                tokens,
                window: Duration::from_millis(1000),
                margin: Duration::ZERO,
            },
        )
    }

    async fn cleanup(self) {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = conn
            .keys(format!("{}:*", self.ns))
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = conn.del(keys).await;
        }
    }
}

/// Asks `limiter` without waiting for `tokens` of model `m` as request `id`: granted at once.
async fn assert_granted(limiter: &RateLimiter, tokens: u64, id: &str) {
    let admission = limiter.try_acquire("m", tokens, id).await.expect("script");
    assert_eq!(admission, Admission::Granted, "{id}");
}

/// Asks `limiter` without waiting for `tokens` of model `m` as request `id`: told to wait,
/// for no longer than the window.
async fn assert_told_to_wait(limiter: &RateLimiter, tokens: u64, id: &str) {
    let admission = limiter.try_acquire("m", tokens, id).await.expect("script");
    assert!(
        matches!(admission, Admission::Wait(d) if d > Duration::ZERO && d <= Duration::from_millis(1000)),
        "{id}: {admission:?}"
    );
}

#[tokio::test]
async fn the_token_budget_counts_reservations_and_settles_them_to_real_usage() {
    let env = Env::start().await;
    let limiter = env.limiter(0, 100);
    let (_stop, mut cancel) = watch::channel(false);
    let soon = Instant::now() + Duration::from_secs(5);

    let (first, waited) = limiter
        .acquire("m", 60, soon, &mut cancel)
        .await
        .expect("room for 60");
    assert_eq!(waited, None);
    assert_told_to_wait(&limiter, 60, "second").await;
    // The first call really used 30 tokens: now 60 more fit.
    limiter.settle(&first, 30).await;
    assert_granted(&limiter, 60, "third").await;
    // Other models have their own budget.
    let other = limiter.try_acquire("other", 90, "x").await.expect("script");
    assert_eq!(other, Admission::Granted);

    env.cleanup().await;
}

#[tokio::test]
async fn a_request_larger_than_the_budget_goes_alone() {
    let env = Env::start().await;
    let limiter = env.limiter(0, 100);
    assert_granted(&limiter, 500, "big").await;
    assert_told_to_wait(&limiter, 1, "small").await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_request_budget_admits_that_many_per_window() {
    let env = Env::start().await;
    let limiter = env.limiter(2, 0);
    for id in ["a", "b"] {
        assert_granted(&limiter, 1, id).await;
    }
    assert_told_to_wait(&limiter, 1, "c").await;
    env.cleanup().await;
}

#[tokio::test]
async fn waiting_ends_at_the_deadline_or_on_shutdown() {
    let env = Env::start().await;
    let limiter = env.limiter(1, 0);
    let (stop, mut cancel) = watch::channel(false);
    let later = Instant::now() + Duration::from_secs(30);
    limiter
        .acquire("m", 1, later, &mut cancel)
        .await
        .expect("the first is free");

    let too_soon = Instant::now() + Duration::from_millis(100);
    let late = limiter.acquire("m", 1, too_soon, &mut cancel).await;
    assert!(
        matches!(late, Err(RateLimitError::DeadlinePassed)),
        "{late:?}"
    );

    stop.send(true).expect("signal");
    let cancelled = limiter.acquire("m", 1, later, &mut cancel).await;
    assert!(
        matches!(cancelled, Err(RateLimitError::Cancelled)),
        "{cancelled:?}"
    );
    env.cleanup().await;
}
