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
        let url =
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let conn = aichat_shared::redis_conn::connect(&url)
            .await
            .expect("connect to redis");
        Env {
            ns: format!("aichat_wtest_{}", uuid::Uuid::new_v4().simple()),
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

fn waits(admission: &Admission) -> bool {
    matches!(admission, Admission::Wait(d) if *d > Duration::ZERO && *d <= Duration::from_millis(1000))
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
    let second = limiter
        .try_acquire("m", 60, "second")
        .await
        .expect("script");
    assert!(waits(&second), "{second:?}");
    // The first call really used 30 tokens: now 60 more fit.
    limiter.settle(&first, 30).await;
    let third = limiter.try_acquire("m", 60, "third").await.expect("script");
    assert_eq!(third, Admission::Granted);
    // Other models have their own budget.
    let other = limiter.try_acquire("other", 90, "x").await.expect("script");
    assert_eq!(other, Admission::Granted);

    env.cleanup().await;
}

#[tokio::test]
async fn a_request_larger_than_the_budget_goes_alone() {
    let env = Env::start().await;
    let limiter = env.limiter(0, 100);
    assert_eq!(
        limiter.try_acquire("m", 500, "big").await.expect("script"),
        Admission::Granted
    );
    let next = limiter.try_acquire("m", 1, "small").await.expect("script");
    assert!(waits(&next), "{next:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn the_request_budget_admits_that_many_per_window() {
    let env = Env::start().await;
    let limiter = env.limiter(2, 0);
    for id in ["a", "b"] {
        assert_eq!(
            limiter.try_acquire("m", 1, id).await.expect("script"),
            Admission::Granted
        );
    }
    let third = limiter.try_acquire("m", 1, "c").await.expect("script");
    assert!(waits(&third), "{third:?}");
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
