//! Fault 13: exactly one reply per (question, regeneration). A regeneration moves the question
//! back to `queued` and its `reply_version` on by one; the reply is saved with that version
//! under the unique `(reply_to, version)` index, becomes the active one, and the earlier replies
//! stay as they were. Whatever races it (repeats of the request, with or without an
//! `Idempotency-Key`), kills the worker answering it, or writes the same chat meanwhile (sends,
//! edits, other regenerations), each regeneration ends with exactly one new reply, the model is
//! asked once for it (again only when a worker died before saving it), and the chat's active
//! path stays one chain.
//!
//! The parts: `regenerate` (ten regenerations at once), `worker_death` (the worker answering a
//! regeneration dies), `races` (sends, edits and regenerations racing in one chat) and
//! `branch_switch` (a reply saved while a branch switch holds the chat); this module holds how
//! they read a chat's versions and check its active path.
mod branch_switch;
mod races;
mod regenerate;
mod worker_death;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aichat_fake_llm::RecordedRequest;
use aichat_faults::{
    Answer, Api, Client, Env, EventCounter, User, WsCollector, eventually, ws_connect,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const STILL_WAITING: &str = "This message is still waiting for its reply";

// ---------------------------------------------------------------------------------------------
// Reading a chat's versions

/// `POST /api/ai/messages/{id}/regenerate/` as `user`, with `key` as its `Idempotency-Key`.
async fn regenerate(
    client: &Client,
    user: &User,
    id: i64,
    key: Option<&str>,
) -> Result<Answer, reqwest::Error> {
    let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
    let path = format!("/api/ai/messages/{id}/regenerate/");
    client
        .try_call(
            Method::POST,
            &path,
            Some(&user.token),
            Some(json!({})),
            &headers,
        )
        .await
}

/// Every version of every turn of `chat` (`?all=true`), oldest first.
async fn all_messages(client: &Client, user: &User, chat: i64) -> Vec<Value> {
    list(
        client,
        user,
        &format!("/api/ai/chats/{chat}/messages/?all=true"),
    )
    .await
}

/// The active path of `chat`: what its user sees.
async fn active_path(client: &Client, user: &User, chat: i64) -> Vec<Value> {
    list(client, user, &format!("/api/ai/chats/{chat}/messages/")).await
}

async fn list(client: &Client, user: &User, path: &str) -> Vec<Value> {
    let answer = client.get(path, &user.token).await;
    assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.body);
    answer.body.as_array().expect("a list of messages").clone()
}

/// The message `id` of `messages`.
fn find(messages: &[Value], id: i64) -> &Value {
    messages
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("message {id} is not in {messages:?}"))
}

/// The replies to `question` among `messages`, by version.
fn replies_of(messages: &[Value], question: i64) -> Vec<Value> {
    let mut replies: Vec<Value> = messages
        .iter()
        .filter(|m| m["reply_to"] == question)
        .cloned()
        .collect();
    replies.sort_by_key(|r| r["version"].as_i64());
    replies
}

/// Waits (through the API) until `question` is answered and has a reply of `version`; its
/// replies then.
async fn answered_with_version(
    client: &Client,
    user: &User,
    chat: i64,
    question: i64,
    version: i64,
) -> Vec<Value> {
    eventually(
        Duration::from_secs(30),
        &format!("reply version {version} of message {question}"),
        || async {
            let messages = all_messages(client, user, chat).await;
            let replies = replies_of(&messages, question);
            let answered = find(&messages, question)["status"] == "answered";
            (answered && replies.iter().any(|r| r["version"] == version)).then_some(replies)
        },
    )
    .await
}

/// The question's hidden `reply_version`: how many regenerations it went through, plus one.
async fn reply_version(env: &Env, question: i64) -> i32 {
    sqlx::query_scalar("select reply_version from ai_messages where id = $1")
        .bind(question)
        .fetch_one(&env.pool)
        .await
        .expect("read reply_version")
}

/// The model calls whose last message is `content`: the calls made to answer that question.
fn calls_for(env: &Env, content: &str) -> Vec<RecordedRequest> {
    env.fake
        .requests()
        .into_iter()
        .filter(|r| r.messages.last().is_some_and(|m| m["content"] == content))
        .collect()
}

