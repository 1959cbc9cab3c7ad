//! The completion worker end to end: real PostgreSQL and Redis, the fake model over HTTP,
//! workers started through the library, jobs queued exactly as the API queues them.
mod common;

use std::time::Duration;

use aichat_fake_llm::{FakeConfig, Outcome, Usage};
use aichat_shared::db;
use aichat_shared::db::completions::NewReply;
use aichat_shared::events::ChatEvent;
use aichat_shared::jobs::CompletionJob;
use aichat_shared::keys::Namespace;
use aichat_testkit::PrivateRedis;
use aichat_worker::context::{PromptMessage, Role, TokenCounter};
use apalis::prelude::TaskBuilder;
use common::{MODEL, SYSTEM_PROMPT, TestEnv, chat_event};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn role_and_content(messages: &[Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_owned(),
                m["content"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(r, c)| ((*r).to_owned(), (*c).to_owned()))
        .collect()
}

#[tokio::test]
async fn a_sent_message_is_streamed_saved_with_the_models_token_counts_and_announced() {
    let env = TestEnv::start(FakeConfig {
        chunk_delay_ms: 15,
        ..FakeConfig::default()
    })
    .await;
    let worker = env.spawn_worker(&["--delta-flush-chars", "8"]).await;
    env.wait_ready(worker.port).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;

    let content = "tell me about the weather in spring";
    let sent = env.send(chat, content, false, 20).await;
    let reply = events.reply_to(sent.id, WAIT).await;

    let expected_reply = format!("Echo: {content}");
    let usage = Usage::for_exchange([SYSTEM_PROMPT, content], &expected_reply);
    let ChatEvent::AssistantMessage { message } = chat_event(&reply) else {
        panic!("not an assistant_message: {reply}");
    };
    assert_eq!(message.content, expected_reply);
    assert_eq!(message.reply_to, Some(sent.id));
    let event_usage = message.usage.expect("usage in the event");
    assert_eq!(event_usage.prompt_tokens, Some(usage.prompt_tokens as i32));
    assert_eq!(
        event_usage.completion_tokens,
        Some(usage.completion_tokens as i32)
    );
    assert_eq!(event_usage.total_tokens, Some(usage.total_tokens as i32));

    // Deltas came first, all for this message, and add up to the reply.
    let deltas: Vec<String> = events
        .of_type("assistant_delta")
        .into_iter()
        .map(|e| match chat_event(e) {
            ChatEvent::AssistantDelta { message_id, delta } => {
                assert_eq!(message_id, sent.id);
                delta
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        deltas.len() >= 2,
        "coalesced but still streamed: {deltas:?}"
    );
    assert_eq!(deltas.concat(), expected_reply);
    assert_eq!(
        events.seen.last().map(|e| e["type"].clone()),
        Some(Value::from("assistant_message"))
    );

    // Stored: the reply with tokens, model and latency; the question answered.
    let stored = env.messages(chat).await;
    assert_eq!(stored.len(), 2);
    let question = &stored[0];
    assert_eq!(
        (question.status.as_str(), question.error.as_deref()),
        ("answered", None)
    );
    let answer = &stored[1];
    assert_eq!(answer.id, message.id);
    assert_eq!(answer.role, "assistant");
    assert_eq!(answer.status, "complete");
    assert_eq!(answer.content, expected_reply);
    assert_eq!(answer.reply_to, Some(sent.id));
    assert_eq!(answer.model.as_deref(), Some(MODEL));
    assert_eq!(answer.prompt_tokens, Some(usage.prompt_tokens as i32));
    assert_eq!(
        answer.completion_tokens,
        Some(usage.completion_tokens as i32)
    );
    assert_eq!(answer.total_tokens, Some(usage.total_tokens as i32));
    let latency: Option<i32> =
        sqlx::query_scalar("select latency_ms from ai_messages where id = $1")
            .bind(answer.id)
            .fetch_one(&env.db)
            .await
            .expect("latency");
    assert!(latency.is_some_and(|ms| ms >= 0), "{latency:?}");

    // The model was asked once, streaming, with usage requested, for the chat's model.
    let requests = env.fake.requests();
    assert_eq!(requests.len(), 1);
    assert!(requests[0].stream && requests[0].include_usage);
    assert_eq!(requests[0].model, MODEL);
    assert_eq!(requests[0].api_key.as_deref(), Some("test-key"));

    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", worker.port))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics body");
    for name in [
        "aichat_worker_jobs_started_total",
        "aichat_worker_jobs_succeeded_total",
        "aichat_worker_model_latency_seconds_bucket",
        "aichat_worker_job_duration_seconds_bucket",
        "aichat_worker_tokens_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_prompt_follows_the_context_contract() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let worker = env.spawn_worker(&[]).await;
    let alice = env.user("alice").await;
    let bob = env.user("bob").await;
    let team = env
        .chat(
            "team",
            &[alice.id, bob.id],
            &[
                (bob.id, "c1"),
                (alice.id, "c2"),
                (bob.id, "c3 has words"),
                (alice.id, "c4"),
            ],
        )
        .await;
    let system = "You are terse.";
    let chat = env.ai_chat(alice.id, system, Some(team)).await;
    let mut events = env.events(chat).await;
    let ask = |content: &'static str, include: bool, limit: i32| {
        let env = &env;
        async move { env.send(chat, content, include, limit).await }
    };

    let first = ask("first", false, 20).await;
    events.reply_to(first.id, WAIT).await;
    // A message that failed earlier is not part of the conversation.
    let lost = db::ai_messages::insert_user_message(
        &env.db,
        chat,
        "lost",
        aichat_shared::domain::ContextOptions {
            include_related_chat_context: false,
            context_message_limit: 20,
        },
    )
    .await
    .expect("insert");
    assert!(
        db::completions::mark_failed(&env.db, lost.id, "failed")
            .await
            .expect("mark failed")
    );

    let second = ask("second", true, 3).await;
    events.reply_to(second.id, WAIT).await;
    let last = env.fake.requests().pop().expect("a request");
    assert_eq!(
        role_and_content(&last.messages),
        pairs(&[
            (
                "system",
                "You are terse.\n\nContext from related chat:\nalice: c2\nbob: c3 has words\nalice: c4\n"
            ),
            ("user", "first"),
            ("assistant", "Echo: first"),
            ("user", "second"),
        ])
    );

    let third = ask("third", false, 20).await;
    events.reply_to(third.id, WAIT).await;
    let last = env.fake.requests().pop().expect("a request");
    assert_eq!(
        role_and_content(&last.messages),
        pairs(&[
            ("system", system),
            ("user", "first"),
            ("assistant", "Echo: first"),
            ("user", "second"),
            ("assistant", "Echo: second"),
            ("user", "third"),
        ])
    );

    // Once the owner has left the related chat, its lines are no longer shared.
    sqlx::query("delete from chat_participants where chat_id = $1 and user_id = $2")
        .bind(team)
        .bind(alice.id)
        .execute(&env.db)
        .await
        .expect("alice leaves");
    let fourth = ask("fourth", true, 20).await;
    events.reply_to(fourth.id, WAIT).await;
    let last = env.fake.requests().pop().expect("a request");
    assert_eq!(
        role_and_content(&last.messages)[0],
        ("system".to_owned(), system.to_owned())
    );
    assert_eq!(last.messages.len(), 8);

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_oldest_turns_are_dropped_to_fit_the_token_budget() {
    let questions = [
        "one alpha beta gamma delta epsilon",
        "two alpha beta gamma delta epsilon",
        "three alpha beta gamma delta epsilon",
    ];
    // Exactly enough for the system message, the second turn and the third question.
    let counter = TokenCounter::cl100k();
    let kept = [
        PromptMessage::new(Role::System, SYSTEM_PROMPT),
        PromptMessage::new(Role::User, questions[1]),
        PromptMessage::new(Role::Assistant, format!("Echo: {}", questions[1])),
        PromptMessage::new(Role::User, questions[2]),
    ];
    let budget = counter.prompt(&kept).to_string();

    let env = TestEnv::start(FakeConfig::default()).await;
    let worker = env.spawn_worker(&["--context-token-budget", &budget]).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;
    for content in questions {
        let sent = env.send(chat, content, false, 20).await;
        events.reply_to(sent.id, WAIT).await;
    }
    let requests = env.fake.requests();
    assert_eq!(requests[1].messages.len(), 4, "the first turn still fitted");
    assert_eq!(
        role_and_content(&requests[2].messages),
        pairs(&[
            ("system", SYSTEM_PROMPT),
            ("user", questions[1]),
            ("assistant", "Echo: two alpha beta gamma delta epsilon"),
            ("user", questions[2]),
        ])
    );
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn token_counts_are_stored_once_and_then_decide_what_fits() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let worker = env.spawn_worker(&[]).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;
    let first = "how many tokens does this sentence hold?";
    let sent = env.send(chat, first, false, 20).await;
    events.reply_to(sent.id, WAIT).await;

    // Both sides of the exchange carry their cl100k count.
    let counter = TokenCounter::cl100k();
    let counts: Vec<(String, Option<i32>)> = sqlx::query_as(
        "select content, content_tokens from ai_messages where ai_chat_id = $1 order by id",
    )
    .bind(chat)
    .fetch_all(&env.db)
    .await
    .expect("counts");
    let expected: Vec<(String, Option<i32>)> = [first.to_owned(), format!("Echo: {first}")]
        .into_iter()
        .map(|text| {
            let n = counter.text(&text) as i32;
            (text, Some(n))
        })
        .collect();
    assert_eq!(counts, expected);

    // The next job takes the stored counts as they are: a first question said to be larger
    // than the whole budget (3,000) drops its turn, though its text is short.
    sqlx::query("update ai_messages set content_tokens = 5000 where id = $1")
        .bind(sent.id)
        .execute(&env.db)
        .await
        .expect("inflate the stored count");
    let second = env.send(chat, "and this one?", false, 20).await;
    events.reply_to(second.id, WAIT).await;
    let requests = env.fake.requests();
    assert_eq!(
        role_and_content(&requests[1].messages),
        pairs(&[("system", SYSTEM_PROMPT), ("user", "and this one?")])
    );
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn rate_limited_calls_wait_for_retry_after_then_succeed() {
    let env = TestEnv::start(FakeConfig::default()).await;
    env.fake.push_script([
        Outcome::RateLimited {
            retry_after: "1".into(),
        },
        Outcome::RateLimited {
            retry_after: "1".into(),
        },
    ]);
    let worker = env.spawn_worker(&["--llm-backoff-base-ms", "10"]).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;

    let sent = env.send(chat, "hello", false, 20).await;
    events.reply_to(sent.id, WAIT).await;

    let requests = env.fake.requests();
    let outcomes: Vec<&str> = requests.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(outcomes, ["rate_limited", "rate_limited", "ok"]);
    for pair in requests.windows(2) {
        let gap = pair[1].received_at_ms - pair[0].received_at_ms;
        assert!(gap >= 1000, "Retry-After: 1 not honoured, gap {gap} ms");
    }
    let stored = env.messages(chat).await;
    assert_eq!(stored.len(), 2, "one question, one reply");
    assert_eq!(stored[0].status, "answered");
    assert!(events.of_type("error").is_empty());

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_permanently_failing_model_fails_the_message_and_kills_the_job() {
    let env = TestEnv::start(FakeConfig {
        always: Some(Outcome::ServerError),
        ..FakeConfig::default()
    })
    .await;
    let worker = env
        .spawn_worker(&["--llm-max-attempts", "3", "--llm-backoff-base-ms", "20"])
        .await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;

    let sent = env.send(chat, "hello", false, 20).await;
    let error = events.until(WAIT, |e| e["type"] == "error").await;
    let ChatEvent::Error {
        message,
        message_id,
    } = chat_event(&error)
    else {
        panic!("{error}");
    };
    assert_eq!(message_id, Some(sent.id));
    assert_eq!(
        message,
        "The AI service did not respond. Please try again later."
    );

    let stored = env.message(chat, sent.id).await;
    assert_eq!(stored.status, "failed");
    assert_eq!(stored.error.as_deref(), Some(message.as_str()));
    assert_eq!(env.messages(chat).await.len(), 1, "no reply stored");
    assert_eq!(env.fake.requests().len(), 3, "LLM_MAX_ATTEMPTS calls");

    // Dead, not retried by the queue.
    let dead = env.wait_queue_set("dead", 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    let meta = env.job_meta(&dead[0]).await;
    assert_eq!(meta.get("status").map(String::as_str), Some("Killed"));
    let mut conn = env.redis.clone();
    let scheduled: usize = redis::AsyncCommands::zcard(&mut conn, env.queue_key("scheduled"))
        .await
        .expect("scheduled set");
    assert_eq!(scheduled, 0);
    assert_eq!(env.fake.requests().len(), 3);

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn client_errors_and_exhausted_quota_are_not_retried() {
    let env = TestEnv::start(FakeConfig {
        always: Some(Outcome::BadRequest),
        ..FakeConfig::default()
    })
    .await;
    env.fake.push_script([Outcome::InsufficientQuota]);
    let worker = env.spawn_worker(&["--llm-backoff-base-ms", "10"]).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;

    let quota = env.send(chat, "first", false, 20).await;
    let error = events.until(WAIT, |e| e["type"] == "error").await;
    assert_eq!(error["message_id"], quota.id);
    assert_eq!(
        error["message"],
        "The AI service is currently unavailable. Please try again later."
    );
    assert_eq!(env.fake.requests().len(), 1);

    let bad = env.send(chat, "second", false, 20).await;
    let error = events.until(WAIT, |e| e["type"] == "error").await;
    assert_eq!(error["message_id"], bad.id);
    assert_eq!(
        error["message"],
        "The AI service could not process this message."
    );
    assert_eq!(env.fake.requests().len(), 2);
    for id in [quota.id, bad.id] {
        assert_eq!(env.message(chat, id).await.status, "failed");
    }
    let error_text = env.message(chat, bad.id).await.error.unwrap_or_default();
    assert!(!error_text.contains("injected"), "provider text leaked");

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_silent_model_is_abandoned_after_the_attempt_timeout_and_retried() {
    let env = TestEnv::start(FakeConfig::default()).await;
    env.fake.push_script([Outcome::Hang]);
    let worker = env
        .spawn_worker(&[
            "--llm-attempt-timeout-secs",
            "1",
            "--llm-backoff-base-ms",
            "10",
        ])
        .await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;

    let sent = env.send(chat, "are you there", false, 20).await;
    let reply = events.reply_to(sent.id, WAIT).await;
    assert_eq!(reply["message"]["content"], "Echo: are you there");
    let outcomes: Vec<String> = env.fake.requests().into_iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, ["hang", "ok"]);

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn two_workers_never_exceed_the_shared_request_rate() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let limits = [
        "--rate-limit-rpm",
        "5",
        "--rate-limit-window-ms",
        "1000",
        "--rate-limit-tpm",
        "0",
    ];
    let first = env.spawn_worker(&limits).await;
    let second = env.spawn_worker(&limits).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;

    const JOBS: usize = 40;
    let mut ids = Vec::with_capacity(JOBS);
    for i in 0..JOBS {
        ids.push(env.send(chat, &format!("question {i}"), false, 20).await.id);
    }
    events.replies_to_all(&ids, Duration::from_secs(60)).await;

    let mut arrivals: Vec<u64> = env
        .fake
        .requests()
        .iter()
        .map(|r| r.received_at_ms)
        .collect();
    assert_eq!(arrivals.len(), JOBS);
    arrivals.sort_unstable();
    // Six requests inside any 1000 ms window would mean arrivals[i + 5] - arrivals[i] < 1000.
    // Both times come from the same millisecond clock, so no allowance is needed.
    let tightest = arrivals.windows(6).map(|w| w[5] - w[0]).min();
    eprintln!("tightest span of 6 consecutive arrivals: {tightest:?} ms");
    for (i, window) in arrivals.windows(6).enumerate() {
        let span = window[5] - window[0];
        assert!(
            span >= 1000,
            "requests {i}..={} arrived within {span} ms: {arrivals:?}",
            i + 5
        );
    }

    first.stop().await;
    second.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_job_queued_twice_is_answered_exactly_once() {
    let env = TestEnv::start(FakeConfig {
        latency_ms: 300,
        ..FakeConfig::default()
    })
    .await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;
    let sent = env.send(chat, "only once please", false, 20).await;
    // The same job again under another de-duplication key, as a re-drive or a relay might.
    let job = CompletionJob::new(
        sent.id,
        chat,
        aichat_shared::domain::ContextOptions {
            include_related_chat_context: false,
            context_message_limit: 20,
        },
        None,
    );
    assert!(
        env.queue
            .enqueue_completion(&job, "redrive:1")
            .await
            .expect("enqueue")
    );
    // Started after both pushes, the worker takes both in one fetch and runs them together.
    let worker = env.spawn_worker(&[]).await;

    env.wait_queue_set("done", 2, WAIT).await;
    events.drain(&env, chat).await;
    assert_eq!(env.fake.requests().len(), 2, "both runs called the model");
    assert_eq!(events.of_type("assistant_message").len(), 1);
    let replies: Vec<_> = env
        .messages(chat)
        .await
        .into_iter()
        .filter(|m| m.role == "assistant")
        .collect();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].reply_to, Some(sent.id));
    assert_eq!(env.message(chat, sent.id).await.status, "answered");

    worker.stop().await;
    env.cleanup().await;
}

/// A reply as a job would save it; its question is said to count `tokens + 100`.
fn reply_of(content: &str, tokens: i32) -> NewReply {
    NewReply {
        content: content.to_owned(),
        prompt_tokens: Some(10),
        completion_tokens: Some(2),
        total_tokens: Some(12),
        model: MODEL.to_owned(),
        latency_ms: 5,
        content_tokens: Some(tokens),
        question_tokens: Some(tokens + 100),
    }
}

#[tokio::test]
async fn saving_a_second_reply_to_the_same_message_is_a_no_op() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let sent = env.send(chat, "hi", false, 20).await;
    let reply = |content: &str| reply_of(content, 1);
    let mut tx = env.db.begin().await.expect("tx");
    let first = db::completions::save_reply(&mut *tx, sent.id, &reply("one"))
        .await
        .expect("save");
    tx.commit().await.expect("commit");
    let mut tx = env.db.begin().await.expect("tx");
    let second = db::completions::save_reply(&mut *tx, sent.id, &reply("two"))
        .await
        .expect("save again");
    tx.commit().await.expect("commit");
    assert!(first.is_some());
    assert!(second.is_none());
    // A failure reported after the answer does not overwrite it.
    assert!(
        !db::completions::mark_failed(&env.db, sent.id, "late failure")
            .await
            .expect("mark failed")
    );
    let stored = env.messages(chat).await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].status, "answered");
    assert_eq!(stored[1].content, "one");
    // A deleted message: nothing to save, no error.
    sqlx::query("delete from ai_messages where ai_chat_id = $1")
        .bind(chat)
        .execute(&env.db)
        .await
        .expect("delete");
    let mut tx = env.db.begin().await.expect("tx");
    let gone = db::completions::save_reply(&mut *tx, sent.id, &reply("three"))
        .await
        .expect("save for a deleted message");
    assert!(gone.is_none());
    tx.rollback().await.expect("rollback");
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_of_replies_is_saved_in_one_statement_aligned_with_its_input() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let other = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let first = env.send(chat, "first", false, 20).await;
    let second = env.send(other, "second", false, 20).await;
    let (a, b, dup, missing) = (
        reply_of("a", 1),
        reply_of("b", 2),
        reply_of("dup", 3),
        reply_of("x", 4),
    );
    // Input order is not id order; a message asked twice and one that does not exist.
    let saved = db::completions::save_replies(
        &env.db,
        &[
            (second.id, &b),
            (first.id, &a),
            (second.id, &dup),
            (i64::MAX, &missing),
        ],
    )
    .await
    .expect("save the batch");
    let got: Vec<Option<(i64, String)>> = saved
        .iter()
        .map(|m| {
            m.as_ref()
                .map(|m| (m.reply_to.unwrap_or(0), m.content.clone()))
        })
        .collect();
    assert_eq!(
        got,
        [
            Some((second.id, "b".to_owned())),
            Some((first.id, "a".to_owned())),
            None,
            None
        ]
    );
    let rows: Vec<(i64, String, String, Option<i32>)> = sqlx::query_as(
        "select ai_chat_id, content, status, content_tokens from ai_messages order by id",
    )
    .fetch_all(&env.db)
    .await
    .expect("rows");
    assert_eq!(
        rows,
        [
            (chat, "first".to_owned(), "answered".to_owned(), Some(101)),
            (other, "second".to_owned(), "answered".to_owned(), Some(102)),
            // Written in the order of the messages they answer.
            (chat, "a".to_owned(), "complete".to_owned(), Some(1)),
            (other, "b".to_owned(), "complete".to_owned(), Some(2)),
        ]
    );
    // Saving again stores nothing and changes nothing.
    let again = db::completions::save_replies(&env.db, &[(first.id, &dup)])
        .await
        .expect("save again");
    assert!(again[0].is_none());
    assert_eq!(env.messages(chat).await.len(), 2);
    env.cleanup().await;
}

#[tokio::test]
async fn an_undecodable_job_is_killed_and_the_worker_keeps_going() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let worker = env.spawn_worker(&[]).await;
    let config = aichat_shared::jobs::queue_config(&Namespace::new(env.ns.clone()));
    let task = TaskBuilder::new(br#"{"not":"a completion job"}"#.to_vec()).build();
    let mut conn = env.redis.clone();
    apalis_redis::queries::push_tasks(&mut conn, &config, &[task])
        .await
        .expect("push a malformed job");
    env.wait_queue_set("dead", 1, WAIT).await;

    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;
    let sent = env.send(chat, "still there?", false, 20).await;
    events.reply_to(sent.id, WAIT).await;

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_deleted_message_ends_its_job_quietly() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let sent = env.send(chat, "never mind", false, 20).await;
    db::ai_chats::delete_ai_chat(&env.db, chat, alice.id)
        .await
        .expect("delete chat");
    let worker = env.spawn_worker(&[]).await;
    env.wait_queue_set("done", 1, WAIT).await;
    assert!(env.fake.requests().is_empty());
    assert!(env.queue_set("dead").await.is_empty());
    let _ = sent;
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_busy_worker_keeps_heart_beating_so_its_jobs_are_not_run_twice() {
    let env = TestEnv::start(FakeConfig {
        latency_ms: 3000,
        ..FakeConfig::default()
    })
    .await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;
    // One job at a time, and each takes longer than the 2 s orphan window.
    let busy = env.spawn_worker(&["--worker-concurrency", "1"]).await;
    env.wait_ready(busy.port).await;
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(env.send(chat, &format!("slow {i}"), false, 20).await);
    }
    env.fake.wait_for_requests(1, WAIT).await;
    let idle = env.spawn_worker(&[]).await;

    let ids: Vec<i64> = sent.iter().map(|m| m.id).collect();
    events.replies_to_all(&ids, WAIT).await;
    env.wait_queue_set("done", 3, WAIT).await;
    // Nothing left anywhere in the queue that could still run.
    let mut conn = env.redis.clone();
    let active: usize = redis::AsyncCommands::llen(&mut conn, env.queue_key("active"))
        .await
        .expect("active list");
    assert_eq!(active, 0);
    events.drain(&env, chat).await;
    assert_eq!(
        env.fake.requests().len(),
        3,
        "a job of the busy worker was taken over while it was still alive"
    );
    assert_eq!(events.of_type("assistant_message").len(), 3);

    busy.stop().await;
    idle.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_worker_comes_back_after_redis_restarts() {
    let mut redis = PrivateRedis::start().await;
    let env = TestEnv::start_with_redis(FakeConfig::default(), redis.url()).await;
    let worker = env.spawn_worker(&[]).await;
    env.wait_ready(worker.port).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;
    let before = env.send(chat, "before", false, 20).await;
    events.reply_to(before.id, WAIT).await;

    redis.stop();
    env.wait_unready(worker.port).await;
    redis.restart().await;
    env.wait_ready(worker.port).await;

    let mut events = env.events(chat).await;
    let after = env.send(chat, "after", false, 20).await;
    let reply = events.reply_to(after.id, WAIT).await;
    assert_eq!(reply["message"]["content"], "Echo: after");

    worker.stop().await;
    env.cleanup().await;
    drop(redis);
}

#[tokio::test]
async fn a_graceful_stop_finishes_the_running_job_first() {
    let env = TestEnv::start(FakeConfig {
        latency_ms: 1500,
        ..FakeConfig::default()
    })
    .await;
    let worker = env.spawn_worker(&[]).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let mut events = env.events(chat).await;
    let sent = env.send(chat, "finish me", false, 20).await;
    env.fake.wait_for_requests(1, WAIT).await;

    worker.stop().await;
    events.reply_to(sent.id, WAIT).await;
    assert_eq!(env.message(chat, sent.id).await.status, "answered");
    assert_eq!(
        env.queue_set("done").await.len(),
        1,
        "acknowledged before exit"
    );
    env.cleanup().await;
}

/// Every model call asks for at most `MAX_COMPLETION_TOKENS`; the system message (a long
/// prompt and a related chat with a very long line) keeps within its share of the budget,
/// newest lines first; the whole prompt is within the budget; a question that alone does not
/// fit is failed without calling the model.
#[tokio::test]
async fn every_call_is_bounded_by_the_completion_cap_and_the_system_share() {
    const BUDGET: usize = 400;
    let env = TestEnv::start(FakeConfig::default()).await;
    let worker = env
        .spawn_worker(&[
            "--context-token-budget",
            "400",
            "--system-token-share-percent",
            "25",
            "--max-completion-tokens",
            "77",
        ])
        .await;
    let alice = env.user("alice").await;
    let bob = env.user("bob").await;
    let long_line = "word ".repeat(300);
    let team = env
        .chat(
            "team",
            &[alice.id, bob.id],
            &[
                (bob.id, "the oldest line"),
                (bob.id, &long_line),
                (alice.id, "the newest line"),
            ],
        )
        .await;
    let chat = env.ai_chat(alice.id, "Be brief.", Some(team)).await;
    let mut events = env.events(chat).await;
    let sent = env.send(chat, "what is the plan?", true, 20).await;
    events.reply_to(sent.id, WAIT).await;

    let too_long = "word ".repeat(BUDGET);
    let refused = env.send(chat, &too_long, false, 20).await;
    events
        .until(WAIT, |e| {
            e["type"] == "error" && e["message_id"].as_i64() == Some(refused.id)
        })
        .await;
    let stored = env.message(chat, refused.id).await;
    assert_eq!(stored.status, "failed");
    assert_eq!(
        stored.error.as_deref(),
        Some("This message is too long for the AI model's context.")
    );

    let requests = env.fake.requests();
    assert_eq!(
        requests.len(),
        1,
        "the question too long for the budget never reached the model"
    );
    let request = &requests[0];
    assert_eq!(request.params["max_completion_tokens"], 77);
    let counter = TokenCounter::cl100k();
    let system = request.messages[0]["content"]
        .as_str()
        .expect("system text");
    assert!(counter.text(system) <= BUDGET / 4, "{system:?}");
    assert!(system.starts_with("Be brief."), "{system:?}");
    assert!(system.ends_with("alice: the newest line\n"), "{system:?}");
    assert!(
        system.contains("bob: word word"),
        "the long line is cut, not dropped: {system:?}"
    );
    assert!(!system.contains("the oldest line"), "{system:?}");
    let prompt: Vec<PromptMessage> = request
        .messages
        .iter()
        .map(|m| {
            let role = match m["role"].as_str() {
                Some("system") => Role::System,
                Some("assistant") => Role::Assistant,
                _ => Role::User,
            };
            PromptMessage::new(role, m["content"].as_str().unwrap_or_default())
        })
        .collect();
    assert!(counter.prompt(&prompt) <= BUDGET);
    worker.stop().await;
    env.cleanup().await;
}

/// A chat's model reaches the provider only while it is allowed; a chat whose model the
/// operator took off the list is answered by the default model.
#[tokio::test]
async fn only_allowed_models_reach_the_provider() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let worker = env.spawn_worker(&["--allowed-models", "other-ok"]).await;
    let alice = env.user("alice").await;
    let allowed = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    let dropped = env.ai_chat(alice.id, SYSTEM_PROMPT, None).await;
    for (chat, model) in [(allowed, "other-ok"), (dropped, "taken-off-the-list")] {
        sqlx::query("update ai_chats set model = $2 where id = $1")
            .bind(chat)
            .bind(model)
            .execute(&env.db)
            .await
            .expect("set the chat's model");
    }
    for chat in [allowed, dropped] {
        let mut events = env.events(chat).await;
        let sent = env.send(chat, "hello", false, 20).await;
        events.reply_to(sent.id, WAIT).await;
    }
    let models: Vec<String> = env
        .fake
        .requests()
        .iter()
        .map(|r| r.model.clone())
        .collect();
    assert_eq!(models, vec!["other-ok".to_owned(), MODEL.to_owned()]);
    // Metrics are labelled with allowed models only, the idle ones included.
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", worker.port))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(!metrics.contains("taken-off-the-list"), "{metrics}");
    for model in ["other-ok", MODEL] {
        assert!(
            metrics.contains(&format!("aichat_worker_tokens_total{{model=\"{model}\"")),
            "{model}: {metrics}"
        );
    }
    worker.stop().await;
    env.cleanup().await;
}
