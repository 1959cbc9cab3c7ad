//! Resume: a client that (re)connects while a reply streams gets the text so far and then only
//! what follows (numbered deltas, `assistant_partial`), over WebSocket catch-up on any API
//! instance, over Server-Sent Events, and in REST message lists.
use crate::common;

use std::time::Duration;

use aichat_fake_llm::{FakeConfig, Outcome};
use common::{Stack, TestApp, TestUser, event_of, id, messages_path, next_event};
use reqwest::StatusCode;
use serde_json::Value;

/// Every chunk its own delta, at once.
const FLUSH_AT_ONCE: [&str; 4] = ["--delta-flush-ms", "1", "--delta-flush-chars", "1"];

fn slow_reply(words: usize, chunk_delay_ms: u64) -> FakeConfig {
    FakeConfig {
        reply_words: Some(words),
        chunk_delay_ms,
        ..FakeConfig::default()
    }
}

/// A socket's text of the reply to `message`: its `assistant_partial`, then each delta, whose
/// `seq` must follow the last one applied (nothing missing, nothing repeated).
#[derive(Debug, Default)]
struct Reassembled {
    text: String,
    seq: u64,
    partials: usize,
}

impl Reassembled {
    fn apply(&mut self, event: &Value, message: i64) {
        if event["message_id"] != message {
            return;
        }
        match event["type"].as_str() {
            Some("assistant_partial") => {
                self.partials += 1;
                self.text = event["content"].as_str().unwrap_or_default().to_owned();
                self.seq = event["seq"].as_u64().unwrap_or_default();
            }
            Some("assistant_delta") => {
                let seq = event["seq"].as_u64().unwrap_or_default();
                assert_eq!(seq, self.seq + 1, "deltas follow each other: {event}");
                self.seq = seq;
                self.text
                    .push_str(event["delta"].as_str().unwrap_or_default());
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_socket_reopened_on_another_instance_mid_stream_gets_the_reply_byte_for_byte() {
    const RUNS: usize = 50;
    let a = Stack::start(slow_reply(40, 20), &[], &FLUSH_AT_ONCE).await;
    let b = a.another_instance(&[]).await;
    let alice = a.user("alice").await;
    let chat = a.ai_chat_id(&alice).await;
    for run in 0..RUNS {
        let mut first = a.ws(chat, &alice.token, None).await;
        let question = id(&a.send_ok(&alice, chat, &format!("story {run}")).await);
        let mut deltas = 0;
        while deltas < 10 {
            let event = next_event(&mut first, 10).await;
            if event["type"] == "assistant_delta" {
                deltas += 1;
            }
        }
        drop(first);
        // Reconnected elsewhere, from before the question.
        let mut second = b.ws(chat, &alice.token, Some(question - 1)).await;
        let mut text = Reassembled::default();
        let (reply, before) = event_of(&mut second, "assistant_message", 10).await;
        for event in &before {
            text.apply(event, question);
        }
        assert_eq!(text.partials, 1, "run {run}: one partial: {before:?}");
        assert!(
            text.seq >= 10,
            "run {run}: the partial holds what was streamed"
        );
        assert_eq!(
            text.text,
            reply["message"]["content"].as_str().unwrap_or_default(),
            "run {run}"
        );
    }
    b.cleanup().await;
    a.cleanup().await;
}

/// A socket that caught up in the middle of a reply filters, at the seam, what the catch-up
/// already sent; once the reply is announced, that question's later events are new: its
/// regeneration's `user_message` and every delta of the new reply, from the first, reach the
/// socket.
#[tokio::test]
async fn a_socket_that_caught_up_mid_stream_sees_a_later_regeneration_whole() {
    let stack = Stack::start(slow_reply(30, 20), &[], &FLUSH_AT_ONCE).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let mut first = stack.ws(chat, &alice.token, None).await;
    let question = id(&stack.send_ok(&alice, chat, "a story").await);
    let mut deltas = 0;
    while deltas < 5 {
        if next_event(&mut first, 10).await["type"] == "assistant_delta" {
            deltas += 1;
        }
    }
    drop(first);
    let mut second = stack.ws(chat, &alice.token, Some(question - 1)).await;
    let (reply, before) = event_of(&mut second, "assistant_message", 10).await;
    assert!(
        before.iter().any(|e| e["type"] == "assistant_partial"),
        "caught up mid-stream: {before:?}"
    );
    assert_eq!(reply["message"]["reply_to"], question);

    let (status, body) = stack
        .post(
            &format!("/api/ai/messages/{question}/regenerate/"),
            &alice.token,
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (regenerated, events) = event_of(&mut second, "assistant_message", 30).await;
    assert_eq!(regenerated["message"]["reply_to"], question);
    assert_eq!(regenerated["message"]["version"], 2);
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "user_message" && e["message"]["id"] == question),
        "the regeneration's user_message: {events:?}"
    );
    let mut text = Reassembled::default();
    for event in &events {
        text.apply(event, question);
    }
    assert_eq!(
        text.text,
        regenerated["message"]["content"]
            .as_str()
            .unwrap_or_default(),
        "every delta of the new reply, from the first"
    );
    stack.cleanup().await;
}

#[tokio::test]
async fn a_reply_retried_after_part_of_it_streamed_starts_over_for_its_followers() {
    let stack = Stack::start(slow_reply(30, 10), &[], &FLUSH_AT_ONCE).await;
    // The first call breaks after five words; the retry answers whole.
    stack.fake.push_script([Outcome::Cut { after_chunks: 5 }]);
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let mut ws = stack.ws(chat, &alice.token, None).await;
    let question = id(&stack.send_ok(&alice, chat, "again").await);
    let (reply, events) = event_of(&mut ws, "assistant_message", 30).await;
    let restart = events
        .iter()
        .position(|e| e["type"] == "assistant_partial")
        .expect("the reply started over");
    assert_eq!(events[restart]["content"], "", "{:?}", events[restart]);
    assert_eq!(events[restart]["seq"], 0);
    let before = events[..restart]
        .iter()
        .filter(|e| e["type"] == "assistant_delta")
        .count();
    assert!(
        before >= 1,
        "part of the first attempt streamed: {events:?}"
    );
    let mut text = Reassembled::default();
    for event in &events {
        text.apply(event, question);
    }
    assert_eq!(
        text.text,
        reply["message"]["content"].as_str().unwrap_or_default()
    );
    assert_eq!(stack.fake.requests().len(), 2);
    stack.cleanup().await;
}

#[tokio::test]
async fn a_message_that_failed_while_no_socket_was_open_is_replayed_with_its_error() {
    let stack = Stack::failing().await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (status, _) = stack.send_waiting(&alice, chat, "hello?", "10").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let mut ws = stack.ws(chat, &alice.token, Some(0)).await;
    let sent = next_event(&mut ws, 5).await;
    assert_eq!(sent["type"], "user_message");
    let question = sent["message"]["id"].as_i64().expect("the message");
    let error = next_event(&mut ws, 5).await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["message_id"], question);
    assert!(!error["message"].as_str().unwrap_or_default().is_empty());
    stack.cleanup().await;
}

#[tokio::test]
async fn rest_pollers_see_answering_and_a_growing_partial_until_the_reply_is_saved() {
    let stack = Stack::start(slow_reply(60, 30), &[], &FLUSH_AT_ONCE).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let question = id(&stack.send_ok(&alice, chat, "go").await);
    let question_of = |list: &[Value]| list.iter().find(|m| m["id"] == question).cloned();
    // Polled as a REST client would, until the reply is in the list.
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let list = stack.list(&messages_path(chat), &alice.token).await;
        let asked = question_of(&list).expect("the question");
        if let Some(partial) = asked["partial"].as_str() {
            assert_eq!(asked["status"], "answering");
            seen.push(partial.to_owned());
        }
        if let Some(reply) = list.into_iter().find(|m| m["reply_to"] == question) {
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reply saved in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let content = reply["content"].as_str().unwrap_or_default();
    let growing: Vec<&String> = seen.iter().filter(|p| !p.is_empty()).collect();
    assert!(growing.len() >= 2, "the partial was seen growing: {seen:?}");
    for (earlier, later) in seen.iter().zip(seen.iter().skip(1)) {
        assert!(
            later.starts_with(earlier.as_str()),
            "{earlier:?} then {later:?}"
        );
    }
    assert!(seen.iter().all(|p| content.starts_with(p.as_str())));
    let list = stack.list(&messages_path(chat), &alice.token).await;
    let asked = question_of(&list).expect("the question");
    assert_eq!(asked["status"], "answered");
    assert!(asked.get("partial").is_none(), "{asked}");
    stack.cleanup().await;
}

/// One Server-Sent Event: its `id` and its data as JSON.
#[derive(Debug)]
struct SseEvent {
    id: Option<u64>,
    data: Value,
}

/// Opens the reply stream of `message`, resuming after `last` when given.
async fn open_stream(
    app: &TestApp,
    user: &TestUser,
    message: i64,
    last: Option<u64>,
) -> reqwest::Response {
    let mut request = app
        .client
        .get(app.url(&format!("/api/ai/messages/{message}/stream/")))
        .bearer_auth(&user.token);
    if let Some(last) = last {
        request = request.header("Last-Event-ID", last.to_string());
    }
    let response = request.send().await.expect("the stream");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    response
}

/// Reads events of `response` until `stop` says so or the stream ends; whether it ended.
async fn read_events(
    response: &mut reqwest::Response,
    buffer: &mut String,
    events: &mut Vec<SseEvent>,
    mut stop: impl FnMut(&[SseEvent]) -> bool,
) -> bool {
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut id = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("id:") {
                    id = value.trim().parse().ok();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.strip_prefix(' ').unwrap_or(value));
                }
            }
            if !data.is_empty() {
                let data = serde_json::from_str(&data).expect("JSON data");
                events.push(SseEvent { id, data });
                if stop(events) {
                    return false;
                }
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(15), response.chunk())
            .await
            .expect("the stream moves");
        match chunk.expect("the stream reads") {
            Some(bytes) => buffer.push_str(&String::from_utf8_lossy(&bytes)),
            None => return true,
        }
    }
}

