//! What the model is sent: the context contract, the token budget, stored token counts, the
//! completion cap and the system share, the allowed models.

use crate::common::{Events, MODEL, SYSTEM_PROMPT, TestEnv, WAIT, worker_metrics_text};
use aichat_fake_llm::FakeConfig;
use aichat_shared::db;
use aichat_testkit::DEFAULT_CONTEXT;
use aichat_worker::context::{PromptMessage, Role, TokenCounter};
use serde_json::Value;

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

/// Sends `content` into `chat` (with these context options), waits for its reply, and answers
/// the prompt the model was sent for it.
async fn prompt_for(
    env: &TestEnv,
    events: &mut Events,
    chat: i64,
    content: &str,
    include_related_chat_context: bool,
    context_message_limit: i32,
) -> Vec<(String, String)> {
    let sent = env
        .send(
            chat,
            content,
            include_related_chat_context,
            context_message_limit,
        )
        .await;
    events.reply_to(sent.id, WAIT).await;
    let last = env.fake.requests().pop().expect("a request");
    role_and_content(&last.messages)
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

    let first = env.ask(chat, "first").await;
    events.reply_to(first.id, WAIT).await;
    // A message that failed earlier is not part of the conversation.
    let lost = aichat_testkit::store_user_message(&env.db, chat, "lost", DEFAULT_CONTEXT).await;
    assert!(
        db::completions::mark_failed(&env.db, lost.id, "failed")
            .await
            .expect("mark failed")
    );

    assert_eq!(
        prompt_for(&env, &mut events, chat, "second", true, 3).await,
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

    assert_eq!(
        prompt_for(&env, &mut events, chat, "third", false, 20).await,
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
    let fourth = prompt_for(&env, &mut events, chat, "fourth", true, 20).await;
    assert_eq!(fourth[0], ("system".to_owned(), system.to_owned()));
    assert_eq!(fourth.len(), 8);

    env.finish([worker]).await;
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
    let (chat, mut events) = env.watched_chat().await;
    for content in questions {
        let sent = env.ask(chat, content).await;
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
    env.finish([worker]).await;
}

#[tokio::test]
async fn token_counts_are_stored_once_and_then_decide_what_fits() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let worker = env.spawn_worker(&[]).await;
    let (chat, mut events) = env.watched_chat().await;
    let first = "how many tokens does this sentence hold?";
    let sent = env.ask(chat, first).await;
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
    let second = env.ask(chat, "and this one?").await;
    events.reply_to(second.id, WAIT).await;
    let requests = env.fake.requests();
    assert_eq!(
        role_and_content(&requests[1].messages),
        pairs(&[("system", SYSTEM_PROMPT), ("user", "and this one?")])
    );
    env.finish([worker]).await;
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
    let refused = env.ask(chat, &too_long).await;
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
    assert!(aichat_testkit::prompt_tokens(&counter, &request.messages) <= BUDGET);
    env.finish([worker]).await;
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
        let sent = env.ask(chat, "hello").await;
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
    let metrics = worker_metrics_text(worker.port).await;
    assert!(!metrics.contains("taken-off-the-list"), "{metrics}");
    for model in ["other-ok", MODEL] {
        assert!(
            metrics.contains(&format!("aichat_worker_tokens_total{{model=\"{model}\"")),
            "{model}: {metrics}"
        );
    }
    env.finish([worker]).await;
}
