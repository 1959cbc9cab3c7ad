//! Building the prompt of one completion (docs/API.md, "How context is built") and trimming it to
//! the token budget. Pure functions: the job loads the rows, this decides what the model sees.
use aichat_shared::db::completions::HistoryMessage;
use aichat_shared::domain::ContextMessage;
use aichat_shared::lock::lock;
use tiktoken_rs::CoreBPE;

/// Heading of the related chat's lines inside the system message.
pub const RELATED_CONTEXT_HEADER: &str = "\n\nContext from related chat:\n";

/// Tokens a chat template spends around each message (role and separators), after OpenAI's
/// published counting recipe for the gpt-3.5/gpt-4 family.
pub const TOKENS_PER_MESSAGE: usize = 4;
/// Tokens that prime the assistant's reply.
pub const REPLY_PRIMING_TOKENS: usize = 3;

/// Remembered counts at most; past it the memo restarts. A job counts its chat's last turns,
/// so a few thousand cover every chat in flight. The cap keeps the table small (~0.5 MiB),
/// allocated once and reused when the memo restarts, so the worker's memory stays flat however
/// many messages go by.
const MAX_CACHED_COUNTS: usize = 16_384;

/// Token counts by hash of the text, shared by every job of the process.
fn lock_counts() -> std::sync::MutexGuard<'static, std::collections::HashMap<u64, usize>> {
    static COUNTS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<u64, usize>>> =
        std::sync::OnceLock::new();
    lock(COUNTS.get_or_init(Default::default))
}

/// Who speaks in a prompt message: the roles a message is stored with. The prompt's system
/// message is built from the chat's settings rather than stored, and only the user and
/// assistant rows of the history enter the prompt (`build_prompt`).
pub use aichat_shared::domain::Role;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptMessage {
    pub role: Role,
    pub content: String,
    /// Tokens of `content` when already known (stored with the message), so it need not be
    /// counted again.
    pub known_tokens: Option<usize>,
}

impl PromptMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        PromptMessage {
            role,
            content: content.into(),
            known_tokens: None,
        }
    }
}

/// System message, then the history oldest first, then the new user message.
pub fn build_prompt(
    system: String,
    history: &[HistoryMessage],
    new_message: &str,
) -> Vec<PromptMessage> {
    let mut prompt = Vec::with_capacity(history.len() + 2);
    prompt.push(PromptMessage::new(Role::System, system));
    prompt.extend(history.iter().filter_map(|m| {
        let role = match m.role {
            Role::User | Role::Assistant => m.role,
            Role::System => return None,
        };
        Some(PromptMessage {
            known_tokens: stored_tokens(m),
            ..PromptMessage::new(role, m.content.clone())
        })
    }));
    prompt.push(PromptMessage::new(Role::User, new_message));
    prompt
}

/// The token count stored with a history message, if any.
pub fn stored_tokens(message: &HistoryMessage) -> Option<usize> {
    message.content_tokens.and_then(|n| usize::try_from(n).ok())
}

/// Counts prompt tokens the way the provider bills them (cl100k_base, which ships inside
/// tiktoken-rs, so this works offline).
#[derive(Clone, Copy)]
pub struct TokenCounter {
    bpe: &'static CoreBPE,
}

impl TokenCounter {
    pub fn cl100k() -> Self {
        TokenCounter {
            bpe: tiktoken_rs::cl100k_base_singleton(),
        }
    }

    /// Tokens of `text`. Counts are remembered by a hash of the text: every job of a chat
    /// counts the same history again, and BPE over it each time would be CPU spent for nothing.
    /// Short texts too: hashing a few bytes costs nanoseconds, their BPE (the pre-tokenising
    /// regex) microseconds; short messages ("thanks", "ok") are common.
    pub fn text(&self, text: &str) -> usize {
        let key = {
            let mut hasher = std::hash::DefaultHasher::new();
            std::hash::Hash::hash(text, &mut hasher);
            std::hash::Hasher::finish(&hasher)
        };
        if let Some(&count) = lock_counts().get(&key) {
            return count;
        }
        let count = self.text_once(text);
        let mut counts = lock_counts();
        if counts.len() >= MAX_CACHED_COUNTS {
            counts.clear();
        }
        counts.insert(key, count);
        count
    }