#[tokio::test]
async fn a_reply_streams_over_sse_resumes_after_last_event_id_and_ends() {
    let stack = Stack::start(slow_reply(40, 30), &[], &FLUSH_AT_ONCE).await;
    let alice = stack.user("alice").await;
    let mallory = stack.user("mallory").await;
    let chat = stack.ai_chat_id(&alice).await;
    let question = id(&stack.send_ok(&alice, chat, "stream it").await);

    // The first stream, left after some deltas.
    let mut first = open_stream(&stack, &alice, question, None).await;
    let (mut buffer, mut events) = (String::new(), Vec::new());
    let ended = read_events(&mut first, &mut buffer, &mut events, |events| {
        events
            .iter()
            .filter(|e| e.data["type"] == "assistant_delta")
            .count()
            >= 5
    })
    .await;
    assert!(!ended);
    drop(first);
    let mut text = Reassembled::default();
    for event in &events {
        text.apply(&event.data, question);
        if event.data["type"] == "assistant_delta" {
            assert_eq!(event.id, event.data["seq"].as_u64(), "the id is the seq");
        }
    }
    assert_eq!(events[0].data["type"], "assistant_partial");
    let last = text.seq;

    // Resumed: the next delta is `last + 1`, then the rest, then the reply, then the end.
    let mut second = open_stream(&stack, &alice, question, Some(last)).await;
    let (mut buffer, mut rest) = (String::new(), Vec::new());
    let ended = read_events(&mut second, &mut buffer, &mut rest, |_| false).await;
    assert!(ended, "the stream ends after the reply");
    assert_eq!(
        rest[0].data["seq"].as_u64(),
        Some(last + 1),
        "{:?}",
        rest[0]
    );
    for event in &rest {
        text.apply(&event.data, question);
    }
    let reply = rest.last().expect("events");
    assert_eq!(reply.data["type"], "assistant_message");
    assert_eq!(
        reply.data["message"]["content"].as_str(),
        Some(text.text.as_str())
    );

    // An answered message streams its stored reply and ends.
    let mut again = open_stream(&stack, &alice, question, None).await;
    let (mut buffer, mut stored) = (String::new(), Vec::new());
    assert!(read_events(&mut again, &mut buffer, &mut stored, |_| false).await);
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].data, reply.data);

    // Someone else's message, or a reply's id, is not found.
    for (user, message) in [(&mallory, question), (&alice, id(&reply.data["message"]))] {
        let (status, body) = stack
            .get(&format!("/api/ai/messages/{message}/stream/"), &user.token)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
    let (status, _) = stack
        .get(&format!("/api/ai/messages/{question}/stream/"), "")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    stack.cleanup().await;
}

