//! What an attacker of an open-registration service tries (SECURITY.md, one test per threat):
//! login and registration abuse (throttled by client address and by username, shared through
//! Redis; failures backing off per username; password hashing bounded; passwords checked as
//! Django checks them), cross-site use of the session cookie, running up the model bill,
//! sessions kept alive after logout, slow or too many connections, and operator commands.
//! Paged lists are in `paging.rs`.
use crate::common;

use std::time::{Duration, Instant};

use common::{closed_with, event_of, spawn_app, spawn_app_with_flags};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse";

/// A login attempt, optionally as forwarded by a proxy for `forwarded_for`.
async fn login(
    app: &common::TestApp,
    username: &str,
    password: &str,
    forwarded_for: Option<&str>,
) -> (StatusCode, Value, Option<String>) {
    let mut request = app
        .client
        .post(app.url("/api/login/"))
        .json(&json!({"username": username, "password": password}));
    if let Some(address) = forwarded_for {
        request = request.header("x-forwarded-for", address);
    }
    let response = request.send().await.expect("login answered");
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body, retry_after)
}

fn too_many(answer: &(StatusCode, Value, Option<String>)) -> bool {
    answer.0 == StatusCode::TOO_MANY_REQUESTS
        && answer.1 == json!({"error": "Too many attempts, please try again later"})
        && answer
            .2
            .as_deref()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|secs| secs >= 1)
}

#[tokio::test]
async fn logins_past_the_address_window_get_429_alike_for_known_and_unknown_users() {
    let app = spawn_app_with_flags(&[
        "--login-attempts-per-address",
        "3",
        "--login-attempts-per-username",
        "0",
    ])
    .await;
    app.register("alice").await;
    for _ in 0..3 {
        let answer = login(&app, "alice", "wrong password", None).await;
        assert_eq!(answer.0, StatusCode::UNAUTHORIZED, "{answer:?}");
    }
    let known = login(&app, "alice", PASSWORD, None).await;
    let unknown = login(&app, "nobody", PASSWORD, None).await;
    assert!(too_many(&known), "{known:?}");
    assert!(too_many(&unknown), "{unknown:?}");
    assert_eq!(
        known.1, unknown.1,
        "the same body whether or not the user exists"
    );
    // A client's own X-Forwarded-For is ignored: no proxy is trusted.
    let spoofed = login(&app, "alice", PASSWORD, Some("203.0.113.50")).await;
    assert!(too_many(&spoofed), "{spoofed:?}");
    // Another instance sees the same window (Redis).
    let other = app.another_instance(&[
        "--login-attempts-per-address",
        "3",
        "--login-attempts-per-username",
        "0",
    ]);
    let other = other.await;
    assert!(too_many(&login(&other, "alice", PASSWORD, None).await));
    app.cleanup().await;
}

