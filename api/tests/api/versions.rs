//! Versions of a conversation: regenerate, edit, switch branches; the prompt is the visible
//! path. The real API, worker and fake model.
use crate::common;

use aichat_fake_llm::FakeConfig;
use common::{
    Replied, Stack, TestApp, TestUser, event_of, id, ids, messages_path, send_ws, spawn_app, texts,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn regenerate_path(message: i64) -> String {
    format!("/api/ai/messages/{message}/regenerate/")
}

fn edit_path(message: i64) -> String {
    format!("/api/ai/messages/{message}/edit/")
}

fn activate_path(message: i64) -> String {
    format!("/api/ai/messages/{message}/activate/")
}

/// Every message of `chat`, every version (`?all=true`).
async fn all_messages(app: &TestApp, user: &TestUser, chat: i64) -> Vec<Value> {
    app.list(&format!("{}?all=true", messages_path(chat)), &user.token)
        .await
}

/// Sends `content` and waits for its reply: (question, reply).
async fn turn(app: &TestApp, user: &TestUser, chat: i64, content: &str) -> (Value, Value) {
    let (status, reply) = app.send_waiting(user, chat, content, "true").await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let question = app
        .messages(user, chat)
        .await
        .into_iter()
        .find(|m| m["id"] == reply["reply_to"])
        .expect("the question of the reply");
    (question, reply)
}

/// Regenerates the reply to message `id` (a question or its reply) and waits for it: the new
/// reply.
async fn regenerated(app: &TestApp, user: &TestUser, id: i64) -> Value {
    let path = format!("{}?wait=true", regenerate_path(id));
    let (status, reply) = app.post(&path, &user.token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    reply
}

/// Makes the branch through `message` the active path, insisting on 200.
async fn activated(app: &TestApp, user: &TestUser, message: i64) {
    let (status, body) = app
        .post(&activate_path(message), &user.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Edits `question` to `content` and waits for the edit's reply: the reply.
async fn edited(app: &TestApp, user: &TestUser, question: i64, content: &str) -> Value {
    let path = format!("{}?wait=true", edit_path(question));
    let (status, reply) = app
        .post(&path, &user.token, json!({"content": content}))
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    reply
}

/// The chat's `message_count` as its list says.
async fn message_count(app: &TestApp, user: &TestUser, chat: i64) -> i64 {
    let (status, body) = app
        .get(&format!("/api/ai/chats/{chat}/"), &user.token)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["message_count"].as_i64().unwrap_or(-1)
}

/// Sends `content`, then regenerates its reply into a different one (three words of lorem):
/// (question, first reply, second reply), the second one shown.
async fn two_replies(
    stack: &Stack,
    user: &TestUser,
    chat: i64,
    content: &str,
) -> (Value, Value, Value) {
    let (question, first) = turn(stack, user, chat, content).await;
    stack.fake.set_config(FakeConfig {
        reply_words: Some(3),
        ..FakeConfig::default()
    });
    let second = regenerated(stack, user, id(&question)).await;
    assert_ne!(second["content"], first["content"]);
    stack.fake.set_config(FakeConfig::default());
    (question, first, second)
}

/// The contents of the messages the model was sent last, system prompt left out.
fn last_prompt(stack: &Stack) -> Vec<String> {
    let requests = stack.fake.requests();
    let last = requests.last().expect("a request reached the model");
    last.messages
        .iter()
        .filter(|m| m["role"] != "system")
        .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn a_regenerated_reply_is_the_next_version_and_the_old_one_is_kept() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (question, first) = turn(&stack, &alice, chat, "hello there").await;
    assert_eq!(first["version"], 1);
    assert_eq!(first["parent_id"], question["id"]);
    assert_eq!(first["active"], true);

    // From the reply's id: a new reply, version 2, saved within the wait.
    let second = regenerated(&stack, &alice, id(&first)).await;
    assert_eq!(second["reply_to"], question["id"]);
    assert_eq!(second["parent_id"], question["id"]);
    assert_eq!(second["version"], 2);
    assert_eq!(second["active"], true);
    assert_ne!(second["id"], first["id"]);

    // What the user sees: the question and the new reply; the old one is kept, off the path.
    let visible = stack.messages(&alice, chat).await;
    assert_eq!(ids(&visible), vec![id(&question), id(&second)]);
    assert_eq!(message_count(&stack, &alice, chat).await, 2);
    let all = all_messages(&stack, &alice, chat).await;
    assert_eq!(ids(&all), vec![id(&question), id(&first), id(&second)]);
    let old = &all[1];
    assert_eq!(old["active"], false);
    for field in [
        "content",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost",
        "currency",
        "version",
    ] {
        assert_eq!(old[field], first[field], "{field} of the old reply");
    }

    // From the question's id, once more: version 3; the question is answered again.
    let third = regenerated(&stack, &alice, id(&question)).await;
    assert_eq!(third["version"], 3);
    let (_, now) = stack
        .get(
            &format!("/api/ai/messages/{}/", id(&question)),
            &alice.token,
        )
        .await;
    assert_eq!(now["status"], "answered");
    let replies: Vec<Value> = all_messages(&stack, &alice, chat)
        .await
        .into_iter()
        .filter(|m| m["reply_to"] == question["id"])
        .collect();
    let active: Vec<bool> = replies
        .iter()
        .map(|m| m["active"].as_bool().unwrap_or_default())
        .collect();
    assert_eq!(active, vec![false, false, true]);
    stack.cleanup().await;
}

#[tokio::test]
async fn an_edit_branches_and_the_model_is_sent_the_visible_path_only() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let mut turns = Vec::new();
    for n in 1..=5 {
        turns.push(turn(&stack, &alice, chat, &format!("question {n}")).await);
    }
    let before: Vec<i64> = ids(&stack.messages(&alice, chat).await);
    assert_eq!(before.len(), 10);

    // Edit the third question: the model gets turns 1-2 and the new text, nothing of 3-5.
    let third = &turns[2].0;
    let (status, reply) = stack
        .post(
            &format!("{}?wait=true", edit_path(id(third))),
            &alice.token,
            json!({"content": "question three, edited"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(
        last_prompt(&stack),
        vec![
            "question 1",
            turns[0].1["content"].as_str().unwrap_or_default(),
            "question 2",
            turns[1].1["content"].as_str().unwrap_or_default(),
            "question three, edited",
        ]
    );

    // The visible path: turns 1-2, the new version and its reply.
    let visible = stack.messages(&alice, chat).await;
    assert_eq!(
        texts(&visible, "content")[..5],
        [
            "question 1".to_owned(),
            turns[0].1["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            "question 2".to_owned(),
            turns[1].1["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            "question three, edited".to_owned(),
        ]
    );
    assert_eq!(visible.len(), 6);
    assert_eq!(message_count(&stack, &alice, chat).await, 6);
    let edited = &visible[4];
    assert_eq!(edited["version"], 2);
    assert_eq!(edited["parent_id"], turns[1].0["id"]);
    assert_eq!(third["parent_id"], turns[1].0["id"]);
    assert_eq!(visible[5]["id"], reply["id"]);

    // The old turns 3-5 are all there, off the path, unchanged.
    let all = all_messages(&stack, &alice, chat).await;
    assert_eq!(all.len(), 12);
    let old: Vec<&Value> = all.iter().filter(|m| before.contains(&id(m))).collect();
    assert_eq!(old.len(), 10);
    for m in &old[4..] {
        assert_eq!(m["active"], false, "{m}");
    }

    // A send follows the edited turn, and its prompt is that branch.
    let (next_question, _) = turn(&stack, &alice, chat, "question 6").await;
    assert_eq!(next_question["parent_id"], edited["id"]);
    let prompt = last_prompt(&stack);
    assert_eq!(prompt.len(), 7);
    assert_eq!(prompt[4], "question three, edited");
    assert_eq!(prompt[6], "question 6");

    // Back to the old branch through its last reply: the original ten messages again.
    let old_last_reply = id(&turns[4].1);
    let (status, body) = stack
        .post(&activate_path(old_last_reply), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], true);
    assert_eq!(ids(&stack.messages(&alice, chat).await), before);
    // …and a send now follows question 5, its prompt the old branch.
    let (after_switch, _) = turn(&stack, &alice, chat, "question 6 again").await;
    assert_eq!(after_switch["parent_id"], turns[4].0["id"]);
    let prompt = last_prompt(&stack);
    assert_eq!(prompt[4], "question 3");
    assert_eq!(prompt[8], "question 5");
    assert_eq!(prompt.len(), 11);

    // Activating the edited question brings its branch back, to its newest end.
    let (status, _) = stack
        .post(&activate_path(id(edited)), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let visible = stack.messages(&alice, chat).await;
    assert_eq!(visible.len(), 8);
    assert_eq!(visible[6]["id"], next_question["id"]);
    stack.cleanup().await;
}

#[tokio::test]
async fn switching_reply_versions_changes_what_the_next_prompt_holds() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (question, first, _) = two_replies(&stack, &alice, chat, "pick a word").await;

    let (status, body) = stack
        .post(&activate_path(id(&first)), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        ids(&stack.messages(&alice, chat).await),
        vec![id(&question), id(&first)]
    );
    turn(&stack, &alice, chat, "and another").await;
    assert_eq!(
        last_prompt(&stack)[..2],
        [
            "pick a word".to_owned(),
            first["content"].as_str().unwrap_or_default().to_owned()
        ]
    );
    stack.cleanup().await;
}

#[tokio::test]
async fn versions_over_the_websocket_carry_parent_and_version() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (question, first) = turn(&stack, &alice, chat, "over the socket").await;
    let mut ws = stack.ws(chat, &alice.token, None).await;

    send_ws(
        &mut ws,
        json!({"type": "regenerate", "message_id": id(&first)}),
    )
    .await;
    let (event, _) = event_of(&mut ws, "assistant_message", 10).await;
    assert_eq!(event["message"]["reply_to"], question["id"]);
    assert_eq!(event["message"]["parent_id"], question["id"]);
    assert_eq!(event["message"]["version"], 2);

    send_ws(
        &mut ws,
        // A send's other fields are not an edit's (as over REST): not checked, not used.
        json!({"type": "edit", "message_id": id(&question), "content": "edited over the socket",
               "context_message_limit": 0}),
    )
    .await;
    let (event, _) = event_of(&mut ws, "user_message", 10).await;
    assert_eq!(event["message"]["content"], "edited over the socket");
    assert_eq!(event["message"]["version"], 2);
    let edited = event["message"]["id"].clone();
    let (event, _) = event_of(&mut ws, "assistant_message", 10).await;
    assert_eq!(event["message"]["reply_to"], edited);
    assert_eq!(event["message"]["version"], 1);

    // A refusal comes back as an error event.
    send_ws(
        &mut ws,
        json!({"type": "edit", "message_id": id(&question), "content": "  "}),
    )
    .await;
    let (event, _) = event_of(&mut ws, "error", 10).await;
    assert!(
        event["message"]
            .as_str()
            .unwrap_or_default()
            .contains("content"),
        "{event}"
    );
    send_ws(&mut ws, json!({"type": "regenerate", "message_id": "x"})).await;
    let (event, _) = event_of(&mut ws, "error", 10).await;
    assert!(
        event["message"]
            .as_str()
            .unwrap_or_default()
            .contains("message_id"),
        "{event}"
    );
    stack.cleanup().await;
}

#[tokio::test]
async fn version_routes_refuse_strangers_waiting_messages_and_bad_bodies() {
    // No worker: a sent message stays queued.
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let mallory = app.user("mallory").await;
    let chat = app.ai_chat_id(&alice).await;
    let waiting = id(&app.send_ok(&alice, chat, "still waiting").await);

    for path in [
        regenerate_path(waiting),
        edit_path(waiting),
        activate_path(waiting),
    ] {
        let body = json!({"content": "x"});
        let (status, _) = app.post(&path, "", body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        let (status, error) = app.post(&path, &mallory.token, body.clone()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {error}");
        assert!(error["error"].is_string(), "{error}");
        let (status, _) = app
            .post(
                &path.replace(&waiting.to_string(), "999999"),
                &alice.token,
                body,
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    // A message that waits for its reply: 409 for a new version of it.
    for path in [regenerate_path(waiting), edit_path(waiting)] {
        let (status, error) = app.post(&path, &alice.token, json!({"content": "x"})).await;
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {error}");
    }
    // Activating it is fine: it is on the path already.
    let (status, body) = app
        .post(&activate_path(waiting), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Bad edits: 400 with the field, and nothing stored.
    for body in [
        json!({}),
        json!({"content": ""}),
        json!({"content": "   "}),
        json!({"content": 5}),
        json!({"content": null}),
        json!({"content": ["a"]}),
        json!({"content": "x".repeat(32_001)}),
    ] {
        let (status, error) = app
            .post(&edit_path(waiting), &alice.token, body.clone())
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {error}");
    }
    for body in [json!([]), json!("text"), json!(3), json!(null), json!(true)] {
        let (status, error) = app
            .post(&edit_path(waiting), &alice.token, body.clone())
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {error}");
        assert!(error["error"].is_string(), "{error}");
    }
    let (status, error) = app
        .post(
            &format!("{}?wait=soon", regenerate_path(waiting)),
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert!(error["wait"].is_array(), "{error}");
    assert_eq!(all_messages(&app, &alice, chat).await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_regenerates_once() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (question, _) = turn(&stack, &alice, chat, "once only").await;
    let path = format!("{}?wait=true", regenerate_path(id(&question)));
    let first = stack
        .post_with_key(&path, &alice.token, "regen-1", "")
        .await;
    assert_eq!(first.0, StatusCode::OK, "{}", first.1);
    let again = stack
        .post_with_key(&path, &alice.token, "regen-1", "")
        .await;
    // The repeat answers the question as it is and queues nothing.
    assert_eq!(again.0, StatusCode::ACCEPTED, "{}", again.1);
    assert_eq!(again.1["message"]["id"], question["id"]);
    assert_eq!(again.1["message"]["status"], "answered");
    let replies = all_messages(&stack, &alice, chat)
        .await
        .into_iter()
        .filter(|m| m["reply_to"] == question["id"])
        .count();
    assert_eq!(replies, 2);
    // The same key for another message is a conflict.
    let (other, _) = turn(&stack, &alice, chat, "another").await;
    let (status, error) = stack
        .post_with_key(&regenerate_path(id(&other)), &alice.token, "regen-1", "")
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{error}");
    stack.cleanup().await;
}

#[tokio::test]
async fn a_branch_shows_again_the_reply_it_showed_when_it_was_left() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (question, first) = turn(&stack, &alice, chat, "first question").await;
    regenerated(&stack, &alice, id(&question)).await;
    // Back to the first reply, then away from the whole branch with an edit.
    activated(&stack, &alice, id(&first)).await;
    edited(&stack, &alice, id(&question), "another first question").await;
    assert!(!ids(&stack.messages(&alice, chat).await).contains(&id(&question)));

    // Coming back through the question: its first reply, as it was left, not the newest.
    activated(&stack, &alice, id(&question)).await;
    assert_eq!(
        ids(&stack.messages(&alice, chat).await),
        vec![id(&question), id(&first)]
    );
    // And a regeneration after that is version 3, the next after both.
    let third = regenerated(&stack, &alice, id(&question)).await;
    assert_eq!(third["version"], 3);
    stack.cleanup().await;
}

#[tokio::test]
async fn other_sockets_hear_of_a_branch_switch_and_of_a_regeneration_they_caught_up_on() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (question, first) = turn(&stack, &alice, chat, "watched").await;
    // A socket that caught up on the answered question and its reply.
    let mut ws = stack.ws(chat, &alice.token, Some(0)).await;
    let (caught_up, _) = event_of(&mut ws, "assistant_message", 10).await;
    assert_eq!(caught_up["message"]["id"], first["id"]);

    // The regeneration is announced to it, the question included.
    let (status, _) = stack
        .post(&regenerate_path(id(&question)), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (event, _) = event_of(&mut ws, "user_message", 10).await;
    assert_eq!(event["message"]["id"], question["id"]);
    let (event, _) = event_of(&mut ws, "assistant_message", 10).await;
    assert_eq!(event["message"]["version"], 2);

    // A switch back to the first reply: the socket is told to read the path again.
    let (status, _) = stack
        .post(&activate_path(id(&first)), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (event, _) = event_of(&mut ws, "active_path_changed", 10).await;
    assert_eq!(event["message_id"], first["id"]);
    stack.cleanup().await;
}

#[tokio::test]
async fn regenerations_and_edits_count_toward_the_send_rate_and_the_budget() {
    let stack = Stack::start(FakeConfig::default(), &["--send-rate-per-minute", "3"], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (question, _) = turn(&stack, &alice, chat, "one").await;
    regenerated(&stack, &alice, id(&question)).await;
    let (status, edited) = stack
        .post(
            &edit_path(id(&question)),
            &alice.token,
            json!({"content": "two"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{edited}");
    // The fourth of the minute, whichever route: 429 with Retry-After, nothing queued.
    for path in [regenerate_path(id(&question)), edit_path(id(&question))] {
        let refused = stack
            .request(reqwest::Method::POST, &path)
            .bearer_auth(&alice.token)
            .json(&json!({"content": "three"}))
            .reply()
            .await;
        let error = refused.error(&path, StatusCode::TOO_MANY_REQUESTS);
        assert!(error.contains("slow down"), "{error}");
        assert!(refused.retry_after().is_some(), "{path}");
    }
    // Stored: the question, its edit (whose reply may be on its way) and two replies to it.
    let all = all_messages(&stack, &alice, chat).await;
    let users = all.iter().filter(|m| m["role"] == "user").count();
    let replies = all
        .iter()
        .filter(|m| m["reply_to"] == question["id"])
        .count();
    assert_eq!((users, replies), (2, 2), "{all:?}");
    stack.cleanup().await;

    // A budget one send fills: after it, a regeneration and an edit are refused for it.
    let budget = [
        "--daily-token-budget",
        "17",
        "--context-token-budget",
        "15",
        "--max-completion-tokens",
        "2",
        "--send-rate-per-minute",
        "0",
    ];
    let stack = Stack::start(FakeConfig::default(), &budget, &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (question, _) = turn(&stack, &alice, chat, "hi").await;
    for path in [regenerate_path(id(&question)), edit_path(id(&question))] {
        let (status, error) = stack
            .post(&path, &alice.token, json!({"content": "again"}))
            .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{path}: {error}");
        assert!(
            error["error"]
                .as_str()
                .unwrap_or_default()
                .contains("budget"),
            "{error}"
        );
    }
    assert_eq!(all_messages(&stack, &alice, chat).await.len(), 2);
    stack.cleanup().await;
}

/// The worker keeps each chat's history in its context cache (Redis) and reads only the turns
/// after it: a branch switch made after the history was cached (no job runs for it) still
/// reaches the next prompt.
#[tokio::test]
async fn a_branch_switch_after_the_history_was_cached_reaches_the_next_prompt() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (_, first, second) = two_replies(&stack, &alice, chat, "pick a word").await;
    // Two more turns: the history before the last one, the regenerated reply in it, is cached.
    turn(&stack, &alice, chat, "two").await;
    turn(&stack, &alice, chat, "three").await;
    assert_eq!(
        last_prompt(&stack)[1],
        second["content"].as_str().unwrap_or_default()
    );

    let (status, body) = stack
        .post(&activate_path(id(&first)), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    turn(&stack, &alice, chat, "four").await;
    let prompt = last_prompt(&stack);
    assert_eq!(
        prompt[..3],
        [
            "pick a word".to_owned(),
            first["content"].as_str().unwrap_or_default().to_owned(),
            "two".to_owned()
        ]
    );
    assert_eq!(prompt.len(), 7, "{prompt:?}");
    stack.cleanup().await;
}

/// The next prompt is built from the cached history (what Redis holds is what the model gets),
/// and from PostgreSQL again once an earlier turn changed.
#[tokio::test]
async fn the_next_prompt_comes_from_the_cached_history_until_an_earlier_turn_changes() {
    use redis::AsyncCommands;

    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (_, first) = turn(&stack, &alice, chat, "question 1").await;
    turn(&stack, &alice, chat, "question 2").await;
    turn(&stack, &alice, chat, "question 3").await;
    // The third job cached the two turns before it.
    let key = stack.keys.history_cache(chat);
    let mut redis = stack.redis().await;
    let cached: String = redis.get(&key).await.expect("the chat's cached history");
    assert!(cached.contains("question 2"), "{cached}");
    let _: () = redis
        .set(&key, cached.replace("question 1", "as cached"))
        .await
        .expect("set");

    turn(&stack, &alice, chat, "question 4").await;
    let prompt = last_prompt(&stack);
    assert_eq!(prompt[0], "as cached", "{prompt:?}");
    assert_eq!(
        prompt[4..],
        [
            "question 3".to_owned(),
            prompt[5].clone(),
            "question 4".to_owned()
        ]
    );

    // Showing the first reply again (it already shows) is a branch switch all the same.
    let (status, body) = stack
        .post(&activate_path(id(&first)), &alice.token, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    turn(&stack, &alice, chat, "question 5").await;
    let prompt = last_prompt(&stack);
    assert_eq!(prompt[0], "question 1", "{prompt:?}");
    assert_eq!(prompt.len(), 9);
    stack.cleanup().await;
}

/// A regeneration racing a branch change: the question was on the active path when the
/// request read it, and another tab's switch to another branch committed before the
/// regeneration took the chat's lock. The regeneration sees the path as it is under the lock:
/// it makes the question's branch active again (`active_path_changed`), and the new reply is
/// shown (before, it was saved off the path, a model call nobody saw).
#[tokio::test]
async fn a_regeneration_racing_a_branch_switch_puts_its_question_back_on_the_path() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (first, _) = turn(&stack, &alice, chat, "first").await;
    let (second, _) = turn(&stack, &alice, chat, "second").await;
    // Another branch: "first" edited and answered; then back to the branch of "second".
    let edited = edited(&stack, &alice, id(&first), "first, edited").await;
    let other_branch = edited["reply_to"].as_i64().expect("the edited question");
    activated(&stack, &alice, id(&second)).await;
    let mut ws = stack.ws(chat, &alice.token, None).await;

    // The chat held as a branch change holds it: the regeneration reads "second" active, then
    // waits; the switch to the other branch commits meanwhile.
    let mut lock = stack.holding_row("ai_chats", chat).await;
    let regenerate = regenerate_path(id(&second));
    let mut request = Box::pin(stack.post(&regenerate, &alice.token, json!({})));
    stack.until_it_waits_for_a_lock(&mut request).await;
    aichat_shared::db::versions::activate(&mut lock, chat, other_branch)
        .await
        .expect("the other tab's switch");
    lock.commit().await.expect("commit");
    let (status, body) = request.await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    let (reply, events) = event_of(&mut ws, "assistant_message", 15).await;
    assert_eq!(reply["message"]["reply_to"], second["id"]);
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "active_path_changed" && e["message_id"] == second["id"]),
        "{events:?}"
    );
    let shown = stack.messages(&alice, chat).await;
    assert_eq!(
        ids(&shown).last(),
        reply["message"]["id"].as_i64().as_ref(),
        "the new reply is on the active path: {shown:?}"
    );
    stack.cleanup().await;
}

/// An edit racing the deletion of its chat (the chat found, then deleted while the edit waits
/// for its row) answers 404, as the message is gone, not 409 "still waiting for its reply".
#[tokio::test]
async fn an_edit_whose_chat_is_deleted_meanwhile_is_not_found() {
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (question, _) = turn(&stack, &alice, chat, "first").await;
    let mut lock = stack.holding_row("ai_chats", chat).await;
    let edit = edit_path(id(&question));
    let mut request = Box::pin(stack.post(&edit, &alice.token, json!({"content": "changed"})));
    stack.until_it_waits_for_a_lock(&mut request).await;
    sqlx::query("delete from ai_chats where id = $1")
        .bind(chat)
        .execute(&mut *lock)
        .await
        .expect("deleting the chat");
    lock.commit().await.expect("commit");
    let (status, body) = request.await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    stack.cleanup().await;
}

/// A regeneration that fails leaves its question showing the reply it showed: left and come
/// back to, the branch shows that reply, not the newest one (the failed run's version has
/// no reply to show).
#[tokio::test]
async fn a_failed_regeneration_keeps_the_reply_its_question_showed() {
    let stack = Stack::start(FakeConfig::default(), &[], &["--llm-max-attempts", "1"]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (question, first) = turn(&stack, &alice, chat, "first question").await;
    regenerated(&stack, &alice, id(&question)).await;
    activated(&stack, &alice, id(&first)).await;

    stack.fake.set_config(aichat_testkit::fake_always(
        aichat_fake_llm::Outcome::ServerError,
    ));
    let path = format!("{}?wait=true", regenerate_path(id(&question)));
    let (status, body) = stack.post(&path, &alice.token, json!({})).await;
    assert!(
        status.is_client_error() || status.is_server_error(),
        "{status} {body}"
    );
    assert_eq!(
        ids(&stack.messages(&alice, chat).await),
        vec![id(&question), id(&first)],
        "the first reply is shown while the question is failed"
    );

    // Away from the branch with an edit, and back through the question.
    stack.fake.set_config(FakeConfig::default());
    edited(&stack, &alice, id(&question), "another first question").await;
    activated(&stack, &alice, id(&question)).await;
    assert_eq!(
        ids(&stack.messages(&alice, chat).await),
        vec![id(&question), id(&first)],
        "the reply it showed, not the newest"
    );
    stack.cleanup().await;
}

/// A regeneration that failed points its question back at the reply it showed; a `?wait` that
/// missed the failure's event (it lagged, or the event was lost) reads the outcome from the
/// database at its deadline and must not take that older reply for the regeneration's answer.
#[tokio::test]
async fn a_regeneration_waited_for_whose_failure_was_not_heard_is_not_answered_with_the_old_reply()
{
    let stack = Stack::start(FakeConfig::default(), &[], &[]).await;
    let alice = stack.user("alice").await;
    let chat = stack.ai_chat_id(&alice).await;
    let (question, _) = turn(&stack, &alice, chat, "once more").await;
    let question = id(&question);
    // The regeneration's model call never answers.
    stack
        .fake
        .set_config(aichat_testkit::fake_always(aichat_fake_llm::Outcome::Hang));
    let path = format!("{}?wait=3", regenerate_path(question));
    let failed_unheard = async {
        stack
            .fake
            .wait_for_requests(2, std::time::Duration::from_secs(10))
            .await;
        // What the worker's failure writes, with its `error` event lost.
        sqlx::query(
            "update ai_messages set status = 'failed', error = 'The AI service did not respond.', \
             reply_version = (select max(version) from ai_messages where reply_to = $1) \
             where id = $1",
        )
        .bind(question)
        .execute(&stack.db)
        .await
        .expect("fail the regeneration");
    };
    let ((status, body), ()) =
        tokio::join!(stack.post(&path, &alice.token, json!({})), failed_unheard);
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    stack.cleanup().await;
}
