//! The per-instance session cache: logout takes effect at once where it was served, and a
//! session revoked or expired elsewhere is refused within `SESSION_CACHE_SECS`, never later
//! than the session's own expiry.
use crate::common;

use std::time::{Duration, Instant};

use aichat_testkit::PASSWORD;
use common::{TestApp, spawn_app_with_flags};
use reqwest::StatusCode;
use serde_json::json;

/// Polls `GET /api/me/` with `token` until it is refused; the time that took, or a failure
/// once `limit` has passed.
async fn refused_within(app: &TestApp, token: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let status = app.me_status(token).await;
        if status == StatusCode::UNAUTHORIZED {
            return start.elapsed();
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            start.elapsed() < limit,
            "the session was still accepted after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An app whose session cache keeps a session for `secs` seconds.
async fn app_caching_for(secs: u64) -> TestApp {
    spawn_app_with_flags(&["--session-cache-secs", &secs.to_string()]).await
}

/// Logs `token` out through `app`, which then refuses it at once.
async fn log_out(app: &TestApp, token: &str) {
    let (status, _) = app.post("/api/logout/", token, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.get("/api/me/", token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, json!({"error": "Authentication required"}));
}

#[tokio::test]
async fn a_logged_out_token_is_refused_at_once_on_the_same_instance() {
    let app = app_caching_for(60).await;
    let alice = app.user("alice").await;
    let second = app.login("alice", PASSWORD).await.1["token"]
        .as_str()
        .unwrap()
        .to_owned();
    // Both cached now.
    assert_eq!(app.me_status(&alice.token).await, StatusCode::OK);
    assert_eq!(app.me_status(&second).await, StatusCode::OK);
    // The cache is in use: a session deleted behind the instance's back is still accepted
    // (the documented bound of `SESSION_CACHE_SECS`) ...
    sqlx::query("delete from sessions where token_hash = $1")
        .bind(aichat_api::auth::hash_token(&second))
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(app.me_status(&second).await, StatusCode::OK);
    // ... but a logout through the instance is not.
    log_out(&app, &alice.token).await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_session_revoked_on_another_instance_is_refused_within_the_cache_ttl() {
    let app = app_caching_for(2).await;
    let other = app.another_instance(&["--session-cache-secs", "2"]).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    // Both sessions are now in `other`'s cache.
    assert_eq!(other.me_status(&alice.token).await, StatusCode::OK);
    assert_eq!(other.me_status(&bob.token).await, StatusCode::OK);

    // Logged out through the first instance ...
    log_out(&app, &alice.token).await;
    // ... and deleted outright: both are refused by the other one within its TTL (plus slack
    // for a slow machine), not at the end of the session's 14 days.
    app.delete_sessions(bob.id).await;
    let limit = Duration::from_secs(2 + 5);
    refused_within(&other, &alice.token, limit).await;
    refused_within(&other, &bob.token, limit).await;
    other.cleanup().await;
}

#[tokio::test]
async fn a_cached_session_is_never_accepted_past_its_expiry() {
    // A TTL far longer than the session has left: the session's expiry must win.
    let app = app_caching_for(600).await;
    let alice = app.user("alice").await;
    app.expire_sessions_in(alice.id, 1).await;
    assert_eq!(app.me_status(&alice.token).await, StatusCode::OK);
    let took = refused_within(&app, &alice.token, Duration::from_secs(30)).await;
    assert!(took < Duration::from_secs(30), "{took:?}");
    app.cleanup().await;
}

#[tokio::test]
async fn with_the_cache_off_a_deleted_session_is_refused_at_once() {
    let app = app_caching_for(0).await;
    let alice = app.user("alice").await;
    assert_eq!(app.me_status(&alice.token).await, StatusCode::OK);
    app.delete_sessions(alice.id).await;
    assert_eq!(app.me_status(&alice.token).await, StatusCode::UNAUTHORIZED);
    app.cleanup().await;
}