    /// Tokens of `text`, counted now and not remembered: for a text whose count is stored
    /// with it (a reply), so it is never asked for again.
    pub fn text_once(&self, text: &str) -> usize {
        self.bpe.encode_with_special_tokens(text).len()
    }

    /// The longest prefix of `text` within `max` tokens, cut at a character boundary.
    pub fn truncate(&self, text: &str, max: usize) -> String {
        let tokens = self.bpe.encode_with_special_tokens(text);
        if tokens.len() <= max {
            return text.to_owned();
        }
        let bytes = self.bpe.decode_bytes(&tokens[..max]).unwrap_or_default();
        // The last token may end inside a character: keep what is whole.
        match String::from_utf8(bytes) {
            Ok(prefix) => prefix,
            Err(err) => {
                let whole = err.utf8_error().valid_up_to();
                String::from_utf8_lossy(&err.into_bytes()[..whole]).into_owned()
            }
        }
    }

    /// Tokens of a message with its framing; a stored count is taken as it is.
    pub fn message(&self, message: &PromptMessage) -> usize {
        self.framed(&message.content, message.known_tokens)
    }

    /// Tokens of a message of `content` with its framing, `known` when its count is stored.
    pub fn framed(&self, content: &str, known: Option<usize>) -> usize {
        TOKENS_PER_MESSAGE + known.unwrap_or_else(|| self.text(content))
    }

    /// Tokens of a whole prompt, reply priming included.
    pub fn prompt(&self, prompt: &[PromptMessage]) -> usize {
        REPLY_PRIMING_TOKENS + prompt.iter().map(|m| self.message(m)).sum::<usize>()
    }
}

/// Related lines are not cut shorter than this: a few words of a line say nothing.
const MIN_CUT_LINE_TOKENS: usize = 16;

/// The system message within `cap` tokens: the chat's prompt (cut when it alone takes the
/// cap), then the related chat's newest lines that fit, oldest dropped first; the newest line
/// that does not fit whole is cut to the room left. `related` is oldest first.
pub fn system_within(
    system_prompt: &str,
    related: Option<&[ContextMessage]>,
    cap: usize,
    counter: &TokenCounter,
) -> String {
    let prompt_tokens = counter.text(system_prompt);
    if prompt_tokens >= cap {
        return counter.truncate(system_prompt, cap);
    }
    let mut content = system_prompt.to_owned();
    let Some(lines) = related.filter(|lines| !lines.is_empty()) else {
        return content;
    };
    let header_tokens = counter.text(RELATED_CONTEXT_HEADER);
    let Some(mut room) = (cap - prompt_tokens).checked_sub(header_tokens) else {
        return content;
    };
    let mut kept = Vec::new();
    for line in lines.iter().rev() {
        let text = format!("{}: {}\n", line.sender, line.content);
        let cost = counter.text(&text);
        if cost <= room {
            room -= cost;
            kept.push(text);
            continue;
        }
        if room >= MIN_CUT_LINE_TOKENS {
            let mut cut = counter.truncate(&text, room - 1);
            cut.push('\n');
            kept.push(cut);
        }
        break;
    }
    if !kept.is_empty() {
        content.push_str(RELATED_CONTEXT_HEADER);
        for text in kept.iter().rev() {
            content.push_str(text);
        }
    }
    content
}

