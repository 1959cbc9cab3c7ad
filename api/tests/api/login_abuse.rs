//! Login and registration abuse (SECURITY.md): attempts throttled by client address and by
//! username, shared through Redis; failures backing off per username; password hashing
//! bounded; passwords checked as Django checks them; look-alike usernames folded.
use crate::common;

use std::time::{Duration, Instant};

use aichat_testkit::PASSWORD;
use common::{Replied, Reply, flags, spawn_app, spawn_app_with_flags};
use reqwest::StatusCode;
use serde_json::json;

/// Three login attempts per client address in the window, any number per username.
const ADDRESS_WINDOW: &str = "--login-attempts-per-address 3 --login-attempts-per-username 0";

/// Behind a trusted proxy on loopback: two attempts per forwarded client address, three per
/// username.
const BEHIND_A_PROXY: &str = "--trusted-proxies 127.0.0.1,::1 \
    --login-attempts-per-address 2 --login-attempts-per-username 3";

/// No attempt windows; a username backs off after two failures; metrics read by `SCRAPER`.
const BACKING_OFF: &str = "--login-attempts-per-address 0 --login-attempts-per-username 0 \
    --login-failures-before-backoff 2 --metrics-token abuse-scraper-token-0123";

/// The metrics token of the apps that count failed logins.
const SCRAPER: &str = "abuse-scraper-token-0123";

/// A login attempt, optionally as forwarded by a proxy for `forwarded_for`.
async fn login(
    app: &common::TestApp,
    username: &str,
    password: &str,
    forwarded_for: Option<&str>,
) -> Reply {
    let mut request = app.login_request(username, password);
    if let Some(address) = forwarded_for {
        request = request.header("x-forwarded-for", address);
    }
    request.reply().await
}

/// Refused by a throttle: 429, the one body every refusal has, and a `Retry-After` of 1 s or
/// more.
fn too_many(reply: &Reply) -> bool {
    reply.status == StatusCode::TOO_MANY_REQUESTS
        && reply.json() == json!({"error": "Too many attempts, please try again later"})
        && reply.retry_after().is_some_and(|secs| secs >= 1)
}

