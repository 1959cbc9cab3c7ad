//! Malformed input of every kind gets a 4xx JSON error, never a 500, and stores nothing.
use crate::common;

use common::spawn_app;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn raw(
    app: &common::TestApp,
    method: reqwest::Method,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = app
        .client
        .request(method, app.url(path))
        .bearer_auth(token)
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {status} {text}")),
    )
}

#[tokio::test]
async fn malformed_bodies_are_4xx_json_errors_and_change_nothing() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let ai = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let send = format!("/api/ai/chats/{ai}/send_message/");
    let json_ct = Some("application/json");
    let post = reqwest::Method::POST;
    let cases: Vec<(&str, Option<&str>, Vec<u8>, StatusCode)> = vec![
        (
            send.as_str(),
            json_ct,
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            send.as_str(),
            json_ct,
            b"".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            send.as_str(),
            json_ct,
            b"\"just a string\"".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            send.as_str(),
            json_ct,
            b"{\"content\": [1,2]}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            send.as_str(),
            json_ct,
            b"{\"content\": \"hi\", \"context_message_limit\": 1e99}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            send.as_str(),
            json_ct,
            b"{\"content\": \"hi\", \"context_message_limit\": 99999999999999999999}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            send.as_str(),
            json_ct,
            vec![0xff, 0xfe, 0x00],
            StatusCode::BAD_REQUEST,
        ),
        (
            send.as_str(),
            Some("text/plain"),
            b"{\"content\": \"hi\"}".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            send.as_str(),
            None,
            b"{\"content\": \"hi\"}".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            send.as_str(),
            Some("application/x-www-form-urlencoded"),
            b"content=hi".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "/api/ai/chats/",
            json_ct,
            b"{\"title\": null}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/ai/chats/",
            json_ct,
            b"{\"title\": \"t\", \"related_chat\": \"1\"}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/ai/chats/",
            json_ct,
            b"{\"title\": \"t\", \"related_chat\": -1}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/chats/",
            json_ct,
            b"{\"name\": \"n\", \"participant_ids\": [1.5]}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (path, ct, body, expected) in cases {
        let shown = String::from_utf8_lossy(&body).into_owned();
        let (status, error) = raw(&app, post.clone(), path, &alice.token, ct, body).await;
        assert_eq!(status, expected, "{path} {ct:?} {shown}: {error}");
        assert!(
            error.is_object() && !error.as_object().unwrap().is_empty(),
            "{error}"
        );
    }

    // A body over 1 MiB is 413.
    let big = serde_json::to_vec(&json!({"content": "x".repeat(1024 * 1024 + 10)})).unwrap();
    let (status, error) = raw(&app, post.clone(), &send, &alice.token, json_ct, big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error["error"].is_string());

    assert_eq!(
        app.get("/api/ai/messages/", &alice.token).await.1,
        json!([])
    );
    assert_eq!(
        app.get("/api/ai/chats/", &alice.token)
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(app.get("/api/chats/", &alice.token).await.1, json!([]));
    assert!(app.queued_jobs().await.is_empty());
    app.cleanup().await;
}

/// A body that is JSON but not an object is 400 on every route that takes a body, and stores
/// nothing: serde would read an array as a struct's fields in order, so `["mallory", pw, pw]`
/// would register mallory and `["hello"]` would send "hello".
#[tokio::test]
async fn bodies_that_are_not_json_objects_are_400_on_every_route_and_store_nothing() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let ai = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let chat = app.create_chat(&alice, "c", &[]).await;
    let password = "a long enough password";
    let routes = [
        (reqwest::Method::POST, "/api/register/".to_owned()),
        (reqwest::Method::POST, "/api/login/".to_owned()),
        (reqwest::Method::POST, "/api/chats/".to_owned()),
        (
            reqwest::Method::POST,
            format!("/api/chats/{chat}/send_message/"),
        ),
        (reqwest::Method::POST, "/api/ai/chats/".to_owned()),
        (reqwest::Method::PATCH, format!("/api/ai/chats/{ai}/")),
        (reqwest::Method::PUT, format!("/api/ai/chats/{ai}/")),
        (
            reqwest::Method::POST,
            format!("/api/ai/chats/{ai}/send_message/"),
        ),
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
            let (status, error) = raw(
                &app,
                method.clone(),
                path,
                &alice.token,
                Some("application/json"),
                bytes,
            )
            .await;
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
    let (status, _) = raw(
        &app,
        reqwest::Method::POST,
        &format!("/api/ai/chats/{ai}/send_message/"),
        &alice.token,
        Some("application/json"),
        b" \n\t{\"content\": \"spaced\"}".to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let (_, messages) = app.get("/api/ai/messages/", &alice.token).await;
    let contents: Vec<&Value> = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["content"])
        .collect();
    assert_eq!(contents, [&json!("spaced")]);
    let (_, chat_messages) = app
        .get(&format!("/api/chats/{chat}/messages/"), &alice.token)
        .await;
    assert_eq!(chat_messages, json!([]));
    let (_, ai_chat) = app.get(&format!("/api/ai/chats/{ai}/"), &alice.token).await;
    assert_eq!(ai_chat["title"], "t");
    let (_, chats) = app.get("/api/chats/", &alice.token).await;
    assert_eq!(chats.as_array().unwrap().len(), 1);
    let (status, _) = app.login("mallory", password).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "mallory was registered");
    app.cleanup().await;
}