#[tokio::test]
async fn the_sse_stream_of_a_failed_message_ends_with_its_error() {
    let stack = Stack::failing().await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let question = id(&stack.send_ok(&alice, chat, "fail please").await);
    let mut stream = open_stream(&stack, &alice, question, None).await;
    let (mut buffer, mut events) = (String::new(), Vec::new());
    assert!(read_events(&mut stream, &mut buffer, &mut events, |_| false).await);
    let last = events.last().expect("events");
    assert_eq!(last.data["type"], "error", "{events:?}");
    assert_eq!(last.data["message_id"], question);
    stack.cleanup().await;
}

/// Deleting a chat ends whatever follows it: its sockets get `chat_deleted` and close with
/// 4404, its replies' streams end with `chat_deleted`, and a send waiting for its reply
/// answers 404 at once instead of at the end of its wait.
#[tokio::test]
async fn deleting_a_chat_closes_its_sockets_and_ends_its_streams_and_waits() {
    // No worker: the questions wait.
    let app = common::spawn_app().await;
    let alice = app.user("alice").await;
    let chat = app.ai_chat_id(&alice).await;
    let question = id(&app.send_ok(&alice, chat, "never answered").await);
    let mut ws = app.ws(chat, &alice.token, None).await;
    let mut stream = open_stream(&app, &alice, question, None).await;
    let (mut buffer, mut sse) = (String::new(), Vec::new());
    read_events(&mut stream, &mut buffer, &mut sse, |events| {
        !events.is_empty()
    })
    .await;
    assert_eq!(
        sse[0].data["type"], "assistant_partial",
        "{:?}",
        sse[0].data
    );

    let waiting = {
        let request = app
            .client
            .post(app.url(&format!("{}?wait=60", common::send_path(chat))))
            .bearer_auth(&alice.token)
            .json(&serde_json::json!({"content": "waiting for a reply"}))
            .timeout(Duration::from_secs(30));
        tokio::spawn(async move { request.send().await.map(|r| r.status()) })
    };
    // Stored and waiting once its user_message is out.
    let (stored, _) = event_of(&mut ws, "user_message", 10).await;
    assert_eq!(stored["message"]["content"], "waiting for a reply");

    let (status, body) = app
        .delete(&format!("/api/ai/chats/{chat}/"), &alice.token)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (events, code) = common::ws_events_until_closed(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, Some(4404), "{events:?}");
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some(Value::from("chat_deleted")),
        "{events:?}"
    );
    let ended = read_events(&mut stream, &mut buffer, &mut sse, |_| false).await;
    assert!(ended, "the stream ended");
    let last = &sse.last().expect("an event").data;
    assert_eq!(
        last,
        &serde_json::json!({"type": "chat_deleted", "ai_chat_id": chat})
    );
    let waited = waiting.await.expect("the waiting send").expect("answered");
    assert_eq!(waited, StatusCode::NOT_FOUND);
    app.cleanup().await;
}

