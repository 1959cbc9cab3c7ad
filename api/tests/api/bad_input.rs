//! Malformed input of every kind gets a 4xx JSON error, never a 500, and stores nothing.
use crate::common;

use common::{
    Replied, app_with_ai_chat, app_with_users, assert_error, messages_path, send_path, texts,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Sends `body` as it is, with `content_type` when given; the status and the JSON answer
/// (every answer is JSON, an error's too).
async fn raw(
    app: &common::TestApp,
    method: Method,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut request = app.request(method, path).bearer_auth(token).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let reply = request.reply().await;
    (reply.status, reply.expect_json())
}

#[tokio::test]
async fn malformed_bodies_are_4xx_json_errors_and_change_nothing() {
    let (app, alice, ai) = app_with_ai_chat("alice").await;
    let send = send_path(ai);
    let json_ct = Some("application/json");
    let post = Method::POST;
    // Bodies that are not what their route reads: 400.
    let bad_bodies: [(&str, &[u8]); 11] = [
        (&send, b"{not json"),
        (&send, b""),
        (&send, b"\"just a string\""),
        (&send, b"{\"content\": [1,2]}"),
        (
            &send,
            b"{\"content\": \"hi\", \"context_message_limit\": 1e99}",
        ),
        (
            &send,
            b"{\"content\": \"hi\", \"context_message_limit\": 99999999999999999999}",
        ),
        (&send, &[0xff, 0xfe, 0x00]),
        ("/api/ai/chats/", b"{\"title\": null}"),
        (
            "/api/ai/chats/",
            b"{\"title\": \"t\", \"related_chat\": \"1\"}",
        ),
        (
            "/api/ai/chats/",
            b"{\"title\": \"t\", \"related_chat\": -1}",
        ),
        (
            "/api/chats/",
            b"{\"name\": \"n\", \"participant_ids\": [1.5]}",
        ),
    ];
    // Bodies that say they are not JSON, or say nothing: 415.
    let other_types: [(Option<&str>, &[u8]); 3] = [
        (Some("text/plain"), b"{\"content\": \"hi\"}"),
        (None, b"{\"content\": \"hi\"}"),
        (Some("application/x-www-form-urlencoded"), b"content=hi"),
    ];
    let cases = bad_bodies
        .iter()
        .map(|(path, body)| (*path, json_ct, *body, StatusCode::BAD_REQUEST))
        .chain(other_types.iter().map(|(ct, body)| {
            (
                send.as_str(),
                *ct,
                *body,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            )
        }));
    for (path, ct, body, expected) in cases {
        let shown = String::from_utf8_lossy(body).into_owned();
        let (status, error) = raw(&app, post.clone(), path, &alice.token, ct, body.to_vec()).await;
        assert_eq!(status, expected, "{path} {ct:?} {shown}: {error}");
        assert!(
            error.is_object() && !error.as_object().unwrap().is_empty(),
            "{error}"
        );
    }

    // A body over 1 MiB is 413.
    let big = serde_json::to_vec(&json!({"content": "x".repeat(1024 * 1024 + 10)})).unwrap();
    let (status, error) = raw(&app, post.clone(), &send, &alice.token, json_ct, big).await;
    assert_error("1 MiB", (status, &error), StatusCode::PAYLOAD_TOO_LARGE);

    assert!(app.my_messages(&alice).await.is_empty());
    assert_eq!(app.list("/api/ai/chats/", &alice.token).await.len(), 1);
    assert!(app.list("/api/chats/", &alice.token).await.is_empty());
    assert!(app.queued_jobs().await.is_empty());
    app.cleanup().await;
}

/// A body that is JSON but not an object is 400 on every route that takes a body, and stores
/// nothing: serde would read an array as a struct's fields in order, so `["mallory", pw, pw]`
/// would register mallory and `["hello"]` would send "hello".
#[tokio::test]
async fn bodies_that_are_not_json_objects_are_400_on_every_route_and_store_nothing() {
    let (app, alice, ai) = app_with_ai_chat("alice").await;
    let chat = app.create_chat(&alice, "c", &[]).await;
    let password = "a long enough password";
    let routes = [
        (Method::POST, "/api/register/".to_owned()),
        (Method::POST, "/api/login/".to_owned()),
        (Method::POST, "/api/chats/".to_owned()),
        (Method::POST, format!("/api/chats/{chat}/send_message/")),
        (Method::POST, "/api/ai/chats/".to_owned()),
        (Method::PATCH, format!("/api/ai/chats/{ai}/")),
        (Method::PUT, format!("/api/ai/chats/{ai}/")),
        (Method::POST, send_path(ai)),
    ];
    let bodies = [
        json!(["mallory", password, password]),
        json!(["hello"]),
        json!([]),
        json!("hello"),
        json!(42),
        json!(-1.5),
        Value::Null,
        json!(true),
        json!(false),
    ];
    for (method, path) in &routes {
        for body in &bodies {
            let bytes = serde_json::to_vec(body).unwrap();
            let json_ct = Some("application/json");
            let (status, error) =
                raw(&app, method.clone(), path, &alice.token, json_ct, bytes).await;
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{method} {path} {body}: {error}"
            );
            assert_eq!(
                error,
                json!({"error": "Invalid data: expected a JSON object"}),
                "{method} {path} {body}"
            );
        }
    }
    // Whitespace before the object is still an object.
    let spaced = b" \n\t{\"content\": \"spaced\"}".to_vec();
    let json_ct = Some("application/json");
    let (status, _) = raw(
        &app,
        Method::POST,
        &send_path(ai),
        &alice.token,
        json_ct,
        spaced,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let messages = app.my_messages(&alice).await;
    assert_eq!(texts(&messages, "content"), ["spaced"]);
    let chat_messages = format!("/api/chats/{chat}/messages/");
    assert!(app.list(&chat_messages, &alice.token).await.is_empty());
    let (_, ai_chat) = app.get(&format!("/api/ai/chats/{ai}/"), &alice.token).await;
    assert_eq!(ai_chat["title"], "t");
    assert_eq!(app.list("/api/chats/", &alice.token).await.len(), 1);
    let (status, _) = app.login("mallory", password).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "mallory was registered");
    app.cleanup().await;
}

