//! Fault 8 (bad input), worker side: property tests of the prompt builder and the token-budget
//! trimming (worker/src/context.rs) over arbitrary histories, contents and budgets.
use aichat_shared::db::completions::HistoryMessage;
use aichat_worker::context::{PromptMessage, Role, TokenCounter, build_prompt, trim_to_budget};
use proptest::prelude::*;

/// Tokens priming the reply, counted once per prompt (context.rs).
const PRIMING: usize = 3;

/// One token per word: budgets stay easy to reason about.
fn words(m: &PromptMessage) -> usize {
    m.content.split_whitespace().count()
}

fn content() -> impl Strategy<Value = String> {
    // Words, blanks, unicode and the odd empty string.
    prop_oneof![
        4 => proptest::collection::vec("[a-z]{1,8}", 0..12).prop_map(|w| w.join(" ")),
        1 => "\\PC{0,40}",
        1 => Just(String::new()),
    ]
}

fn history() -> impl Strategy<Value = Vec<HistoryMessage>> {
    proptest::collection::vec(
        (
            prop_oneof![
                4 => Just(Role::User),
                4 => Just(Role::Assistant),
                1 => Just(Role::System)
            ],
            content(),
        )
            .prop_map(|(role, content)| HistoryMessage {
                role,
                content,
                content_tokens: None,
            }),
        0..40,
    )
}

fn role_of(m: &HistoryMessage) -> Option<Role> {
    match m.role {
        Role::User | Role::Assistant => Some(m.role),
        Role::System => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The prompt is the system message, the user and assistant history in order (other roles
    /// left out), then the new message.
    #[test]
    fn the_prompt_is_system_history_then_new(system in content(), history in history(), new in content()) {
        let prompt = build_prompt(system.clone(), &history, &new);
        prop_assert_eq!(&prompt[0], &PromptMessage::new(Role::System, system));
        prop_assert_eq!(prompt.last().expect("new"), &PromptMessage::new(Role::User, new));
        let expected: Vec<PromptMessage> = history
            .iter()
            .filter_map(|m| role_of(m).map(|r| PromptMessage::new(r, m.content.clone())))
            .collect();
        prop_assert_eq!(&prompt[1..prompt.len() - 1], &expected[..]);
    }

    /// Trimming keeps the system and new messages, keeps a contiguous suffix of the history
    /// (oldest dropped first) starting at a whole turn, reports the kept prompt's true cost,
    /// fits the budget whenever any history is kept, and drops nothing it did not need to.
    #[test]
    fn trimming_drops_the_oldest_whole_turns_and_only_as_many_as_needed(
        system in content(),
        history in history(),
        new in content(),
        budget in 0usize..200,
    ) {
        let prompt = build_prompt(system, &history, &new);
        let full: usize = PRIMING + prompt.iter().map(words).sum::<usize>();
        let (kept, total) = trim_to_budget(prompt.clone(), budget, words);

        prop_assert!(kept.len() >= 2);
        prop_assert_eq!(&kept[0], &prompt[0]);
        prop_assert_eq!(kept.last(), prompt.last());
        prop_assert_eq!(total, PRIMING + kept.iter().map(words).sum::<usize>());

        // The kept history is the tail of the full history.
        let old = &prompt[1..prompt.len() - 1];
        let kept_history = &kept[1..kept.len() - 1];
        let dropped = old.len() - kept_history.len();
        prop_assert_eq!(&old[dropped..], kept_history);

        if full <= budget {
            prop_assert_eq!(&kept, &prompt, "nothing is dropped from a prompt that fits");
        }
        if !kept_history.is_empty() {
            prop_assert!(total <= budget, "history kept beyond the budget: {} > {}", total, budget);
        }
        if dropped > 0 && !kept_history.is_empty() {
            // The cut is at a turn boundary...
            prop_assert_eq!(kept_history[0].role, Role::User);
            // ...and putting back the turn before it would not fit.
            let mut start = dropped - 1;
            while start > 0 && old[start].role != Role::User {
                start -= 1;
            }
            let turn: usize = old[start..dropped].iter().map(words).sum();
            prop_assert!(total + turn > budget, "a droppable turn was dropped needlessly");
        }
        if dropped > 0 && kept_history.is_empty() && old.iter().any(|m| m.role == Role::User) {
            // Everything went: even the last turn alone did not fit.
            let last_user = old.iter().rposition(|m| m.role == Role::User).expect("a user turn");
            let turn: usize = old[last_user..].iter().map(words).sum();
            prop_assert!(total + turn > budget);
        }
    }

    /// With the real tokenizer (cl100k): the same guarantees on arbitrary text.
    #[test]
    fn real_token_counts_respect_the_budget(
        system in content(),
        history in history(),
        new in content(),
        budget in 0usize..400,
    ) {
        let counter = TokenCounter::cl100k();
        let prompt = build_prompt(system, &history, &new);
        let (kept, total) = trim_to_budget(prompt.clone(), budget, |m| counter.message(m));
        prop_assert_eq!(total, counter.prompt(&kept));
        prop_assert_eq!(&kept[0], &prompt[0]);
        prop_assert_eq!(kept.last(), prompt.last());
        if kept.len() > 2 {
            prop_assert!(total <= budget);
        }
        if counter.prompt(&prompt) <= budget {
            prop_assert_eq!(kept, prompt);
        }
    }
}