/// Insists that `replies` are the untouched first reply `v1` (only its `active` turned false)
/// and one active second version: exactly one new reply, and no third.
fn assert_one_new_reply(replies: &[Value], v1: &Value) {
    assert_eq!(
        replies.len(),
        2,
        "v1 and exactly one new reply: {replies:?}"
    );
    let mut kept = v1.clone();
    kept["active"] = json!(false);
    assert_eq!(replies[0], kept, "the first reply changed");
    let v2 = &replies[1];
    assert_eq!(
        (
            &v2["version"],
            &v2["active"],
            &v2["reply_to"],
            &v2["parent_id"]
        ),
        (&json!(2), &json!(true), &v1["reply_to"], &v1["reply_to"]),
        "{v2}"
    );
    assert!(v2["id"].as_i64() > v1["id"].as_i64(), "{v2}");
}

/// One answered question in a chat of alice's, watched by a socket.
struct Answered {
    alice: User,
    chat: i64,
    question: i64,
    content: String,
    /// Its one reply, as `?all=true` lists it.
    v1: Value,
    socket: WsCollector,
    /// Counts the namespace's events from the moment the first reply was announced.
    events: EventCounter,
}

/// Sends `content` as alice and waits until it is answered and the answer announced (a worker
/// must be running).
async fn answered_question(api: &Api, client: &Client, env: &Env, content: &str) -> Answered {
    let alice = client.user("alice").await;
    let chat = client.ai_chat(&alice, "versions").await;
    let socket = WsCollector::start(ws_connect(api, chat, &alice.token).await);
    let question = client.send_ok(&alice, chat, content).await;
    socket
        .reply_to(question, Duration::from_secs(30), "the first reply")
        .await;
    // The first reply was published before this subscribes: the counter sees only what follows.
    let events = env.event_counter().await;
    let replies = answered_with_version(client, &alice, chat, question, 1).await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    Answered {
        alice,
        chat,
        question,
        content: content.to_owned(),
        v1: replies[0].clone(),
        socket,
        events,
    }
}

/// Waits until the socket has shown the question's second reply.
async fn wait_for_v2_announced(q: &Answered) {
    q.socket
        .wait_for(Duration::from_secs(30), "v2 announced", |e| {
            e["type"] == "assistant_message"
                && e["message"]["reply_to"] == q.question
                && e["message"]["version"] == 2
        })
        .await;
}

// ---------------------------------------------------------------------------------------------
// The active path, checked

/// What breaks the active path `path` being one chain: its user messages each follow the one
/// before (the first follows nothing), each of its replies answers one of them, each question
/// shows at most one reply, and exactly one once it is answered.
fn chain_problems(path: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let questions: Vec<&Value> = path.iter().filter(|m| m["role"] == "user").collect();
    let mut previous = Value::Null;
    for question in &questions {
        if question["parent_id"] != previous || question["active"] != true {
            problems.push(format!(
                "message {} (parent {}, active {}) follows {previous} on the path",
                question["id"], question["parent_id"], question["active"]
            ));
        }
        previous = question["id"].clone();
    }
    let on_path: HashSet<i64> = questions.iter().filter_map(|q| q["id"].as_i64()).collect();
    let mut shown: HashMap<i64, usize> = HashMap::new();
    for reply in path.iter().filter(|m| m["role"] == "assistant") {
        let question = reply["reply_to"].as_i64().unwrap_or(0);
        if reply["parent_id"] != reply["reply_to"] || !on_path.contains(&question) {
            problems.push(format!(
                "reply {} answers {question}, off the path",
                reply["id"]
            ));
        }
        *shown.entry(question).or_default() += 1;
    }
    for question in &questions {
        let id = question["id"].as_i64().unwrap_or(0);
        let n = shown.get(&id).copied().unwrap_or(0);
        if n > 1 || (question["status"] == "answered" && n != 1) {
            problems.push(format!(
                "{} question {id} shows {n} replies",
                question["status"]
            ));
        }
    }
    problems
}

/// The chat's messages one a line (id, role, parent, version, active, status, content): what
/// a failed check shows.
fn tree(all: &[Value]) -> String {
    all.iter()
        .map(|m| {
            format!(
                "{} {} parent={} v{} active={} {} {:?}",
                m["id"],
                m["role"],
                m["parent_id"],
                m["version"],
                m["active"],
                m["status"],
                m["content"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(40)
                    .collect::<String>()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