/// A user's reply streams are bounded on each instance (`MAX_STREAMS_PER_USER`), as sockets
/// are: at the limit the next is 429 with `Retry-After`, another user's is not held up, and
/// a stream its client closed gives its place back.
#[tokio::test]
async fn a_users_reply_streams_are_bounded_and_a_closed_one_gives_its_place_back() {
    // No worker: the question waits and its streams stay open.
    let app = common::spawn_app_with_flags(&["--max-streams-per-user", "2"]).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.ai_chat_id(&alice).await;
    let question = id(&app.send_ok(&alice, chat, "followed").await);
    let bobs_chat = app.ai_chat_id(&bob).await;
    let bobs_question = id(&app.send_ok(&bob, bobs_chat, "mine").await);
    let first = open_stream(&app, &alice, question, None).await;
    let _second = open_stream(&app, &alice, question, None).await;
    let stream = |user: &TestUser, message: i64| {
        app.client
            .get(app.url(&format!("/api/ai/messages/{message}/stream/")))
            .bearer_auth(&user.token)
            .send()
    };
    let refused = stream(&alice, question).await.expect("answered");
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(
        refused.json::<Value>().await.expect("JSON"),
        serde_json::json!({"error": "Too many open reply streams, close one first"})
    );
    let _bobs = open_stream(&app, &bob, bobs_question, None).await;

    drop(first);
    aichat_testkit::eventually(Duration::from_secs(10), "a place given back", || async {
        let again = stream(&alice, question).await.ok()?;
        (again.status() == StatusCode::OK).then_some(())
    })
    .await;
    app.cleanup().await;
}
