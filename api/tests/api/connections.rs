//! Clients that hold connections (SECURITY.md item 10): slow headers and slow bodies are cut
//! off, connections and each user's sockets are capped, and a client that stops reading loses
//! its connection and gives its place back.
use crate::common;

use std::time::{Duration, Instant};

use common::{flags, send_path, spawn_app_with_flags, upgrade};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain TCP connection to `app`, for requests no HTTP client would send.
async fn connect(app: &common::TestApp) -> tokio::net::TcpStream {
    let addr = app.base.trim_start_matches("http://");
    tokio::net::TcpStream::connect(addr).await.expect("connect")
}

/// Headers must be in within 1 s, and a whole request within 1 s.
const SHORT_TIMEOUTS: &str = "--header-read-timeout-secs 1 --request-timeout-secs 1";

/// Item 10: a client that never finishes its headers is cut off after
/// `HEADER_READ_TIMEOUT_SECS` (hyper's timeout needs a timer, which the server now has), and
/// one whose request (its body included) runs past `REQUEST_TIMEOUT_SECS` gets 503 with
/// `Retry-After`, while `send_message?wait` may wait its own time.
#[tokio::test]
async fn slow_headers_are_cut_off_and_slow_requests_answered_503() {
    let app = spawn_app_with_flags(&flags(SHORT_TIMEOUTS)).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    // Everything the server answers until it closes the connection (at most 10 s).
    let answer_to = |request: String| {
        let app = &app;
        async move {
            let mut stream = connect(app).await;
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
                .await
                .expect("the server closes the connection in time")
                .expect("read");
            String::from_utf8_lossy(&answer).into_owned()
        }
    };

    let started = Instant::now();
    let answer = answer_to("GET /healthz HTTP/1.1\r\nHost: x\r\n".to_owned()).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    let slow_body = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"content\"",
        send_path(chat),
        alice.token
    );
    let answer = answer_to(slow_body).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("took too long"), "{answer}");

    // No worker runs: the wait ends after its 2 s with 202, past the 1 s request timeout.
    let (status, body) = app.send_waiting(&alice, chat, "hi", "2").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    app.cleanup().await;
}

/// Four connections at most, two sockets per user.
const FOUR_PLACES: &str = "--max-connections 4 --max-sockets-per-user 2";

/// Item 10: connections are capped (a WebSocket keeps its place until it closes): past
/// `MAX_CONNECTIONS` a new connection is answered 503 with `Retry-After`; and a user has at
/// most `MAX_SOCKETS_PER_USER` sockets on an instance: the next upgrade is 429, before any
/// upgrade, while other users are unaffected.
#[tokio::test]
async fn connections_and_each_users_sockets_are_capped() {
    let app = spawn_app_with_flags(&flags(FOUR_PLACES)).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let (bob, bobs) = app.user_with_ai_chat("bob").await;
    let first = app.ws(chat, &alice.token, None).await;
    let _second = app.ws(chat, &alice.token, None).await;
    let third = app.ws_url(&format!("/ws/ai-chat/{chat}/?token={}", alice.token));
    let (status, headers) = upgrade(&third, &[]).await;
    assert_eq!(status, 429, "a third socket of alice's");
    assert!(headers.contains_key("retry-after"));
    let _bobs = app.ws(bobs, &bob.token, None).await;

    // The test's pooled connection and three sockets hold the four places: a new connection
    // is refused.
    let answer = app.on_a_new_connection("/healthz").await.expect("answered");
    assert_eq!(answer.header("retry-after"), "1");
    let error = answer.error("5th", StatusCode::SERVICE_UNAVAILABLE);
    assert!(error.contains("Too many connections"), "{error}");

    // A socket that closes gives its place (and alice's) back.
    drop(first);
    assert!(
        app.a_new_connection_is_answered(Duration::from_secs(10))
            .await,
        "the place was never freed"
    );
    app.cleanup().await;
}

/// Two connections at most, a request timeout of 1 s and a header timeout of a minute.
const TWO_PLACES: &str =
    "--request-timeout-secs 1 --max-connections 2 --header-read-timeout-secs 60";

/// Item 10: a client that stops reading its answers cannot hold its connection: a write that
/// stays blocked longer than the request timeout drops the connection, and its place under
/// `MAX_CONNECTIONS` is free again.
#[tokio::test]
async fn a_client_that_stops_reading_loses_its_connection() {
    // Idle connections are not closed by the header timeout within the test.
    let app = spawn_app_with_flags(&flags(TWO_PLACES)).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    // About a megabyte a page.
    app.insert_messages(chat, 1000, 1000).await;
    let mut stuck = connect(&app).await;
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
    let status = app.on_a_new_connection("/healthz").await.map(|a| a.status);
    assert!(
        matches!(status, Ok(StatusCode::SERVICE_UNAVAILABLE)),
        "{status:?}"
    );
    let freed = app
        .a_new_connection_is_answered(Duration::from_secs(15))
        .await;
    assert!(freed, "the stuck connection kept its place");
    drop(stuck);
    app.cleanup().await;
}