#[tokio::test]
async fn a_username_is_throttled_from_every_address_and_trusted_proxies_name_the_client() {
    let app = spawn_app_with_flags(&[
        "--trusted-proxies",
        "127.0.0.1,::1",
        "--login-attempts-per-address",
        "2",
        "--login-attempts-per-username",
        "3",
    ])
    .await;
    app.register("alice").await;
    // Behind the trusted proxy every attempt comes from another client address, so only the
    // username's window counts them.
    for n in 0..3 {
        let address = format!("198.51.100.{n}");
        let answer = login(&app, "alice", "wrong password", Some(&address)).await;
        assert_eq!(answer.0, StatusCode::UNAUTHORIZED, "{answer:?}");
    }
    assert!(too_many(
        &login(&app, "alice", PASSWORD, Some("198.51.100.9")).await
    ));
    // The address window is per forwarded client: a fresh one may try another username.
    app.register("bob").await;
    let (status, _, _) = login(&app, "bob", PASSWORD, Some("198.51.100.20")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = login(&app, "bob", PASSWORD, Some("198.51.100.20")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(too_many(
        &login(&app, "bob", PASSWORD, Some("198.51.100.20")).await
    ));
    app.cleanup().await;
}

#[tokio::test]
async fn repeated_failures_lock_a_username_for_longer_each_time_until_a_login_succeeds() {
    let app = spawn_app_with_flags(&[
        "--login-attempts-per-address",
        "0",
        "--login-attempts-per-username",
        "0",
        "--login-failures-before-backoff",
        "2",
        "--metrics-token",
        "abuse-scraper-token-0123",
    ])
    .await;
    app.register("alice").await;
    let failures_before = failed_logins(&app).await;
    assert_eq!(
        login(&app, "alice", "wrong 1", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    // The second failure locks the username for 1 s, the third for 2 s.
    assert_eq!(
        login(&app, "alice", "wrong 2", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    let locked = login(&app, "alice", PASSWORD, None).await;
    assert!(too_many(&locked), "{locked:?}");
    assert_eq!(locked.2.as_deref(), Some("1"));
    let third = until_admitted(&app, "alice", "wrong 3").await;
    assert_eq!(third.0, StatusCode::UNAUTHORIZED);
    let locked = login(&app, "alice", PASSWORD, None).await;
    assert_eq!(locked.2.as_deref(), Some("2"), "{locked:?}");
    // Another username is not affected.
    app.register("bob").await;
    assert_eq!(login(&app, "bob", PASSWORD, None).await.0, StatusCode::OK);
    // Once the lock is over, a right password logs in and clears the failures: one failure
    // afterwards does not lock again.
    let ok = until_admitted(&app, "alice", PASSWORD).await;
    assert_eq!(ok.0, StatusCode::OK, "{ok:?}");
    assert_eq!(
        login(&app, "alice", "wrong 4", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(login(&app, "alice", PASSWORD, None).await.0, StatusCode::OK);
    // Other tests of this binary share the recorder and may fail logins meanwhile.
    assert!(failed_logins(&app).await - failures_before >= 4.0);
    app.cleanup().await;
}

/// Retries a login while it is refused with 429 (bounded), answering the first other answer.
async fn until_admitted(
    app: &common::TestApp,
    username: &str,
    password: &str,
) -> (StatusCode, Value, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = login(app, username, password, None).await;
        if answer.0 != StatusCode::TOO_MANY_REQUESTS {
            return answer;
        }
        assert!(Instant::now() < deadline, "still locked: {answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `aichat_login_failures_total` as the API reports it (the recorder is shared by every app
/// of this test binary: compare before and after).
async fn failed_logins(app: &common::TestApp) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth("abuse-scraper-token-0123")
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| {
            line.strip_prefix("aichat_login_failures_total ")?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn registrations_past_the_address_window_get_429() {
    let app = spawn_app_with_flags(&["--registrations-per-address", "2"]).await;
    assert_eq!(app.register("alice").await.0, StatusCode::CREATED);
    // A refused registration counts too: the window is what is tried, not what succeeds.
    let (status, _) = app
        .call(
            Method::POST,
            "/api/register/",
            None,
            Some(json!({"username": "bob", "password": "x", "password_confirm": "x"})),
        )
        .await;
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
        let (status, errors) = app
            .call(
                Method::POST,
                "/api/register/",
                None,
                Some(json!({"username": "margaret_thatcher", "password": password, "password_confirm": password})),
            )
            .await;
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
        .call(
            Method::POST,
            "/api/register/",
            None,
            Some(json!({"username": "margaret_thatcher", "password": "orange tractor 42", "password_confirm": "orange tractor 42"})),
        )
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
            let client = client.clone();
            let url = format!("{base}/api/login/");
            tokio::spawn(async move {
                let response = client
                    .post(url)
                    .json(&json!({"username": format!("nobody{n}-{}", uuid::Uuid::new_v4()), "password": "orange tractor 42"}))
                    .send()
                    .await
                    .expect("login answered");
                let retry_after = response.headers().contains_key("retry-after");
                (response.status().as_u16(), retry_after)
            })
        })
        .collect();
    // While they run: health probes and the process's resident memory, until all answered.
    let mut slowest_health = Duration::ZERO;
    let mut peak_rss_kib = 0u64;
    while logins.iter().any(|l| !l.is_finished()) {
        let started = Instant::now();
        let health = client
            .get(format!("{base}/healthz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map(|r| r.status());
        slowest_health = slowest_health.max(started.elapsed());
        assert!(matches!(health, Ok(StatusCode::OK)), "{health:?}");
        peak_rss_kib = peak_rss_kib.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// A request whose only credential is the `sessionid` cookie.
fn with_cookie(
    app: &common::TestApp,
    method: Method,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    let mut request = app
        .client
        .request(method, app.url(path))
        .header("cookie", format!("sessionid={token}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
}

#[tokio::test]
async fn cookie_authenticated_requests_from_other_sites_are_refused_before_any_effect() {
    let app = spawn_app_with_flags(&["--allowed-origins", "https://app.example.com"]).await;
    let alice = app.user("alice").await;
    let chat = app.ai_chat_id(&alice).await;
    let own_origin = app.base.clone();
    let send = format!("/api/ai/chats/{chat}/send_message/");
    let body = json!({"content": "from elsewhere"});

    for headers in [
        vec![("origin", "https://evil.example")],
        vec![("origin", "null")],
        vec![("sec-fetch-site", "cross-site")],
        vec![
            ("origin", own_origin.as_str()),
            ("sec-fetch-site", "cross-site"),
        ],
    ] {
        let refused = with_cookie(&app, Method::POST, &send, &alice.token, &headers)
            .json(&body)
            .send()
            .await
            .expect("answered");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{headers:?}");
        assert_eq!(
            refused.json::<Value>().await.expect("json"),
            json!({"error": "Cross-site request refused"})
        );
        // A body-less POST too: logout would end the session.
        let logout = with_cookie(&app, Method::POST, "/api/logout/", &alice.token, &headers)
            .send()
            .await
            .expect("answered");
        assert_eq!(logout.status(), StatusCode::FORBIDDEN, "{headers:?}");
    }
    let (status, messages) = app
        .get(&format!("/api/ai/chats/{chat}/messages/"), &alice.token)
        .await;
    assert_eq!(
        (status, messages),
        (StatusCode::OK, json!([])),
        "nothing was stored"
    );
    assert_eq!(app.get("/api/me/", &alice.token).await.0, StatusCode::OK);

    // The same cookie from the API's own origin, from an allowed origin, with no Origin at
    // all (not a browser), and any origin with a bearer token: accepted.
    for headers in [
        vec![("origin", own_origin.as_str())],
        vec![("origin", "https://app.example.com")],
        vec![("sec-fetch-site", "same-origin")],
    ] {
        let accepted = with_cookie(&app, Method::POST, &send, &alice.token, &headers)
            .json(&body)
            .send()
            .await
            .expect("answered");
        assert_eq!(accepted.status(), StatusCode::ACCEPTED, "{headers:?}");
    }
    let bearer = app
        .client
        .post(app.url(&send))
        .bearer_auth(&alice.token)
        .header("origin", "https://evil.example")
        .json(&body)
        .send()
        .await
        .expect("answered");
    assert_eq!(bearer.status(), StatusCode::ACCEPTED);
    // A credential that is not the one used does not make the cookie acceptable: another
    // `Authorization` scheme, or `?token=` on a route that reads no `?token=`.
    for (path, headers) in [
        (
            "/api/logout/",
            vec![
                ("origin", "https://evil.example"),
                ("authorization", "Basic eDp5"),
            ],
        ),
        (
            "/api/logout/?token=anything",
            vec![("origin", "https://evil.example")],
        ),
    ] {
        let refused = with_cookie(&app, Method::POST, path, &alice.token, &headers)
            .send()
            .await
            .expect("answered");
        assert_eq!(
            refused.status(),
            StatusCode::FORBIDDEN,
            "{path} {headers:?}"
        );
    }
    assert_eq!(app.get("/api/me/", &alice.token).await.0, StatusCode::OK);
    // Reading is not refused: a GET has no effect.
    let read = with_cookie(
        &app,
        Method::GET,
        "/api/me/",
        &alice.token,
        &[("origin", "https://evil.example")],
    )
    .send()
    .await
    .expect("answered");
    assert_eq!(read.status(), StatusCode::OK);

    // The WebSocket upgrade: refused with the cookie from another site; a bogus `?token=`
    // beside the victim's cookie is what the socket authenticates with; the right `?token=`
    // (a credential the other site cannot have) is accepted.
    let ws_path = format!("/ws/ai-chat/{chat}/");
    let cookie = Some(alice.token.as_str());
    assert_eq!(cross_site_upgrade(&app, &ws_path, cookie).await, 403);
    let bogus = format!("{ws_path}?token=bogus");
    assert_eq!(cross_site_upgrade(&app, &bogus, cookie).await, 401);
    let right = format!("{ws_path}?token={}", alice.token);
    assert_eq!(cross_site_upgrade(&app, &right, None).await, 101);
    app.cleanup().await;
}

/// The status a WebSocket upgrade of `path` from `https://evil.example` gets, with `cookie` as
/// the `sessionid` cookie when given.
async fn cross_site_upgrade(app: &common::TestApp, path: &str, cookie: Option<&str>) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = app.ws_url(path).into_client_request().expect("request");
    let headers = request.headers_mut();
    headers.insert("origin", "https://evil.example".parse().expect("header"));
    if let Some(token) = cookie {
        headers.insert(
            "cookie",
            format!("sessionid={token}").parse().expect("header"),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_socket, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(err) => panic!("{path}: {err}"),
    }
}

#[tokio::test]
async fn api_answers_are_not_sniffed_or_cached_and_request_ids_are_kept_only_when_plain() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let me = app
        .client
        .get(app.url("/api/me/"))
        .bearer_auth(&alice.token)
        .header("x-request-id", "trace-1.2_3")
        .send()
        .await
        .expect("answered");
    let headers = me.headers();
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["x-request-id"], "trace-1.2_3");
    for forged in [
        "x".repeat(65),
        "line\tbreak".into(),
        "spaces are not ok".into(),
        String::new(),
    ] {
        let answer = app
            .client
            .get(app.url("/api/me/"))
            .bearer_auth(&alice.token)
            .header("x-request-id", forged.as_str())
            .send()
            .await
            .expect("answered");
        let id = answer.headers()["x-request-id"].to_str().expect("ascii");
        assert_ne!(id, forged);
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn the_session_cookie_is_secure_by_default_and_cleared_with_the_same_attributes() {
    let app = spawn_app().await;
    app.register("alice").await;
    let login = app
        .client
        .post(app.url("/api/login/"))
        .json(&json!({"username": "alice", "password": PASSWORD}))
        .send()
        .await
        .expect("answered");
    let set = login.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let token = login.json::<Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let attributes = |cookie: &str| {
        let mut parts: Vec<String> = cookie
            .split(';')
            .skip(1)
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.starts_with("Max-Age"))
            .collect();
        parts.sort();
        parts
    };
    assert_eq!(
        attributes(&set),
        ["HttpOnly", "Path=/", "SameSite=Lax", "Secure"]
    );
    let logout = app
        .client
        .post(app.url("/api/logout/"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("answered");
    let clear = logout.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        clear.starts_with("sessionid=;") && clear.contains("Max-Age=0"),
        "{clear}"
    );
    assert_eq!(attributes(&clear), attributes(&set));
    app.cleanup().await;
}

#[tokio::test]
async fn usernames_are_nfkc_normalized_at_registration_and_login() {
    let app = spawn_app().await;
    // Full-width letters: the same account as plain "bob".
    let (status, body) = app
        .call(
            Method::POST,
            "/api/register/",
            None,
            Some(json!({"username": "ｂｏｂ", "password": PASSWORD, "password_confirm": PASSWORD})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["username"], "bob");
    let (status, body) = app.login("bob", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app.login("ｂｏｂ", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, errors) = app
        .call(
            Method::POST,
            "/api/register/",
            None,
            Some(json!({"username": "bob", "password": PASSWORD, "password_confirm": PASSWORD})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(errors["username"].is_array(), "{errors}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_chat_has_at_most_max_chat_participants_the_creator_included() {
    let app = spawn_app_with_flags(&["--max-chat-participants", "3"]).await;
    let alice = app.user("alice").await;
    let mut others = Vec::new();
    for name in ["bob", "carol", "dave"] {
        others.push(app.user(name).await.id);
    }
    let (status, errors) = app
        .post(
            "/api/chats/",
            &alice.token,
            json!({"name": "crowd", "participant_ids": others}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        errors,
        json!({"participant_ids": ["At most 3 participants, the creator included."]})
    );
    let (status, chat) = app
        .post(
            "/api/chats/",
            &alice.token,
            json!({"name": "pair", "participant_ids": &others[..2]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{chat}");
    assert_eq!(chat["participants"].as_array().map(Vec::len), Some(3));
    for participant in chat["participants"].as_array().expect("participants") {
        let keys: Vec<&String> = participant.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["id", "username"], "no email, no staff flag");
    }
    let (_, chats) = app.get("/api/chats/", &alice.token).await;
    assert_eq!(
        chats.as_array().map(Vec::len),
        Some(1),
        "nothing stored for the refused one"
    );
    app.cleanup().await;
}

/// Item 4: only the operator's models. A chat may name `OPENAI_MODEL` or one of
/// `ALLOWED_MODELS`; any other name is a field error on create, PATCH and PUT, and the stored
/// chat keeps its model. `GET /api/ai/models/` lists them, the default first and marked.
#[tokio::test]
async fn only_the_operators_models_can_be_chosen_and_they_are_listed() {
    let app = spawn_app_with_flags(&["--allowed-models", " gpt-4o-mini , gpt-test,,"]).await;
    let alice = app.user("alice").await;
    let (status, body) = app.call(Method::GET, "/api/ai/models/", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, models) = app.get("/api/ai/models/", &alice.token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        models,
        json!([{"id": "gpt-test", "default": true}, {"id": "gpt-4o-mini", "default": false}])
    );

    let chat = app
        .create_ai_chat(&alice, json!({"title": "t", "model": "gpt-4o-mini"}))
        .await;
    assert_eq!(chat["model"], "gpt-4o-mini");
    let id = chat["id"].as_i64().expect("id");
    let (status, body) = app
        .post(
            "/api/ai/chats/",
            &alice.token,
            json!({"title": "t", "model": "gpt-5-pro"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["model"][0]
            .as_str()
            .unwrap_or_default()
            .contains("not one of the available models"),
        "{body}"
    );
    let path = format!("/api/ai/chats/{id}/");
    let (status, body) = app.patch(&path, &alice.token, json!({"model": "o1"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["model"].is_array(), "{body}");
    let (status, body) = app
        .put(&path, &alice.token, json!({"title": "t", "model": "m-2"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (_, stored) = app.get(&path, &alice.token).await;
    assert_eq!(stored["model"], "gpt-4o-mini");
    let (status, _) = app
        .patch(&path, &alice.token, json!({"model": "gpt-test"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    app.cleanup().await;
}

/// Item 8: a logout reaches open sockets. Logging out one session closes its sockets on both
/// API instances with 4401 within 2 s (and the other instance stops accepting the token at
/// once, although it had just cached it), while the user's other session keeps its socket;
/// `POST /api/logout/all/` then ends that one too.
#[tokio::test]
async fn logout_closes_that_sessions_sockets_on_every_instance_and_logout_all_the_rest() {
    let a = spawn_app().await;
    let b = a.another_instance(&[]).await;
    let alice = a.user("alice").await;
    let (status, second) = a.login("alice", "correct horse").await;
    assert_eq!(status, StatusCode::OK);
    let other_token = second["token"].as_str().expect("token").to_owned();
    let chat = a.ai_chat_id(&alice).await;
    let mut on_a = a.ws(chat, &alice.token, None).await;
    let mut on_b = b.ws(chat, &alice.token, None).await;
    let mut other = b.ws(chat, &other_token, None).await;
    assert_eq!(b.get("/api/me/", &alice.token).await.0, StatusCode::OK);

    let (status, body) = a.post("/api/logout/", &alice.token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(closed_with(&mut on_a, 2).await, Some(4401));
    assert_eq!(closed_with(&mut on_b, 2).await, Some(4401));
    assert_eq!(
        b.get("/api/me/", &alice.token).await.0,
        StatusCode::UNAUTHORIZED
    );

    let (status, _) = b
        .post(
            &format!("/api/ai/chats/{chat}/send_message/"),
            &other_token,
            json!({"content": "still here"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (event, _) = event_of(&mut other, "user_message", 5).await;
    assert_eq!(event["message"]["content"], "still here");

    let (status, body) = b.post("/api/logout/all/", &other_token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(closed_with(&mut other, 2).await, Some(4401));
    assert_eq!(
        a.get("/api/me/", &other_token).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = a.call(Method::POST, "/api/logout/all/", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    b.cleanup().await;
    a.cleanup().await;
}

/// Item 8: a socket does not outlive its session: it is closed (4401) when the session
/// expires, though the client keeps answering pings.
#[tokio::test]
async fn a_socket_is_closed_when_its_session_expires() {
    // No session cache: the socket must read the expiry this test writes into the database.
    let app = spawn_app_with_flags(&["--session-cache-secs", "0"]).await;
    let bob = app.user("bob").await;
    let chat = app.ai_chat_id(&bob).await;
    sqlx::query("update sessions set expires_at = now() + interval '2 seconds' where user_id = $1")
        .bind(bob.id)
        .execute(&app.db)
        .await
        .expect("shorten the session");
    let mut ws = app.ws(chat, &bob.token, None).await;
    assert_eq!(closed_with(&mut ws, 10).await, Some(4401));
    app.cleanup().await;
}

/// Item 8: `aichat-api revoke-sessions --username` ends every session of that user, for
/// operators: the API instance's sockets close (4401) and the token is refused.
#[tokio::test]
async fn the_operator_command_revokes_every_session_of_a_user() {
    let app = spawn_app().await;
    let carol = app.user("carol").await;
    let dave = app.user("dave").await;
    let chat = app.ai_chat_id(&carol).await;
    let mut ws = app.ws(chat, &carol.token, None).await;
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_aichat-api"))
        .args([
            "--database-url",
            &app.db_url,
            "--redis-url",
            &app.redis_url,
            "--aichat-namespace",
            &app.ns,
            "--log-filter",
            "error",
            "revoke-sessions",
            "--username",
            "Carol".to_lowercase().as_str(),
        ])
        .status()
        .await
        .expect("run the command");
    assert!(status.success());
    assert_eq!(closed_with(&mut ws, 2).await, Some(4401));
    assert_eq!(
        app.get("/api/me/", &carol.token).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.get("/api/me/", &dave.token).await.0, StatusCode::OK);
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_aichat-api"))
        .args([
            "--database-url",
            &app.db_url,
            "revoke-sessions",
            "--username",
            "nobody",
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .expect("run the command");
    assert!(!status.success(), "an unknown user is an error");
    app.cleanup().await;
}

/// Item 11: the documentation pages carry a Content-Security-Policy that lets them load only
/// what this binary serves (and no inline script).
#[tokio::test]
async fn the_documentation_pages_carry_a_content_security_policy() {
    let app = spawn_app().await;
    for path in ["/api/docs/", "/api/redoc/"] {
        let answer = app
            .client
            .get(app.url(path))
            .send()
            .await
            .expect("answered");
        assert_eq!(answer.status(), StatusCode::OK, "{path}");
        let csp = answer.headers()["content-security-policy"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self';"), "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
    }
    app.cleanup().await;
}

/// Item 11: `create-admin` takes the password from `ADMIN_PASSWORD` only and makes an existing
/// user staff only when told to with `--promote-existing`.
#[tokio::test]
async fn create_admin_takes_the_password_from_the_environment_and_promotes_only_when_told() {
    let app = spawn_app().await;
    let eve = app.user("eve").await;
    let run = |args: Vec<String>, password: Option<&'static str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_aichat-api"));
        command
            .args(["--database-url", &app.db_url, "--log-filter", "error"])
            .args(args)
            .env_remove("ADMIN_PASSWORD")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(password) = password {
            command.env("ADMIN_PASSWORD", password);
        }
        async move { command.status().await.expect("run create-admin").success() }
    };
    let args = |more: &[&str]| -> Vec<String> {
        ["create-admin"]
            .iter()
            .chain(more)
            .map(|s| s.to_string())
            .collect()
    };
    let is_staff = |username: &'static str| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, bool>("select is_staff from users where username = $1")
                .bind(username)
                .fetch_one(&db)
                .await
                .expect("user")
        }
    };
    assert!(!run(args(&["--username", "eve"]), Some("unused password 1")).await);
    assert!(
        !is_staff("eve").await,
        "an existing user is not promoted unasked"
    );
    assert!(run(args(&["--username", "eve", "--promote-existing"]), None).await);
    assert!(is_staff("eve").await);
    assert_eq!(app.get("/api/me/", &eve.token).await.1["is_staff"], true);

    assert!(
        !run(
            args(&["--username", "root", "--password", "on the command line"]),
            None
        )
        .await,
        "no password flag"
    );
    assert!(
        !run(args(&["--username", "root"]), None).await,
        "no password at all"
    );
    assert!(run(args(&["--username", "root"]), Some("root's long password")).await);
    let (status, body) = app.login("root", "root's long password").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["is_staff"], true, "{body}");
    app.cleanup().await;
}

/// Item 10: a client that never finishes its headers is cut off after
/// `HEADER_READ_TIMEOUT_SECS` (hyper's timeout needs a timer, which the server now has), and
/// one whose request (its body included) runs past `REQUEST_TIMEOUT_SECS` gets 503 with
/// `Retry-After`, while `send_message?wait` may wait its own time.
#[tokio::test]
async fn slow_headers_are_cut_off_and_slow_requests_answered_503() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with_flags(&[
        "--header-read-timeout-secs",
        "1",
        "--request-timeout-secs",
        "1",
    ])
    .await;
    let alice = app.user("alice").await;
    let chat = app.ai_chat_id(&alice).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    // Everything the server answers until it closes the connection (at most 10 s).
    let answer_to = |request: Vec<u8>| {
        let addr = addr.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            stream.write_all(&request).await.expect("write");
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
                .await
                .expect("the server closes the connection in time")
                .expect("read");
            String::from_utf8_lossy(&answer).into_owned()
        }
    };

    let started = Instant::now();
    let answer = answer_to(b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec()).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    let slow_body = format!(
        "POST /api/ai/chats/{chat}/send_message/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"content\"",
        alice.token
    );
    let answer = answer_to(slow_body.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("took too long"), "{answer}");

    // No worker runs: the wait ends after its 2 s with 202, past the 1 s request timeout.
    let (status, body) = app
        .post(
            &format!("/api/ai/chats/{chat}/send_message/?wait=2"),
            &alice.token,
            json!({"content": "hi"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    app.cleanup().await;
}

/// Item 10: connections are capped (a WebSocket keeps its place until it closes): past
/// `MAX_CONNECTIONS` a new connection is answered 503 with `Retry-After`; and a user has at
/// most `MAX_SOCKETS_PER_USER` sockets on an instance: the next upgrade is 429, before any
/// upgrade, while other users are unaffected.
#[tokio::test]
async fn connections_and_each_users_sockets_are_capped() {
    let app =
        spawn_app_with_flags(&["--max-connections", "4", "--max-sockets-per-user", "2"]).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.ai_chat_id(&alice).await;
    let bobs = app.ai_chat_id(&bob).await;
    let first = app.ws(chat, &alice.token, None).await;
    let _second = app.ws(chat, &alice.token, None).await;
    let refused = tokio_tungstenite::connect_async(
        app.ws_url(&format!("/ws/ai-chat/{chat}/?token={}", alice.token)),
    )
    .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(answer)) => {
            assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
            assert!(answer.headers().contains_key("retry-after"));
        }
        other => panic!("a third socket of alice's: {:?}", other.map(|_| ())),
    }
    let _bobs = app.ws(bobs, &bob.token, None).await;

    // The test's pooled connection and three sockets hold the four places: a new connection
    // is refused.
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client")
    };
    let answer = fresh()
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("answered");
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers()["retry-after"], "1");
    let body: Value = answer.json().await.expect("JSON");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Too many connections")
    );

    // A socket that closes gives its place (and alice's) back.
    drop(first);
    assert!(
        a_fresh_connection_is_answered(&app, Duration::from_secs(10)).await,
        "the place was never freed"
    );
    app.cleanup().await;
}

/// Item 11: spans record ids, never text. The API binary logs at debug level (every statement
/// inside its span) while a user registers with an email, writes a system prompt, a chat line
/// and a question; none of them is in the log.
#[tokio::test]
async fn debug_logs_hold_no_message_text_prompts_or_emails() {
    let log_path = std::env::temp_dir().join(format!(
        "aichat-security-log-{}.json",
        uuid::Uuid::new_v4().simple()
    ));
    let log = std::fs::File::create(&log_path).expect("log file");
    let api = common::spawn_api_binary_logging_to(
        &[
            "--log-filter",
            "debug",
            "--log-format",
            "json",
            "--send-rate-per-minute",
            "0",
        ],
        log,
    )
    .await;
    let client = reqwest::Client::new();
    let call = |method: Method, path: &str, token: Option<&str>, body: Value| {
        let mut request = client
            .request(method, format!("{}{path}", api.base))
            .json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let answer = request.send().await.expect("answered");
            let status = answer.status();
            (status, answer.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let mut tokens = Vec::new();
    for (name, email) in [
        ("alice", "alice-hidden@example.com"),
        ("bob", "bob-hidden@example.com"),
    ] {
        let password = "a long enough pass phrase";
        let (status, body) = call(
            Method::POST,
            "/api/register/",
            None,
            json!({"username": name, "email": email, "password": password, "password_confirm": password}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = call(
            Method::POST,
            "/api/login/",
            None,
            json!({"username": name, "password": password}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        tokens.push(body["token"].as_str().expect("token").to_owned());
    }
    let alice = tokens[0].as_str();
    let (_, chat) = call(
        Method::POST,
        "/api/chats/",
        Some(alice),
        json!({"name": "n", "participant_usernames": ["bob"]}),
    )
    .await;
    let chat = chat["id"].as_i64().expect("chat id");
    let (status, _) = call(
        Method::POST,
        &format!("/api/chats/{chat}/send_message/"),
        Some(alice),
        json!({"content": "HIDDEN-CHAT-LINE"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, ai_chat) = call(
        Method::POST,
        "/api/ai/chats/",
        Some(alice),
        json!({"title": "t", "system_prompt": "HIDDEN-SYSTEM-PROMPT", "related_chat": chat}),
    )
    .await;
    let ai_chat = ai_chat["id"].as_i64().expect("AI chat id");
    let (status, _) = call(
        Method::PATCH,
        &format!("/api/ai/chats/{ai_chat}/"),
        Some(alice),
        json!({"system_prompt": "HIDDEN-CHANGED-PROMPT"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        Method::POST,
        &format!("/api/ai/chats/{ai_chat}/send_message/"),
        Some(alice),
        json!({"content": "HIDDEN-QUESTION"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    api.cleanup().await;

    let log = std::fs::read_to_string(&log_path).expect("the log");
    let _ = std::fs::remove_file(&log_path);
    assert!(log.contains("insert_ai_chat"), "spans are in the debug log");
    for hidden in [
        "alice-hidden@example.com",
        "bob-hidden@example.com",
        "HIDDEN-CHAT-LINE",
        "HIDDEN-SYSTEM-PROMPT",
        "HIDDEN-CHANGED-PROMPT",
        "HIDDEN-QUESTION",
    ] {
        assert!(!log.contains(hidden), "{hidden} is in the log");
    }
}

/// Item 10: a client that stops reading its answers cannot hold its connection: a write that
/// stays blocked longer than the request timeout drops the connection, and its place under
/// `MAX_CONNECTIONS` is free again.
#[tokio::test]
async fn a_client_that_stops_reading_loses_its_connection() {
    use tokio::io::AsyncWriteExt;
    // Idle connections are not closed by the header timeout within the test.
    let app = spawn_app_with_flags(&[
        "--request-timeout-secs",
        "1",
        "--max-connections",
        "2",
        "--header-read-timeout-secs",
        "60",
    ])
    .await;
    let alice = app.user("alice").await;
    let chat = app.ai_chat_id(&alice).await;
    // About a megabyte a page.
    sqlx::query(
        "insert into ai_messages (ai_chat_id, role, content, status)
         select $1, 'user', repeat('x', 1000), 'answered' from generate_series(1, 1000)",
    )
    .bind(chat)
    .execute(&app.db)
    .await
    .expect("messages");
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut stuck = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let request = format!(
        "GET /api/ai/chats/{chat}/messages/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        alice.token
    );
    // Far more answer than the socket buffers hold, never read.
    stuck
        .write_all(request.repeat(64).as_bytes())
        .await
        .expect("write the requests");
    // The test's pooled connection and the stuck one hold both places.
    let status = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
        .get(app.url("/healthz"))
        .send()
        .await
        .map(|a| a.status());
    assert!(
        matches!(status, Ok(StatusCode::SERVICE_UNAVAILABLE)),
        "{status:?}"
    );
    let freed = a_fresh_connection_is_answered(&app, Duration::from_secs(15)).await;
    assert!(freed, "the stuck connection kept its place");
    drop(stuck);
    app.cleanup().await;
}

/// Polls `/healthz` on fresh connections until one is answered 200 (false after `limit`).
async fn a_fresh_connection_is_answered(app: &common::TestApp, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        if let Ok(answer) = client.get(app.url("/healthz")).send().await
            && answer.status() == StatusCode::OK
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