#[tokio::test]
async fn logins_past_the_address_window_get_429_alike_for_known_and_unknown_users() {
    let app = spawn_app_with_flags(&flags(ADDRESS_WINDOW)).await;
    app.register("alice").await;
    for _ in 0..3 {
        let answer = login(&app, "alice", "wrong password", None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{answer:?}");
    }
    let known = login(&app, "alice", PASSWORD, None).await;
    let unknown = login(&app, "nobody", PASSWORD, None).await;
    assert!(too_many(&known), "{known:?}");
    assert!(too_many(&unknown), "{unknown:?}");
    assert_eq!(
        known.json(),
        unknown.json(),
        "the same body whether or not the user exists"
    );
    // A client's own X-Forwarded-For is ignored: no proxy is trusted.
    let spoofed = login(&app, "alice", PASSWORD, Some("203.0.113.50")).await;
    assert!(too_many(&spoofed), "{spoofed:?}");
    // Another instance sees the same window (Redis).
    let other = app.another_instance(&flags(ADDRESS_WINDOW)).await;
    assert!(too_many(&login(&other, "alice", PASSWORD, None).await));
    app.cleanup().await;
}

#[tokio::test]
async fn a_username_is_throttled_from_every_address_and_trusted_proxies_name_the_client() {
    let app = spawn_app_with_flags(&flags(BEHIND_A_PROXY)).await;
    app.register("alice").await;
    // Behind the trusted proxy every attempt comes from another client address, so only the
    // username's window counts them.
    for n in 0..3 {
        let address = format!("198.51.100.{n}");
        let answer = login(&app, "alice", "wrong password", Some(&address)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{answer:?}");
    }
    assert!(too_many(
        &login(&app, "alice", PASSWORD, Some("198.51.100.9")).await
    ));
    // The address window is per forwarded client: a fresh one may try another username.
    app.register("bob").await;
    for _ in 0..2 {
        let answer = login(&app, "bob", PASSWORD, Some("198.51.100.20")).await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    }
    assert!(too_many(
        &login(&app, "bob", PASSWORD, Some("198.51.100.20")).await
    ));
    app.cleanup().await;
}

#[tokio::test]
async fn repeated_failures_lock_a_username_for_longer_each_time_until_a_login_succeeds() {
    let app = spawn_app_with_flags(&flags(BACKING_OFF)).await;
    let status = |username: &'static str, password: &'static str| {
        let app = &app;
        async move { login(app, username, password, None).await.status }
    };
    app.register("alice").await;
    let failures_before = failed_logins(&app).await;
    assert_eq!(status("alice", "wrong 1").await, StatusCode::UNAUTHORIZED);
    // The second failure locks the username for 1 s, the third for 2 s.
    assert_eq!(status("alice", "wrong 2").await, StatusCode::UNAUTHORIZED);
    let locked = login(&app, "alice", PASSWORD, None).await;
    assert!(too_many(&locked), "{locked:?}");
    assert_eq!(locked.retry_after(), Some(1));
    let third = until_admitted(&app, "alice", "wrong 3").await;
    assert_eq!(third.status, StatusCode::UNAUTHORIZED);
    let locked = login(&app, "alice", PASSWORD, None).await;
    assert_eq!(locked.retry_after(), Some(2), "{locked:?}");
    // Another username is not affected.
    app.register("bob").await;
    assert_eq!(status("bob", PASSWORD).await, StatusCode::OK);
    // Once the lock is over, a right password logs in and clears the failures: one failure
    // afterwards does not lock again.
    let ok = until_admitted(&app, "alice", PASSWORD).await;
    assert_eq!(ok.status, StatusCode::OK, "{ok:?}");
    assert_eq!(status("alice", "wrong 4").await, StatusCode::UNAUTHORIZED);
    assert_eq!(status("alice", PASSWORD).await, StatusCode::OK);
    // Other tests of this binary share the recorder and may fail logins meanwhile.
    assert!(failed_logins(&app).await - failures_before >= 4.0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_failed_login_is_remembered_for_a_window_until_its_name_is_locked() {
    let app = spawn_app_with_flags(&flags(&format!("{BACKING_OFF} --auth-window-secs 60"))).await;
    let mut redis = app.redis().await;
    let pattern = app.keys.login_failures("*");
    // The milliseconds left to the one failure count of the app's namespace.
    let mut expiry = async || -> i64 {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut redis)
            .await
            .expect("keys");
        assert_eq!(keys.len(), 1, "{keys:?}");
        redis::cmd("PTTL")
            .arg(&keys[0])
            .query_async(&mut redis)
            .await
            .expect("pttl")
    };
    // A made-up name: its failure is kept one window, not a day.
    let first = login(&app, "nobody-at-all", "guess 1", None).await;
    assert_eq!(first.status, StatusCode::UNAUTHORIZED, "{first:?}");
    let ttl = expiry().await;
    assert!(ttl > 0 && ttl <= 60_000, "{ttl} ms");
    // The second failure locks the name: its count now outlives the longest lock by a day.
    let second = login(&app, "nobody-at-all", "guess 2", None).await;
    assert_eq!(second.status, StatusCode::UNAUTHORIZED, "{second:?}");
    let ttl = expiry().await;
    assert!(ttl > 86_400_000, "{ttl} ms");
    let locked = login(&app, "nobody-at-all", "guess 3", None).await;
    assert!(too_many(&locked), "{locked:?}");
    app.cleanup().await;
}

/// `aichat_login_failures_total` as the API reports it (the recorder is shared by every app
/// of this test binary: compare before and after).
async fn failed_logins(app: &common::TestApp) -> f64 {
    app.metrics(SCRAPER)
        .await
        .lines()
        .find_map(|line| {
            line.strip_prefix("aichat_login_failures_total ")?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Retries a login while it is refused with 429 (bounded), answering the first other answer.
async fn until_admitted(app: &common::TestApp, username: &str, password: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = login(app, username, password, None).await;
        if answer.status != StatusCode::TOO_MANY_REQUESTS {
            return answer;
        }
        assert!(Instant::now() < deadline, "still locked: {answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn registrations_past_the_address_window_get_429() {
    let app = spawn_app_with_flags(&["--registrations-per-address", "2"]).await;
    assert_eq!(app.register("alice").await.0, StatusCode::CREATED);
    // A refused registration counts too: the window is what is tried, not what succeeds.
    let (status, _) = app.register_password("bob", "x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = app.register("carol").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(
        body,
        json!({"error": "Too many attempts, please try again later"})
    );
    let (status, _) = app.login("carol", PASSWORD).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "carol was not registered");
    app.cleanup().await;
}

#[tokio::test]
async fn passwords_are_checked_as_djangos_default_validators_check_them() {
    let app = spawn_app().await;
    let cases = [
        ("password1", "This password is too common."),
        ("Qwertyuiop", "This password is too common."),
        ("73620194815", "This password is entirely numeric."),
        (
            "x7!k",
            "This password is too short. It must contain at least 8 characters.",
        ),
        (
            "margaret_thatcher1",
            "The password is too similar to the username.",
        ),
    ];
    for (password, problem) in cases {
        let (status, errors) = app.register_password("margaret_thatcher", password).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{password}: {errors}");
        let problems = errors["password"].as_array().expect("password errors");
        assert!(
            problems.contains(&json!(problem)),
            "{password}: {problems:?}"
        );
    }
    // The login password has the registration's length cap.
    let (status, errors) = app.login("margaret", &"x".repeat(5000)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(errors, json!({"password": ["This password is too long."]}));
    let (status, _) = app
        .register_password("margaret_thatcher", "orange tractor 42")
        .await;
    assert_eq!(status, StatusCode::CREATED);
    app.cleanup().await;
}

/// 500 concurrent logins with random usernames (each checked against the dummy hash) on the
/// API binary: hashing runs two at a time, the rest wait briefly and get 503 with
/// `Retry-After`; the process stays under 256 MiB and `/healthz` keeps answering within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_logins_stay_within_memory_and_keep_health_answering() {
    let api = common::spawn_api_binary(&[
        "--login-attempts-per-address",
        "0",
        "--login-attempts-per-username",
        "0",
        "--password-hash-concurrency",
        "2",
    ])
    .await;
    let (base, pid) = (api.base.clone(), api.pid);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");

    let logins: Vec<_> = (0..500)
        .map(|n| {
            let login = client
                .post(format!("{base}/api/login/"))
                .json(&json!({"username": format!("nobody{n}-{}", uuid::Uuid::new_v4()), "password": "orange tractor 42"}));
            tokio::spawn(async move {
                let reply = login.reply().await;
                (reply.status.as_u16(), reply.headers.contains_key("retry-after"))
            })
        })
        .collect();
    // While they run: health probes and the process's resident memory, until all answered.
    let mut peak_rss_kib = 0u64;
    let slowest_health = slowest_health_while(&client, &base, &logins, || {
        peak_rss_kib = peak_rss_kib.max(rss_kib(pid));
    })
    .await;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for login in logins {
        let (status, retry_after) = login.await.expect("login task");
        *statuses.entry(status).or_default() += 1;
        if status == 503 {
            assert!(retry_after, "503 without Retry-After");
        }
    }
    api.cleanup().await;
    eprintln!(
        "logins {statuses:?}, peak RSS {peak_rss_kib} KiB, slowest /healthz {slowest_health:?}"
    );
    assert_eq!(
        statuses
            .keys()
            .copied()
            .filter(|s| *s != 401 && *s != 503)
            .count(),
        0,
        "{statuses:?}"
    );
    assert!(
        statuses.contains_key(&503),
        "nothing was turned away: {statuses:?}"
    );
    assert!(peak_rss_kib < 256 * 1024, "peak RSS {peak_rss_kib} KiB");
    assert!(
        slowest_health < Duration::from_secs(1),
        "{slowest_health:?}"
    );
}

/// Django's similarity check compares a new password with the username and the email, in
/// work that grows with the one's length times the other's. On the API binary:
/// - a registration whose email is refused (20,000 characters) is answered with the email's
///   error at once: the password is compared only with attributes that are valid (a
///   4,096-character one took 78 s of CPU against this email in a release build);
/// - eight registrations at once with the longest valid username and email and a
///   2,538-character password each get 400 (the confirmation differs: every check ran and found nothing) or
///   503 with `Retry-After`, while `/healthz` keeps answering within 1 s: the comparisons run
///   on the two hashing threads, not on the threads that serve requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_registrations_are_compared_off_the_request_threads_and_only_with_valid_fields() {
    let api = common::spawn_api_binary(&[
        "--registrations-per-address",
        "0",
        "--password-hash-concurrency",
        "2",
    ])
    .await;
    let base = api.base.clone();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    // Under ten times the email's length, so the check cannot skip it as too long to match.
    let password: String = "ab".repeat(1269);
    let register = |username: String, email: String| {
        client
            .post(format!("{base}/api/register/"))
            .json(&json!({"username": username, "email": email,
                          "password": password, "password_confirm": "something else"}))
    };

    let refused_email = format!("{}@example.com", "a".repeat(20_000));
    let reply = register("mallory".into(), refused_email).reply().await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    assert_eq!(
        reply.json(),
        json!({"email": ["Enter a valid email address."],
               "password": ["Password fields didn't match."]})
    );

    // 150 characters of username, 254 of email: the longest each may be.
    let registrations: Vec<_> = (0..8)
        .map(|n| {
            let username = format!("{}{n:05}", "a".repeat(145));
            let email = format!("{}{n:05}@aaaaaaa.aa", "a".repeat(238));
            assert_eq!((username.len(), email.len()), (150, 254));
            let request = register(username, email);
            tokio::spawn(async move { request.reply().await })
        })
        .collect();
    let slowest_health = slowest_health_while(&client, &base, &registrations, || {}).await;
    let mut checked = 0;
    for registration in registrations {
        let reply = registration.await.expect("registration task");
        match reply.status {
            StatusCode::BAD_REQUEST => {
                assert_eq!(
                    reply.json(),
                    json!({"password": ["Password fields didn't match."]})
                );
                checked += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => assert!(reply.retry_after().is_some()),
            other => panic!("{other}: {}", reply.text),
        }
    }
    api.cleanup().await;
    eprintln!("checked {checked} of 8, slowest /healthz {slowest_health:?}");
    assert!(checked > 0, "every registration was turned away");
    assert!(
        slowest_health < Duration::from_secs(1),
        "{slowest_health:?}"
    );
}

/// Probes `/healthz` of the API at `base` every 20 ms until every one of `tasks` has finished,
/// calling `each` after each probe; every probe must answer 200 (within 5 s). The slowest.
async fn slowest_health_while<T>(
    client: &reqwest::Client,
    base: &str,
    tasks: &[tokio::task::JoinHandle<T>],
    mut each: impl FnMut(),
) -> Duration {
    let mut slowest = Duration::ZERO;
    while tasks.iter().any(|t| !t.is_finished()) {
        let started = Instant::now();
        let health = client
            .get(format!("{base}/healthz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map(|r| r.status());
        slowest = slowest.max(started.elapsed());
        assert!(matches!(health, Ok(StatusCode::OK)), "{health:?}");
        each();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    slowest
}

/// The resident memory of process `pid` (0 when it cannot be read).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn usernames_are_nfkc_normalized_at_registration_and_login() {
    let app = spawn_app().await;
    // Full-width letters: the same account as plain "bob".
    let (status, body) = app.register_password("ｂｏｂ", PASSWORD).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["username"], "bob");
    for username in ["bob", "ｂｏｂ"] {
        let (status, body) = app.login(username, PASSWORD).await;
        assert_eq!(status, StatusCode::OK, "{username}: {body}");
    }
    let (status, errors) = app.register("bob").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(errors["username"].is_array(), "{errors}");
    // 300 code points that NFKC composes into 150 letters: the longest name there is, and it
    // logs in spelled as it was registered.
    let decomposed = "e\u{301}".repeat(150);
    let (status, body) = app.register_password(&decomposed, PASSWORD).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["username"], "\u{e9}".repeat(150));
    let (status, body) = app.login(&decomposed, PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.cleanup().await;
}
