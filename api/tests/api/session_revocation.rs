//! Sessions that end end everywhere (SECURITY.md item 8): a logout, `logout/all`, an expiry
//! or the operator's `revoke-sessions` closes the session's sockets (4401) on every API
//! instance and its token is refused, while the user's other sessions go on.
use crate::common;

use aichat_testkit::PASSWORD;
use common::{
    api_command, app_with_ai_chat, closed_with, event_of, spawn_app, spawn_app_with_flags,
};
use reqwest::{Method, StatusCode};
use serde_json::json;

/// Item 8: a logout reaches open sockets. Logging out one session closes its sockets on both
/// API instances with 4401 within 2 s (and the other instance stops accepting the token at
/// once, although it had just cached it), while the user's other session keeps its socket;
/// `POST /api/logout/all/` then ends that one too.
#[tokio::test]
async fn logout_closes_that_sessions_sockets_on_every_instance_and_logout_all_the_rest() {
    let a = spawn_app().await;
    let b = a.another_instance(&[]).await;
    let (alice, chat) = a.user_with_ai_chat("alice").await;
    let (status, second) = a.login("alice", PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
    let other = common::TestUser {
        token: second["token"].as_str().expect("token").to_owned(),
        ..alice.clone()
    };
    let mut on_a = a.ws(chat, &alice.token, None).await;
    let mut on_b = b.ws(chat, &alice.token, None).await;
    let mut others = b.ws(chat, &other.token, None).await;
    assert_eq!(b.me_status(&alice.token).await, StatusCode::OK);

    let (status, body) = a.post("/api/logout/", &alice.token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(closed_with(&mut on_a, 2).await, Some(4401));
    assert_eq!(closed_with(&mut on_b, 2).await, Some(4401));
    assert_eq!(b.me_status(&alice.token).await, StatusCode::UNAUTHORIZED);

    b.send_ok(&other, chat, "still here").await;
    let (event, _) = event_of(&mut others, "user_message", 5).await;
    assert_eq!(event["message"]["content"], "still here");

    let (status, body) = b.post("/api/logout/all/", &other.token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(closed_with(&mut others, 2).await, Some(4401));
    assert_eq!(a.me_status(&other.token).await, StatusCode::UNAUTHORIZED);
    let (status, _) = a.call(Method::POST, "/api/logout/all/", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    b.cleanup().await;
    a.cleanup().await;
}

/// A revocation that never reached an instance (published while Redis was unreachable, or
/// lost while the instance's subscription reconnected; here the session is simply deleted
/// from the database, and nothing is published) still ends the session's socket: at its next
/// ping the socket finds the session gone, and closes with 4401.
#[tokio::test]
async fn a_socket_whose_revocation_was_lost_is_closed_at_its_next_ping() {
    let app = spawn_app_with_flags(&["--session-cache-secs", "0", "--ws-ping-secs", "1"]).await;
    let (bob, chat) = app.user_with_ai_chat("bob").await;
    let mut socket = app.ws(chat, &bob.token, None).await;
    sqlx::query("delete from sessions where user_id = $1")
        .bind(bob.id)
        .execute(&app.db)
        .await
        .expect("delete the session");
    assert_eq!(closed_with(&mut socket, 5).await, Some(4401));
    app.cleanup().await;
}

/// Item 8: a socket does not outlive its session: it is closed (4401) when the session
/// expires, though the client keeps answering pings.
#[tokio::test]
async fn a_socket_is_closed_when_its_session_expires() {
    // No session cache: the socket must read the expiry this test writes into the database.
    let app = spawn_app_with_flags(&["--session-cache-secs", "0"]).await;
    let (bob, chat) = app.user_with_ai_chat("bob").await;
    app.expire_sessions_in(bob.id, 2).await;
    let mut ws = app.ws(chat, &bob.token, None).await;
    assert_eq!(closed_with(&mut ws, 10).await, Some(4401));
    app.cleanup().await;
}

/// Item 8: `aichat-api revoke-sessions --username` ends every session of that user, for
/// operators: the API instance's sockets close (4401) and the token is refused.
#[tokio::test]
async fn the_operator_command_revokes_every_session_of_a_user() {
    let (app, carol, chat) = app_with_ai_chat("carol").await;
    let dave = app.user("dave").await;
    let mut ws = app.ws(chat, &carol.token, None).await;
    let revoke = |username: &str| {
        let mut command = api_command(&app);
        command.args(["revoke-sessions", "--username", username]);
        async move { command.status().await.expect("run the command").success() }
    };
    assert!(revoke("carol").await);
    assert_eq!(closed_with(&mut ws, 2).await, Some(4401));
    assert_eq!(app.me_status(&carol.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.me_status(&dave.token).await, StatusCode::OK);
    assert!(!revoke("nobody").await, "an unknown user is an error");
    app.cleanup().await;
}
