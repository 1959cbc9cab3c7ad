//! Registration, login, sessions and logout, over HTTP against the real router.
use crate::common;

use aichat_testkit::PASSWORD;
use common::{Replied, app_with_users, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn register_creates_a_user_and_answers_its_fields() {
    let app = spawn_app().await;
    let (status, body) = app
        .register_with(json!({"username": "alice", "email": "a@example.com", "password": "orange tractor 42", "password_confirm": "orange tractor 42"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(body["id"].as_i64().is_some());
    assert_eq!(body["username"], "alice");
    assert_eq!(body["email"], "a@example.com");
    assert_eq!(body["is_staff"], false);
    assert!(body.get("password").is_none() && body.get("password_hash").is_none());
    app.cleanup().await;
}

#[tokio::test]
async fn register_rejects_each_invalid_field_with_field_errors() {
    let app = spawn_app().await;
    app.user("taken").await;
    // A valid registration but for one field (`null`: left out).
    let with = |field: &str, value: Value| {
        let mut body = json!({"username": "bob", "password": "orange tractor 42", "password_confirm": "orange tractor 42"});
        match value {
            Value::Null => body.as_object_mut().expect("object").remove(field),
            value => body
                .as_object_mut()
                .expect("object")
                .insert(field.into(), value),
        };
        body
    };
    let cases = [
        (with("username", Value::Null), "username"),
        (with("username", json!("")), "username"),
        (with("username", json!("x".repeat(151))), "username"),
        (with("username", json!("bad name!")), "username"),
        (with("username", json!("taken")), "username"),
        (
            json!({"username": "bob", "password": "short", "password_confirm": "short"}),
            "password",
        ),
        (
            with("password_confirm", json!("orange tractor 43")),
            "password",
        ),
        (with("password", Value::Null), "password"),
        (with("email", json!("not-an-email")), "email"),
    ];
    for (body, field) in cases {
        let (status, errors) = app.register_with(body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let problems = errors[field]
            .as_array()
            .unwrap_or_else(|| panic!("{field} errors for {body}: {errors}"));
        assert!(
            !problems.is_empty() && problems.iter().all(|p| p.is_string()),
            "{errors}"
        );
    }
    let (_, users) = app
        .get("/api/users/", &app.user("checker").await.token)
        .await;
    assert_eq!(
        users.as_array().map(Vec::len),
        Some(2),
        "only taken and checker exist: {users}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn login_answers_the_user_a_token_and_a_session_cookie() {
    let app = spawn_app().await;
    let login = app.login_reply("alice").await;
    assert_eq!(login.status, StatusCode::OK);
    let cookie = login.header("set-cookie");
    let body = login.expect_json();
    let token = body["token"].as_str().unwrap();
    assert!(token.len() >= 43, "256-bit token");
    assert_eq!(body["username"], "alice");
    assert_eq!(body["is_staff"], false);
    assert!(body["id"].is_i64() && body["email"].is_string());
    assert!(
        cookie.starts_with(&format!("sessionid={token};")),
        "{cookie}"
    );
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attr), "{attr} missing in {cookie}");
    }

    // The cookie alone authenticates.
    let me = app
        .with_cookie(Method::GET, "/api/me/", token)
        .reply()
        .await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(
        me.expect_json(),
        json!({"id": body["id"], "username": "alice", "email": "", "is_staff": false})
    );
    app.cleanup().await;
}

#[tokio::test]
async fn wrong_credentials_are_401_invalid_credentials() {
    let app = spawn_app().await;
    app.register("alice").await;
    for (user, pass) in [("alice", "wrong password"), ("nobody", PASSWORD)] {
        let (status, body) = app.login(user, pass).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, json!({"error": "Invalid credentials"}));
    }
    let (status, body) = app
        .call(
            Method::POST,
            "/api/login/",
            None,
            Some(json!({"username": "alice"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["password"].is_array(), "{body}");
    app.cleanup().await;
}

#[tokio::test]
async fn logout_revokes_the_session_server_side() {
    let (app, [alice]) = app_with_users(["alice"]).await;
    let other_session = app.login("alice", PASSWORD).await.1["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = app.post("/api/logout/", &alice.token, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"message": "Logged out successfully"}));
    let (status, body) = app.get("/api/me/", &alice.token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, json!({"error": "Authentication required"}));
    // Only that session ends.
    assert_eq!(app.me_status(&other_session).await, StatusCode::OK);
    app.cleanup().await;
}

#[tokio::test]
async fn an_expired_session_is_refused() {
    let (app, [alice, bob]) = app_with_users(["alice", "bob"]).await;
    assert_eq!(app.me_status(&alice.token).await, StatusCode::OK);
    // Expired before this instance ever looked it up (so not in its session cache).
    app.expire_sessions_in(bob.id, -1).await;
    assert_eq!(app.me_status(&bob.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.me_status(&alice.token).await, StatusCode::OK);
    app.cleanup().await;
}

#[tokio::test]
async fn users_lists_ids_and_usernames_only() {
    let (app, [alice, bob]) = app_with_users(["alice", "bob"]).await;
    let (status, body) = app.get("/api/users/", &alice.token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!([{"id": alice.id, "username": "alice"}, {"id": bob.id, "username": "bob"}])
    );
    app.cleanup().await;
}

#[tokio::test]
async fn passwords_are_stored_as_argon2_hashes() {
    let app = spawn_app().await;
    app.user("alice").await;
    let creds = aichat_shared::db::users::find_credentials(&app.db, "alice")
        .await
        .unwrap()
        .unwrap();
    assert!(
        creds.password_hash.starts_with("$argon2id$"),
        "{}",
        creds.password_hash
    );
    assert!(!creds.password_hash.contains(PASSWORD));
    app.cleanup().await;
}
