//! What a browser and the sites it visits could do with the API's answers (SECURITY.md): use
//! the session cookie from another site, keep the cookie over plain HTTP, cache or sniff an
//! answer, forge a request id, or inject a script into the documentation pages.
use crate::common;

use common::{Replied, app_with_users, send_path, spawn_app, spawn_app_with_flags, upgrade};
use reqwest::{Method, StatusCode};
use serde_json::json;

const EVIL: &str = "https://evil.example";

#[tokio::test]
async fn cookie_authenticated_requests_from_other_sites_are_refused_before_any_effect() {
    let app = spawn_app_with_flags(&["--allowed-origins", "https://app.example.com"]).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let own_origin = app.base.clone();
    let send = send_path(chat);
    let body = json!({"content": "from elsewhere"});
    // A request whose only credential is alice's cookie, with these headers.
    let cookie_request = |method: Method, path: &str, headers: &[(&str, &str)]| {
        headers.iter().fold(
            app.with_cookie(method, path, &alice.token),
            |request, (name, value)| request.header(*name, *value),
        )
    };

    for headers in [
        vec![("origin", EVIL)],
        vec![("origin", "null")],
        vec![("sec-fetch-site", "cross-site")],
        vec![
            ("origin", own_origin.as_str()),
            ("sec-fetch-site", "cross-site"),
        ],
    ] {
        let refused = cookie_request(Method::POST, &send, &headers)
            .json(&body)
            .reply()
            .await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{headers:?}");
        assert_eq!(
            refused.expect_json(),
            json!({"error": "Cross-site request refused"})
        );
        // A body-less POST too: logout would end the session.
        let logout = cookie_request(Method::POST, "/api/logout/", &headers)
            .reply()
            .await;
        assert_eq!(logout.status, StatusCode::FORBIDDEN, "{headers:?}");
    }
    assert!(
        app.messages(&alice, chat).await.is_empty(),
        "nothing was stored"
    );
    assert_eq!(app.me_status(&alice.token).await, StatusCode::OK);

    // The same cookie from the API's own origin, from an allowed origin, with no Origin at
    // all (not a browser), and any origin with a bearer token: accepted.
    for headers in [
        vec![("origin", own_origin.as_str())],
        vec![("origin", "https://app.example.com")],
        vec![("sec-fetch-site", "same-origin")],
    ] {
        let accepted = cookie_request(Method::POST, &send, &headers)
            .json(&body)
            .reply()
            .await;
        assert_eq!(accepted.status, StatusCode::ACCEPTED, "{headers:?}");
    }
    let bearer = app
        .request(Method::POST, &send)
        .bearer_auth(&alice.token)
        .header("origin", EVIL)
        .json(&body)
        .reply()
        .await;
    assert_eq!(bearer.status, StatusCode::ACCEPTED);
    // A credential that is not the one used does not make the cookie acceptable: another
    // `Authorization` scheme, or `?token=` on a route that reads no `?token=`.
    for (path, headers) in [
        (
            "/api/logout/",
            vec![("origin", EVIL), ("authorization", "Basic eDp5")],
        ),
        ("/api/logout/?token=anything", vec![("origin", EVIL)]),
    ] {
        let refused = cookie_request(Method::POST, path, &headers).reply().await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{path} {headers:?}");
    }
    assert_eq!(app.me_status(&alice.token).await, StatusCode::OK);
    // Reading is not refused: a GET has no effect.
    let read = cookie_request(Method::GET, "/api/me/", &[("origin", EVIL)])
        .reply()
        .await;
    assert_eq!(read.status, StatusCode::OK);

    // The WebSocket upgrade: refused with the cookie from another site; a bogus `?token=`
    // beside the victim's cookie is what the socket authenticates with; the right `?token=`
    // (a credential the other site cannot have) is accepted.
    let ws_path = format!("/ws/ai-chat/{chat}/");
    let cookie = format!("sessionid={}", alice.token);
    let from_evil = [("origin", EVIL), ("cookie", cookie.as_str())];
    let (status, _) = upgrade(&app.ws_url(&ws_path), &from_evil).await;
    assert_eq!(status, 403);
    let (status, _) = upgrade(&app.ws_url(&format!("{ws_path}?token=bogus")), &from_evil).await;
    assert_eq!(status, 401);
    let right = app.ws_url(&format!("{ws_path}?token={}", alice.token));
    assert_eq!(upgrade(&right, &[("origin", EVIL)]).await.0, 101);
    app.cleanup().await;
}