#[tokio::test]
async fn unknown_and_out_of_range_ids_are_404() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
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
        let (status, _) = app
            .post(
                &format!("/api/ai/chats/{id}/send_message/"),
                &alice.token,
                json!({"content": "x"}),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let (status, body) = app.get("/api/no-such-route/", &alice.token).await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, json!({"error": "Not found."}))
    );
    let (status, body) = app.delete("/api/me/", &alice.token).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body["error"].is_string());
    app.cleanup().await;
}

#[tokio::test]
async fn a_value_of_the_wrong_type_is_named_with_its_field_and_the_json_type_expected() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let ai = app.create_ai_chat(&alice, json!({"title": "t"})).await["id"]
        .as_i64()
        .unwrap();
    let send = format!("/api/ai/chats/{ai}/send_message/");
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
    let (_, messages) = app
        .get(&format!("/api/ai/chats/{ai}/messages/"), &alice.token)
        .await;
    assert_eq!(messages, json!([]), "nothing stored");
    app.cleanup().await;
}

#[tokio::test]
async fn a_path_without_its_trailing_slash_is_redirected_or_named() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let ai = app.ai_chat_id(&alice).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // GET and HEAD: a permanent redirect that keeps the method and the query.
    for (method, path, location) in [
        (
            reqwest::Method::GET,
            "/api/chats".to_string(),
            "/api/chats/".to_string(),
        ),
        (
            reqwest::Method::GET,
            format!("/api/ai/chats/{ai}/messages?limit=5"),
            format!("/api/ai/chats/{ai}/messages/?limit=5"),
        ),
        (
            reqwest::Method::HEAD,
            "/api/me".to_string(),
            "/api/me/".to_string(),
        ),
    ] {
        let response = client
            .request(method.clone(), app.url(&path))
            .bearer_auth(&alice.token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::PERMANENT_REDIRECT,
            "{method} {path}"
        );
        assert_eq!(response.headers()["location"], location.as_str());
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
    let (_, chats) = app.get("/api/ai/chats/", &alice.token).await;
    assert_eq!(chats.as_array().map(Vec::len), Some(1));
    // A path that is no route with or without the slash stays a plain 404.
    for path in ["/api/nothing", "/api/chats/x/y", "/api/nothing/"] {
        let response = client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body, json!({"error": "Not found."}), "{path}");
    }
    app.cleanup().await;
}
