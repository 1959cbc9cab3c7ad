//! What the operator decides and keeps (SECURITY.md): which models run up the bill, how many
//! people a chat holds and what they see of each other, who becomes staff (`create-admin`),
//! and logs that hold no user's text.
use crate::common;

use common::{api_command, app_with_users, id, send_path, spawn_app_with_flags};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn a_chat_has_at_most_max_chat_participants_the_creator_included() {
    let app = spawn_app_with_flags(&["--max-chat-participants", "3"]).await;
    let alice = app.user("alice").await;
    let others = app
        .users(["bob", "carol", "dave"])
        .await
        .map(|user| user.id);
    let crowd = json!({"name": "crowd", "participant_ids": others});
    let (status, errors) = app.post("/api/chats/", &alice.token, crowd).await;
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
    let chats = app.list("/api/chats/", &alice.token).await;
    assert_eq!(chats.len(), 1, "nothing stored for the refused one");
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
    let listed: Vec<(&Value, &Value)> = models
        .as_array()
        .expect("a list")
        .iter()
        .map(|m| (&m["id"], &m["default"]))
        .collect();
    assert_eq!(
        listed,
        [
            (&json!("gpt-test"), &json!(true)),
            (&json!("gpt-4o-mini"), &json!(false))
        ]
    );

    let chat = app
        .create_ai_chat(&alice, json!({"title": "t", "model": "gpt-4o-mini"}))
        .await;
    assert_eq!(chat["model"], "gpt-4o-mini");
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
    let path = format!("/api/ai/chats/{}/", id(&chat));
    app.assert_field_errors(
        Method::PATCH,
        &path,
        &alice.token,
        &[(json!({"model": "o1"}), "model")],
    )
    .await;
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

/// Item 11: `create-admin` takes the password from `ADMIN_PASSWORD` only and makes an existing
/// user staff only when told to with `--promote-existing`.
#[tokio::test]
async fn create_admin_takes_the_password_from_the_environment_and_promotes_only_when_told() {
    let (app, [eve]) = app_with_users(["eve"]).await;
    let run = |args: &[&str], password: Option<&str>| {
        let mut command = api_command(&app);
        command
            .arg("create-admin")
            .args(args)
            .env_remove("ADMIN_PASSWORD");
        if let Some(password) = password {
            command.env("ADMIN_PASSWORD", password);
        }
        async move { command.status().await.expect("run create-admin").success() }
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
    assert!(!run(&["--username", "eve"], Some("unused password 1")).await);
    assert!(
        !is_staff("eve").await,
        "an existing user is not promoted unasked"
    );
    assert!(run(&["--username", "eve", "--promote-existing"], None).await);
    assert!(is_staff("eve").await);
    assert_eq!(app.get("/api/me/", &eve.token).await.1["is_staff"], true);

    assert!(
        !run(
            &["--username", "root", "--password", "on the command line"],
            None
        )
        .await,
        "no password flag"
    );
    assert!(
        !run(&["--username", "root"], None).await,
        "no password at all"
    );
    assert!(run(&["--username", "root"], Some("root's long password")).await);
    let (status, body) = app.login("root", "root's long password").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["is_staff"], true, "{body}");
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
    let client = aichat_testkit::Client::for_base(&api.base, std::time::Duration::from_secs(30));
    let mut tokens = Vec::new();
    for (name, email) in [
        ("alice", "alice-hidden@example.com"),
        ("bob", "bob-hidden@example.com"),
    ] {
        let password = "a long enough pass phrase";
        let registration = json!({"username": name, "email": email, "password": password, "password_confirm": password});
        call(&client, Method::POST, "/api/register/", None, registration).await;
        let credentials = json!({"username": name, "password": password});
        let login = call(&client, Method::POST, "/api/login/", None, credentials).await;
        tokens.push(login["token"].as_str().expect("token").to_owned());
    }
    let alice = Some(tokens[0].as_str());
    let chat = json!({"name": "n", "participant_usernames": ["bob"]});
    let chat = id(&call(&client, Method::POST, "/api/chats/", alice, chat).await);
    let ai_chat =
        json!({"title": "t", "system_prompt": "HIDDEN-SYSTEM-PROMPT", "related_chat": chat});
    let ai_chat = id(&call(&client, Method::POST, "/api/ai/chats/", alice, ai_chat).await);
    for (method, path, body) in [
        (
            Method::POST,
            format!("/api/chats/{chat}/send_message/"),
            json!({"content": "HIDDEN-CHAT-LINE"}),
        ),
        (
            Method::PATCH,
            format!("/api/ai/chats/{ai_chat}/"),
            json!({"system_prompt": "HIDDEN-CHANGED-PROMPT"}),
        ),
        (
            Method::POST,
            send_path(ai_chat),
            json!({"content": "HIDDEN-QUESTION"}),
        ),
    ] {
        call(&client, method, &path, alice, body).await;
    }
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

/// A JSON request to the API `client` talks to, which must succeed with the status such a
/// request succeeds with (201 for what creates, 202 for a send to the model, else 200); the
/// answer's body.
async fn call(
    client: &aichat_testkit::Client,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> Value {
    let expected = if path.contains("/ai/chats/") && path.ends_with("/send_message/") {
        StatusCode::ACCEPTED
    } else if method == Method::POST && path != "/api/login/" {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let answer = client.call(method, path, token, Some(body)).await;
    assert_eq!(answer.status, expected, "{path}: {}", answer.body);
    answer.body
}