#[tokio::test]
async fn unknown_and_out_of_range_ids_are_404() {
    let (app, [alice]) = app_with_users(["alice"]).await;
    for id in [
        "0",
        "-1",
        "999999",
        "99999999999999999999999",
        "abc",
        "1.5",
        "%00",
    ] {
        for path in [
            format!("/api/ai/chats/{id}/"),
            format!("/api/ai/chats/{id}/messages/"),
            format!("/api/ai/messages/{id}/"),
            format!("/api/chats/{id}/"),
        ] {
            let (status, body) = app.get(&path, &alice.token).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
            assert_eq!(body, json!({"error": "Not found."}), "{path}");
        }
        let send = format!("/api/ai/chats/{id}/send_message/");
        let (status, _) = app.post(&send, &alice.token, json!({"content": "x"})).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let (status, body) = app.get("/api/no-such-route/", &alice.token).await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, json!({"error": "Not found."}))
    );
    let (status, body) = app.delete("/api/me/", &alice.token).await;
    assert_error("DELETE", (status, &body), StatusCode::METHOD_NOT_ALLOWED);
    app.cleanup().await;
}

#[tokio::test]
async fn a_value_of_the_wrong_type_is_named_with_its_field_and_the_json_type_expected() {
    let (app, alice, ai) = app_with_ai_chat("alice").await;
    let send = send_path(ai);
    let cases = [
        (
            send.as_str(),
            json!({"content": 5}),
            json!({"content": ["Expected a string, got an integer."]}),
        ),
        (
            send.as_str(),
            json!({"content": "hi", "include_related_chat_context": "yes"}),
            json!({"include_related_chat_context": ["Expected true or false, got a string."]}),
        ),
        (
            send.as_str(),
            json!({"content": ["hi"]}),
            json!({"content": ["Expected a string, got an array."]}),
        ),
        (
            "/api/ai/chats/",
            json!({"title": {"text": "t"}}),
            json!({"title": ["Expected a string, got an object."]}),
        ),
        (
            "/api/chats/",
            json!({"name": "n", "participant_ids": [1, "bob"]}),
            json!({"participant_ids[1]": ["Expected an integer, got a string."]}),
        ),
    ];
    for (path, body, expected) in cases {
        let (status, answer) = app.post(path, &alice.token, body.clone()).await;
        assert_eq!(
            (status, &answer),
            (StatusCode::BAD_REQUEST, &expected),
            "{path} {body}"
        );
        let text = answer.to_string();
        for rust in ["struct", "i64", "u32", "bool", "Vec", "Request"] {
            assert!(!text.contains(rust), "{path} {body}: {text}");
        }
    }
    assert!(app.messages(&alice, ai).await.is_empty(), "nothing stored");
    app.cleanup().await;
}

#[tokio::test]
async fn a_path_without_its_trailing_slash_is_redirected_or_named() {
    let (app, alice, ai) = app_with_ai_chat("alice").await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // GET and HEAD: a permanent redirect that keeps the method and the query.
    for (method, path, location) in [
        (
            Method::GET,
            "/api/chats".to_string(),
            "/api/chats/".to_string(),
        ),
        (
            Method::GET,
            format!("/api/ai/chats/{ai}/messages?limit=5"),
            format!("{}?limit=5", messages_path(ai)),
        ),
        (Method::HEAD, "/api/me".to_string(), "/api/me/".to_string()),
    ] {
        let response = client
            .request(method.clone(), app.url(&path))
            .bearer_auth(&alice.token)
            .reply()
            .await;
        assert_eq!(
            response.status,
            StatusCode::PERMANENT_REDIRECT,
            "{method} {path}"
        );
        assert_eq!(response.header("location"), location);
    }
    // Following it gets the page.
    let (status, _) = app.get("/api/ai/chats", &alice.token).await;
    assert_eq!(status, StatusCode::OK);
    // Other methods: a JSON 404 that names the slashed path; nothing is created.
    let (status, body) = app
        .post("/api/ai/chats", &alice.token, json!({"title": "no slash"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"error": "Not found. Every path of this API ends with a slash: /api/ai/chats/"})
    );
    assert_eq!(app.list("/api/ai/chats/", &alice.token).await.len(), 1);
    // A path that is no route with or without the slash stays a plain 404.
    for path in ["/api/nothing", "/api/chats/x/y", "/api/nothing/"] {
        let response = client.get(app.url(path)).reply().await;
        assert_eq!(response.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            response.expect_json(),
            json!({"error": "Not found."}),
            "{path}"
        );
    }
    app.cleanup().await;
}