/// Drops the oldest turns of history until the prompt fits `budget` tokens. A turn is a user
/// message with the assistant replies that follow it, so no reply is left without its
/// question. The system message (first) and the new message (last) always stay, even when
/// they alone exceed the budget. Returns the trimmed prompt and its token count.
pub fn trim_to_budget(
    prompt: Vec<PromptMessage>,
    budget: usize,
    count: impl Fn(&PromptMessage) -> usize,
) -> (Vec<PromptMessage>, usize) {
    let costs: Vec<usize> = prompt.iter().map(&count).collect();
    let mut total = REPLY_PRIMING_TOKENS + costs.iter().sum::<usize>();
    if prompt.len() <= 2 || total <= budget {
        return (prompt, total);
    }
    let last = prompt.len() - 1;
    // History is prompt[1..last]; find where to cut it, always at a turn boundary.
    let mut cut = 1;
    while cut < last && total > budget {
        let turn_end = next_turn_start(&prompt, cut, last);
        total -= costs[cut..turn_end].iter().sum::<usize>();
        cut = turn_end;
    }
    let mut trimmed = prompt;
    trimmed.drain(1..cut);
    (trimmed, total)
}

/// The index after the turn starting at `start`: the next user message, or `end`.
fn next_turn_start(prompt: &[PromptMessage], start: usize, end: usize) -> usize {
    let mut i = start + 1;
    while i < end && prompt[i].role != Role::User {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_token_counts_match_fresh_ones() {
        let counter = TokenCounter::cl100k();
        let text = "The quick brown fox jumps over the lazy dog, again and again. ".repeat(3);
        let fresh = counter.bpe.encode_with_special_tokens(&text).len();
        assert_eq!(counter.text(&text), fresh, "first count");
        assert_eq!(counter.text(&text), fresh, "remembered count");
        let other = format!("{text}!");
        assert_eq!(
            counter.text(&other),
            counter.bpe.encode_with_special_tokens(&other).len()
        );
    }
    use chrono::Utc;

    fn history(items: &[(&str, &str)]) -> Vec<HistoryMessage> {
        items
            .iter()
            .map(|(role, content)| HistoryMessage {
                role: role.parse().expect("a role"),
                content: (*content).to_owned(),
                content_tokens: None,
            })
            .collect()
    }

    fn line(sender: &str, content: &str) -> ContextMessage {
        ContextMessage {
            sender: sender.to_owned(),
            content: content.to_owned(),
            timestamp: Utc::now(),
        }
    }

    /// One token per word, so budgets are easy to reason about.
    fn words(m: &PromptMessage) -> usize {
        m.content.split_whitespace().count()
    }

    fn contents(prompt: &[PromptMessage]) -> Vec<&str> {
        prompt.iter().map(|m| m.content.as_str()).collect()
    }

    #[test]
    fn system_message_carries_the_related_chat_lines_in_order() {
        let counter = TokenCounter::cl100k();
        let lines = [line("bob", "hi"), line("alice", "the plan")];
        assert_eq!(
            system_within("Be brief.", Some(&lines), 1000, &counter),
            "Be brief.\n\nContext from related chat:\nbob: hi\nalice: the plan\n"
        );
        assert_eq!(
            system_within("Be brief.", None, 1000, &counter),
            "Be brief."
        );
    }

    #[test]
    fn the_system_message_keeps_within_its_cap_dropping_the_oldest_lines_first() {
        let counter = TokenCounter::cl100k();
        let long = "word ".repeat(400);
        let lines = [
            line("old", "the oldest line"),
            line("bob", &long),
            line("alice", "the newest line"),
        ];
        for cap in [5, 20, 40, 100, 300, 1000, 5000] {
            let system = system_within("Be brief.", Some(&lines), cap, &counter);
            assert!(counter.text(&system) <= cap, "cap {cap}: {system:?}");
            assert!(system.starts_with("Be brief."), "cap {cap}");
            if system.contains("old:") {
                // A line is never kept while a newer one was dropped.
                assert!(system.contains("alice: the newest line") && system.contains(&long));
            }
        }
        // Room for the newest line and part of the long one, not the oldest.
        let system = system_within("Be brief.", Some(&lines), 100, &counter);
        assert!(system.ends_with("alice: the newest line\n"), "{system:?}");
        assert!(system.contains("bob: word word"), "{system:?}");
        assert!(!system.contains("old:"), "{system:?}");
        // A prompt longer than the cap is cut to it.
        let prompt = "Be very brief. ".repeat(100);
        let system = system_within(&prompt, Some(&lines), 50, &counter);
        assert!(prompt.starts_with(&system) && counter.text(&system) <= 50);
        assert!(!system.contains("Context from related chat"));
    }

    #[test]
    fn prompt_is_system_history_then_the_new_message() {
        let prompt = build_prompt(
            "sys".into(),
            &history(&[("user", "a"), ("assistant", "b"), ("system", "x")]),
            "c",
        );
        let roles: Vec<Role> = prompt.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [Role::System, Role::User, Role::Assistant, Role::User]
        );
        assert_eq!(contents(&prompt), ["sys", "a", "b", "c"]);
    }

    #[test]
    fn a_prompt_within_budget_is_untouched() {
        let prompt = build_prompt("s".into(), &history(&[("user", "a b")]), "c");
        let (trimmed, total) = trim_to_budget(prompt.clone(), 100, words);
        assert_eq!(trimmed, prompt);
        assert_eq!(total, REPLY_PRIMING_TOKENS + 4);
    }

    #[test]
    fn the_oldest_whole_turns_go_first() {
        let prompt = build_prompt(
            "s".into(),
            &history(&[
                ("user", "one one one"),
                ("assistant", "r1 r1"),
                ("user", "two"),
                ("assistant", "r2"),
            ]),
            "new",
        );
        // Everything: 3 priming + 1 + 5 + 2 + 1 = 12. Dropping the first turn leaves 7.
        let (trimmed, total) = trim_to_budget(prompt, 8, words);
        assert_eq!(contents(&trimmed), ["s", "two", "r2", "new"]);
        assert_eq!(total, 7);
    }

    #[test]
    fn system_and_new_message_stay_even_over_budget() {
        let prompt = build_prompt(
            "a long system prompt".into(),
            &history(&[("user", "old"), ("assistant", "reply")]),
            "a long new message",
        );
        let (trimmed, total) = trim_to_budget(prompt, 1, words);
        assert_eq!(
            contents(&trimmed),
            ["a long system prompt", "a long new message"]
        );
        assert_eq!(total, REPLY_PRIMING_TOKENS + 8);
    }

    #[test]
    fn a_leading_reply_without_its_question_goes_with_the_first_turn() {
        let prompt = build_prompt(
            "s".into(),
            &history(&[("assistant", "orphan"), ("user", "q"), ("assistant", "a")]),
            "n",
        );
        let (trimmed, _) = trim_to_budget(prompt, REPLY_PRIMING_TOKENS + 4, words);
        assert_eq!(contents(&trimmed), ["s", "q", "a", "n"]);
    }

    #[test]
    fn a_stored_count_is_used_instead_of_counting_again() {
        let counter = TokenCounter::cl100k();
        let stored = HistoryMessage {
            role: Role::User,
            content: "hello world".to_owned(),
            content_tokens: Some(40),
        };
        let prompt = build_prompt("s".into(), &[stored], "hello world");
        assert_eq!(prompt[1].known_tokens, Some(40));
        assert_eq!(counter.message(&prompt[1]), 4 + 40);
        // The new message has no stored count yet: it is counted.
        assert_eq!(counter.message(&prompt[2]), 4 + 2);
    }

    #[test]
    fn cl100k_counts_known_text() {
        let counter = TokenCounter::cl100k();
        assert_eq!(counter.text("hello world"), 2);
        let prompt = [PromptMessage::new(Role::User, "hello world")];
        assert_eq!(counter.prompt(&prompt), 3 + 4 + 2);
    }
}