#[tokio::test]
async fn a_second_session_cookie_from_a_sibling_domain_signs_no_one_in() {
    let app = spawn_app().await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let mallory = app.user("mallory").await;
    // A page on a sibling domain set mallory's session for the parent domain; the browser sends
    // it beside alice's own, and first (a longer path, or the older cookie).
    let both = format!("sessionid={}; sessionid={}", mallory.token, alice.token);
    let with_both =
        |method: Method, path: &str| app.request(method, path).header("cookie", both.as_str());
    let me = with_both(Method::GET, "/api/me/").reply().await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED, "{me:?}");
    let chats = with_both(Method::GET, "/api/ai/chats/").reply().await;
    assert_eq!(chats.status, StatusCode::UNAUTHORIZED, "{chats:?}");
    let created = with_both(Method::POST, "/api/ai/chats/")
        .json(&json!({"title": "my secrets"}))
        .reply()
        .await;
    assert_eq!(created.status, StatusCode::UNAUTHORIZED, "{created:?}");
    let (status, _) = upgrade(
        &app.ws_url(&format!("/ws/ai-chat/{chat}/")),
        &[("cookie", both.as_str())],
    )
    .await;
    assert_eq!(status, 401);
    assert!(app.list("/api/ai/chats/", &mallory.token).await.is_empty());
    // The same cookie sent twice is one credential.
    let twice = format!("sessionid={0}; sessionid={0}", alice.token);
    let me = app
        .request(Method::GET, "/api/me/")
        .header("cookie", twice)
        .reply()
        .await;
    assert_eq!(me.status, StatusCode::OK, "{me:?}");
    assert_eq!(me.json()["username"], "alice");
    app.cleanup().await;
}

#[tokio::test]
async fn api_answers_are_not_sniffed_or_cached_and_request_ids_are_kept_only_when_plain() {
    let (app, [alice]) = app_with_users(["alice"]).await;
    let me = |request_id: &str| {
        app.request(Method::GET, "/api/me/")
            .bearer_auth(&alice.token)
            .header("x-request-id", request_id)
            .reply()
    };
    let plain = me("trace-1.2_3").await;
    assert_eq!(plain.header("x-content-type-options"), "nosniff");
    assert_eq!(plain.header("cache-control"), "no-store");
    assert_eq!(plain.header("x-request-id"), "trace-1.2_3");
    for forged in [
        "x".repeat(65),
        "line\tbreak".into(),
        "spaces are not ok".into(),
        String::new(),
    ] {
        let answer = me(&forged).await;
        let id = answer.header("x-request-id");
        assert_ne!(id, forged);
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn the_session_cookie_is_secure_by_default_and_cleared_with_the_same_attributes() {
    let app = spawn_app().await;
    let login = app.login_reply("alice").await;
    let set = login.header("set-cookie");
    let token = login.expect_json()["token"]
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
        attributes(set),
        ["HttpOnly", "Path=/", "SameSite=Lax", "Secure"]
    );
    let logout = app
        .request(Method::POST, "/api/logout/")
        .bearer_auth(&token)
        .reply()
        .await;
    let clear = logout.header("set-cookie");
    assert!(
        clear.starts_with("sessionid=;") && clear.contains("Max-Age=0"),
        "{clear}"
    );
    assert_eq!(attributes(clear), attributes(set));
    app.cleanup().await;
}

/// Item 11: the documentation pages carry a Content-Security-Policy that lets them load only
/// what this binary serves (and no inline script).
#[tokio::test]
async fn the_documentation_pages_carry_a_content_security_policy() {
    let app = spawn_app().await;
    for path in ["/api/docs/", "/api/redoc/"] {
        let answer = app.fetch_ok(path).await;
        let csp = answer.header("content-security-policy");
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self';"), "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
    }
    app.cleanup().await;
}
