//! Daily token budgets staff set per user, the quota a user reads (`/api/ai/quota/`), and the
//! limit headers of the send routes.
use crate::common;

use std::time::Duration;

use aichat_fake_llm::{FakeConfig, FakeLlm};
use aichat_testkit::eventually;
use chrono::{DateTime, Utc};
use common::{
    Replied, Reply, TestApp, TestUser, event_of, flags, id, send_path, send_ws,
    spawn_app_with_flags, start_worker, ws_events_until,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Prompts of at most 15 tokens and replies of at most 2: every send reserves 17.
const SEVENTEEN_A_SEND: &str = "--context-token-budget 15 --max-completion-tokens 2";

fn budget_path(user_id: i64) -> String {
    format!("/api/admin/users/{user_id}/budget/")
}

/// The next UTC midnight after now.
fn next_midnight() -> DateTime<Utc> {
    (Utc::now().date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
}

fn time(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .unwrap_or_else(|| panic!("not an RFC 3339 time: {value}"))
        .with_timezone(&Utc)
}

impl TestApp {
    /// `staff` sets `user`'s daily token budget; the user as the answer shows them.
    async fn set_budget(&self, staff: &TestUser, user: &TestUser, tokens: Value) -> Value {
        let (status, body) = self
            .put(
                &budget_path(user.id),
                &staff.token,
                json!({"daily_tokens": tokens}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// `user`'s quota, insisting on 200.
    async fn quota(&self, user: &TestUser) -> Value {
        let (status, body) = self.get("/api/ai/quota/", &user.token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// A send of "hi" to `chat` as `user` (`query` appended to the path), whole reply.
    async fn send_reply(&self, user: &TestUser, chat: i64, query: &str) -> Reply {
        self.request(Method::POST, &format!("{}{query}", send_path(chat)))
            .bearer_auth(&user.token)
            .json(&json!({"content": "hi"}))
            .reply()
            .await
    }
}

/// A header's value as a number.
fn number(reply: &Reply, name: &str) -> i64 {
    let value = reply.header(name);
    value
        .parse()
        .unwrap_or_else(|_| panic!("{name}: {value} is not a number"))
}

fn has(reply: &Reply, name: &str) -> bool {
    reply.headers.contains_key(name)
}

#[tokio::test]
async fn staff_set_a_users_budget_and_read_it_back_with_the_limit_it_makes() {
    let app = spawn_app_with_flags(&flags("--daily-token-budget 500")).await;
    let root = app.staff("root").await;
    let alice = app.user("alice").await;
    let path = format!("/api/admin/users/{}/", alice.id);

    let (status, before) = app.get(&path, &root.token).await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert_eq!(before["username"], "alice");
    assert_eq!(before["daily_token_budget"], Value::Null, "the default");
    assert_eq!(before["daily"]["limit"], 500);
    assert_eq!(before["daily"]["remaining"], 500);

    let set = app.set_budget(&root, &alice, json!(1200)).await;
    assert_eq!(set["daily_token_budget"], 1200);
    assert_eq!(set["daily"]["limit"], 1200);
    assert_eq!(app.get(&path, &root.token).await.1, set);

    // 0 set by staff is no tokens at all, not "no limit".
    let none = app.set_budget(&root, &alice, json!(0)).await;
    assert_eq!(
        (&none["daily_token_budget"], &none["daily"]["limit"]),
        (&json!(0), &json!(0))
    );
    let default = app.set_budget(&root, &alice, Value::Null).await;
    assert_eq!(default["daily_token_budget"], Value::Null);
    assert_eq!(default["daily"]["limit"], 500);
    let stored: Option<i64> =
        sqlx::query_scalar("select daily_token_budget from users where id = $1")
            .bind(alice.id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(stored, None);

    app.assert_field_errors(
        Method::PUT,
        &budget_path(alice.id),
        &root.token,
        &[
            (json!({}), "daily_tokens"),
            (json!({"daily_tokens": -1}), "daily_tokens"),
            (json!({"daily_tokens": 1.5}), "daily_tokens"),
            (json!({"daily_tokens": "5"}), "daily_tokens"),
            (json!({"daily_tokens": 1_000_000_001_i64}), "daily_tokens"),
            (json!({"daily_tokens": true}), "daily_tokens"),
            (json!({"daily_tokens": [5]}), "daily_tokens"),
            (json!({"daily_tokens": {"n": 5}}), "daily_tokens"),
        ],
    )
    .await;
    // A body that is not a JSON object at all.
    for body in [json!([5]), json!("5"), json!(5), json!(true), Value::Null] {
        let (status, error) = app
            .put(&budget_path(alice.id), &root.token, body.clone())
            .await;
        assert_eq!(
            (status, error),
            (
                StatusCode::BAD_REQUEST,
                json!({"error": "Invalid data: expected a JSON object"})
            ),
            "{body}"
        );
    }
    let (_, missing) = app
        .put(&budget_path(alice.id), &root.token, json!({}))
        .await;
    assert_eq!(
        missing,
        json!({"daily_tokens": ["This field is required."]})
    );

    let unknown = alice.id + 1000;
    let (status, _) = app
        .put(
            &budget_path(unknown),
            &root.token,
            json!({"daily_tokens": 5}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app
        .get(&format!("/api/admin/users/{unknown}/"), &root.token)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Users may not set their own.
    let (status, body) = app
        .put(
            &budget_path(alice.id),
            &alice.token,
            json!({"daily_tokens": null}),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::FORBIDDEN, json!({"error": "Staff only"}))
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_budget_set_by_staff_holds_from_the_next_send_on_every_instance_and_socket() {
    // No default budget: sends are unlimited until staff set one.
    let app = spawn_app_with_flags(&flags("--send-rate-per-minute 0")).await;
    let other = app
        .another_instance(&flags("--send-rate-per-minute 0"))
        .await;
    let root = app.staff("root").await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    // Both instances have read (and cached) alice's session; a socket of hers is open.
    let first = other.send_reply(&alice, chat, "").await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    assert!(!has(&first, "x-budget-remaining"), "no limit, no header");
    app.send_ok(&alice, chat, "hi").await;
    let mut ws = other.ws(chat, &alice.token, None).await;

    app.set_budget(&root, &alice, json!(0)).await;
    for (instance, name) in [(&other, "the other instance"), (&app, "this instance")] {
        let refused = instance.send_reply(&alice, chat, "").await;
        let error = refused.error(name, StatusCode::TOO_MANY_REQUESTS);
        assert!(error.contains("budget"), "{name}: {error}");
        assert_eq!(number(&refused, "x-budget-remaining"), 0, "{name}");
    }
    send_ws(&mut ws, json!({"type": "message", "content": "over ws"})).await;
    let (error, _) = event_of(&mut ws, "error", 5).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("budget"),
        "{error}"
    );

    // Back to the default (none): the next send is taken again, on either instance.
    app.set_budget(&root, &alice, Value::Null).await;
    other.send_ok(&alice, chat, "again").await;
    send_ws(
        &mut ws,
        json!({"type": "message", "content": "over ws again"}),
    )
    .await;
    ws_events_until(
        &mut ws,
        Duration::from_secs(5),
        "the socket's message",
        |event| event["type"] == "user_message" && event["message"]["content"] == "over ws again",
    )
    .await;
    drop(ws);
    other.cleanup().await;
    app.cleanup().await;
}

#[tokio::test]
async fn fifty_concurrent_sends_against_a_staff_set_budget_for_five_reservations_admit_exactly_five()
 {
    let app = spawn_app_with_flags(&flags(&format!(
        "{SEVENTEEN_A_SEND} --send-rate-per-minute 0"
    )))
    .await;
    let root = app.staff("root").await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let (bob, bobs) = app.user_with_ai_chat("bob").await;
    // Five reservations of 17, and 16 tokens to spare: not a sixth.
    app.set_budget(&root, &alice, json!(5 * 17 + 16)).await;
    let sends = futures::future::join_all((0..50).map(|_| app.send_reply(&alice, chat, ""))).await;
    let (admitted, refused): (Vec<_>, Vec<_>) = sends
        .iter()
        .partition(|reply| reply.status == StatusCode::ACCEPTED);
    assert_eq!(admitted.len(), 5);
    let mut left: Vec<i64> = admitted
        .iter()
        .map(|reply| number(reply, "x-budget-remaining"))
        .collect();
    left.sort_unstable();
    assert_eq!(
        left,
        [16, 33, 50, 67, 84],
        "each admitted send says what it left"
    );
    for reply in refused {
        let error = reply.error("send", StatusCode::TOO_MANY_REQUESTS);
        assert!(error.contains("budget"), "{error}");
        assert_eq!(number(reply, "x-budget-remaining"), 16);
    }
    assert_eq!(app.my_messages(&alice).await.len(), 5);
    let daily = &app.quota(&alice).await["daily"];
    assert_eq!(
        (&daily["reserved"], &daily["used"], &daily["remaining"]),
        (&json!(85), &json!(0), &json!(16)),
        "never more reserved than the budget: {daily}"
    );
    // Another user has no budget of their own, and the default is none.
    let bobs_send = app.send_reply(&bob, bobs, "").await;
    assert_eq!(bobs_send.status, StatusCode::ACCEPTED);
    assert!(!has(&bobs_send, "x-budget-remaining"));
    assert_eq!(app.quota(&bob).await["daily"]["limit"], Value::Null);
    app.cleanup().await;
}

#[tokio::test]
async fn the_quota_numbers_add_up_before_and_after_a_reply() {
    let api_flags =
        format!("{SEVENTEEN_A_SEND} --daily-token-budget 1000 --send-rate-per-minute 5");
    let app = spawn_app_with_flags(&flags(&api_flags)).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let fresh = app.quota(&alice).await;
    assert_eq!(
        fresh["daily"],
        json!({"limit": 1000, "used": 0, "reserved": 0, "remaining": 1000,
               "resets_at": fresh["daily"]["resets_at"]})
    );
    assert_eq!(time(&fresh["daily"]["resets_at"]), next_midnight());
    assert_eq!(
        fresh["send_rate"],
        json!({"limit": 5, "remaining": 5, "resets_at": null}),
        "no window is open before the first send"
    );

    // No worker yet: the message waits, holding its reservation.
    let sent = app.send_reply(&alice, chat, "").await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{}", sent.text);
    let question = id(&sent.json()["message"]);
    let reservation = 1000 - number(&sent, "x-budget-remaining");
    assert_eq!(reservation, 17);
    let waiting = app.quota(&alice).await;
    let daily = &waiting["daily"];
    assert_eq!(
        (&daily["used"], &daily["reserved"]),
        (&json!(0), &json!(17))
    );
    assert_eq!(daily["remaining"], 1000 - 17);
    let rate = &waiting["send_rate"];
    assert_eq!(rate["remaining"], 4);
    let window_ends = time(&rate["resets_at"]);
    assert!(
        window_ends > Utc::now() && window_ends <= Utc::now() + chrono::Duration::seconds(60),
        "{rate}"
    );

    // The worker answers it: the reservation gives way to the reply's real use.
    let fake = FakeLlm::start(FakeConfig::default()).await.expect("fake");
    let _worker = start_worker(&app, &fake, &[]).await;
    let reply = eventually(Duration::from_secs(30), "the reply", || async {
        app.messages(&alice, chat)
            .await
            .into_iter()
            .find(|m| m["reply_to"] == question)
    })
    .await;
    let total = reply["total_tokens"].as_i64().expect("the reply's tokens");
    assert!(total > 0);
    let answered = app.quota(&alice).await;
    let daily = &answered["daily"];
    assert_eq!(daily["used"], total, "used grew by the reply's tokens");
    assert_eq!(
        daily["reserved"], 0,
        "the reservation of {reservation} is gone"
    );
    assert_eq!(daily["remaining"], 1000 - total);
    assert_eq!(time(&daily["resets_at"]), next_midnight());

    // The limit headers of a reply waited for (200) and of a regeneration (202).
    let waited = app.send_reply(&alice, chat, "?wait=true").await;
    assert_eq!(waited.status, StatusCode::OK, "{}", waited.text);
    assert_eq!(number(&waited, "ratelimit-limit"), 5);
    assert_eq!(number(&waited, "ratelimit-remaining"), 3);
    assert!((1..=60).contains(&number(&waited, "ratelimit-reset")));
    assert_eq!(number(&waited, "x-budget-remaining"), 1000 - total - 17);
    let regenerated = app
        .request(
            Method::POST,
            &format!("/api/ai/messages/{question}/regenerate/"),
        )
        .bearer_auth(&alice.token)
        .reply()
        .await;
    assert_eq!(
        regenerated.status,
        StatusCode::ACCEPTED,
        "{}",
        regenerated.text
    );
    assert_eq!(number(&regenerated, "ratelimit-remaining"), 2);
    assert!(has(&regenerated, "x-budget-remaining"));
    app.cleanup().await;
}

/// A provider that ignores `stream_options.include_usage` reports no usage: the reply is
/// counted with the tokenizer (its prompt as the worker counted it, and its text), stored
/// with it, and settled in the budget, leaving nothing reserved.
#[tokio::test]
async fn a_reply_whose_provider_reports_no_usage_is_counted_with_the_tokenizer() {
    let api_flags = format!("{SEVENTEEN_A_SEND} --daily-token-budget 1000");
    let app = spawn_app_with_flags(&flags(&api_flags)).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let fake = FakeLlm::start(FakeConfig {
        report_usage: false,
        ..FakeConfig::default()
    })
    .await
    .expect("fake");
    let _worker = start_worker(&app, &fake, &[]).await;
    let waited = app.send_reply(&alice, chat, "?wait=true").await;
    assert_eq!(waited.status, StatusCode::OK, "{}", waited.text);
    assert!(
        fake.requests()
            .iter()
            .all(|r| r.include_usage && r.usage.is_none()),
        "the worker asked for usage and the fake reported none"
    );
    let reply = waited.json();
    let (prompt, completion, total) = (
        reply["prompt_tokens"].as_i64().expect("prompt tokens"),
        reply["completion_tokens"]
            .as_i64()
            .expect("completion tokens"),
        reply["total_tokens"].as_i64().expect("total tokens"),
    );
    assert!(prompt > 0 && completion > 0, "{reply}");
    assert_eq!(total, prompt + completion);
    let daily = &app.quota(&alice).await["daily"];
    assert_eq!(
        (&daily["used"], &daily["reserved"]),
        (&json!(total), &json!(0)),
        "the reply's counted tokens replace its reservation"
    );
    app.cleanup().await;
}

/// Deleting a chat gives back what its waiting questions reserved (their jobs find them gone
/// and settle nothing), and only that: an answered question's reply stays counted.
#[tokio::test]
async fn deleting_a_chat_gives_back_what_its_waiting_questions_reserved() {
    let api_flags = format!("{SEVENTEEN_A_SEND} --daily-token-budget 1000");
    let app = spawn_app_with_flags(&flags(&api_flags)).await;
    let (alice, answered_chat) = app.user_with_ai_chat("alice").await;
    let fake = FakeLlm::start(FakeConfig::default()).await.expect("fake");
    let worker = start_worker(&app, &fake, &[]).await;
    let answered = app.send_reply(&alice, answered_chat, "?wait=true").await;
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.text);
    let used = answered.json()["total_tokens"].clone();
    worker.stop().await;

    // No worker now: two questions wait in another chat, holding 17 tokens each.
    let waiting_chat = app.ai_chat_id(&alice).await;
    for _ in 0..2 {
        let sent = app.send_reply(&alice, waiting_chat, "").await;
        assert_eq!(sent.status, StatusCode::ACCEPTED, "{}", sent.text);
    }
    let daily = &app.quota(&alice).await["daily"];
    assert_eq!((&daily["used"], &daily["reserved"]), (&used, &json!(34)));

    for chat in [waiting_chat, answered_chat] {
        let (status, body) = app
            .delete(&format!("/api/ai/chats/{chat}/"), &alice.token)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let daily = &app.quota(&alice).await["daily"];
        assert_eq!(
            (&daily["used"], &daily["reserved"]),
            (&used, &json!(0)),
            "after deleting chat {chat}"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn the_refusals_of_the_send_path_carry_the_limit_headers_and_retry_after_their_reset() {
    let api_flags =
        format!("{SEVENTEEN_A_SEND} --daily-token-budget 1000 --send-rate-per-minute 2");
    let app = spawn_app_with_flags(&flags(&api_flags)).await;
    let root = app.staff("root").await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    for remaining in [1, 0] {
        let sent = app.send_reply(&alice, chat, "").await;
        assert_eq!(sent.status, StatusCode::ACCEPTED, "{}", sent.text);
        assert_eq!(number(&sent, "ratelimit-remaining"), remaining);
    }
    let past_rate = app.send_reply(&alice, chat, "").await;
    let error = past_rate.error("a third send", StatusCode::TOO_MANY_REQUESTS);
    assert!(error.contains("slow down"), "{error}");
    assert_eq!(number(&past_rate, "ratelimit-limit"), 2);
    assert_eq!(number(&past_rate, "ratelimit-remaining"), 0);
    let reset = number(&past_rate, "ratelimit-reset");
    assert!((1..=60).contains(&reset));
    assert_eq!(past_rate.retry_after(), u64::try_from(reset).ok());
    assert_eq!(number(&past_rate, "x-budget-remaining"), 1000 - 2 * 17);

    // Past the budget (with room in the send rate): Retry-After is the seconds to midnight.
    let (bob, bobs) = app.user_with_ai_chat("bob").await;
    app.set_budget(&root, &bob, json!(10)).await;
    let past_budget = app.send_reply(&bob, bobs, "").await;
    let error = past_budget.error("bob's send", StatusCode::TOO_MANY_REQUESTS);
    assert!(error.contains("budget"), "{error}");
    assert_eq!(number(&past_budget, "x-budget-remaining"), 10);
    assert_eq!(number(&past_budget, "ratelimit-remaining"), 1);
    let to_midnight = (next_midnight() - Utc::now()).num_seconds();
    let retry_after = past_budget.retry_after().expect("Retry-After") as i64;
    assert!(
        (to_midnight - 5..=to_midnight + 5).contains(&retry_after),
        "{retry_after} s, midnight in {to_midnight} s"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn without_limits_the_quota_is_null_and_sends_carry_no_limit_headers() {
    let app = spawn_app_with_flags(&flags("--send-rate-per-minute 0")).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let sent = app.send_reply(&alice, chat, "").await;
    assert_eq!(sent.status, StatusCode::ACCEPTED);
    for header in [
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "x-budget-remaining",
    ] {
        assert!(!has(&sent, header), "{header}");
    }
    let quota = app.quota(&alice).await;
    assert_eq!(
        (&quota["daily"]["limit"], &quota["daily"]["remaining"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(quota["daily"]["reserved"], 0);
    assert_eq!(
        quota["send_rate"],
        json!({"limit": null, "remaining": null, "resets_at": null})
    );
    app.cleanup().await;
}

#[tokio::test]
async fn staff_see_users_nearest_their_limit_first() {
    let app = spawn_app_with_flags(&flags(&format!(
        "{SEVENTEEN_A_SEND} --daily-token-budget 100 --send-rate-per-minute 0"
    )))
    .await;
    let root = app.staff("root").await;
    let (alice, alices) = app.user_with_ai_chat("alice").await;
    let (bob, bobs) = app.user_with_ai_chat("bob").await;
    let carol = app.user("carol").await;
    app.set_budget(&root, &bob, json!(34)).await;
    app.set_budget(&root, &carol, json!(1_000_000)).await;
    app.send_ok(&alice, alices, "one").await; // 17 of 100
    app.send_ok(&bob, bobs, "one").await; // 17 of 34
    let users = app.list("/api/admin/users/", &root.token).await;
    let names: Vec<&str> = users
        .iter()
        .map(|u| u["username"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["bob", "alice", "root", "carol"], "{users:?}");
    assert_eq!(users[0]["daily"]["reserved"], 17);
    assert_eq!(users[0]["daily"]["remaining"], 17);
    assert_eq!(users[0]["daily_token_budget"], 34);
    assert_eq!(users[1]["daily_token_budget"], Value::Null);
    assert_eq!(users[1]["daily"]["limit"], 100);
    // Paged in id order: the page holds the first users by id, sorted.
    let (status, first) = app.get("/api/admin/users/?limit=2", &root.token).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<i64> = common::items(&first).iter().map(id).collect();
    assert_eq!(
        ids,
        [alice.id, root.id],
        "alice (17 of 100) before root (0)"
    );
    app.cleanup().await;
}

/// An app counting budgets (17 tokens a send) and a worker, with one of alice's questions
/// answered: the app, alice, her chat, the question's id, the worker.
async fn with_an_answered_question() -> (
    TestApp,
    TestUser,
    i64,
    Value,
    aichat_testkit::InProcessWorker,
) {
    let api_flags = format!("{SEVENTEEN_A_SEND} --daily-token-budget 1000");
    let app = spawn_app_with_flags(&flags(&api_flags)).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    let fake = FakeLlm::start(FakeConfig::default()).await.expect("fake");
    let worker = start_worker(&app, &fake, &[]).await;
    let answered = app.send_reply(&alice, chat, "?wait=true").await;
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.text);
    let question = answered.json()["reply_to"].clone();
    (app, alice, chat, question, worker)
}

/// Waits until `user` has nothing reserved: the regeneration of `question` was stored,
/// answered, and its reservation settled into `used` (the tokens of its two replies).
async fn until_the_regeneration_is_settled(
    app: &TestApp,
    user: &TestUser,
    chat: i64,
    question: &Value,
) {
    let daily = eventually(
        Duration::from_secs(15),
        "the reservation settled",
        || async {
            let daily = app.quota(user).await["daily"].clone();
            (daily["reserved"] == json!(0)).then_some(daily)
        },
    )
    .await;
    let replies: Vec<Value> = app
        .list(
            &format!("/api/ai/chats/{chat}/messages/?all=true"),
            &user.token,
        )
        .await
        .into_iter()
        .filter(|m| m["reply_to"] == *question)
        .collect();
    assert_eq!(replies.len(), 2, "{replies:?}");
    let total: i64 = replies
        .iter()
        .filter_map(|r| r["total_tokens"].as_i64())
        .sum();
    assert_eq!(daily["used"], json!(total));
}

/// A regeneration whose client goes away while it waits for its chat's lock (after its budget
/// was reserved) still runs to its end: its reservation is answered and settled, not left
/// reserved until midnight with nothing waiting.
#[tokio::test]
async fn a_regeneration_whose_client_goes_away_midway_keeps_or_gives_back_its_reservation() {
    let (app, alice, chat, question, _worker) = with_an_answered_question().await;
    let lock = app.holding_row("ai_chats", chat).await;
    let path = format!("/api/ai/messages/{question}/regenerate/");
    let mut request = Box::pin(app.post(&path, &alice.token, json!({})));
    app.until_it_waits_for_a_lock(&mut request).await;
    assert_eq!(app.quota(&alice).await["daily"]["reserved"], json!(17));
    drop(request); // the client goes away
    lock.rollback().await.expect("unlock the chat");
    until_the_regeneration_is_settled(&app, &alice, chat, &question).await;
    app.cleanup().await;
}

/// The same over a socket that closes (its session logged out) while the regeneration waits.
#[tokio::test]
async fn a_regeneration_whose_socket_closes_midway_keeps_or_gives_back_its_reservation() {
    let (app, alice, chat, question, _worker) = with_an_answered_question().await;
    // A second session of alice's, to read her quota once the first is logged out.
    let (status, second) = app.login("alice", aichat_testkit::PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let reader = TestUser {
        token: second["token"].as_str().expect("token").to_owned(),
        ..alice.clone()
    };
    let mut socket = app.ws(chat, &alice.token, None).await;
    let lock = app.holding_row("ai_chats", chat).await;
    send_ws(
        &mut socket,
        json!({"type": "regenerate", "message_id": question}),
    )
    .await;
    aichat_testkit::postgres::wait_for_a_lock_waiter(
        &app.db,
        "",
        "the regeneration waiting for the chat",
    )
    .await;
    assert_eq!(app.quota(&reader).await["daily"]["reserved"], json!(17));
    let (status, body) = app.post("/api/logout/", &alice.token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(common::closed_with(&mut socket, 5).await, Some(4401));
    lock.rollback().await.expect("unlock the chat");
    until_the_regeneration_is_settled(&app, &reader, chat, &question).await;
    app.cleanup().await;
}
