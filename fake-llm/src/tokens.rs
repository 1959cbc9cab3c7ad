//! Owns the deterministic "model": reply text, word chunking and token accounting.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Framing overhead counted per prompt message, standing in for the role/separator
/// tokens real chat templates spend, so empty messages still cost something.
pub const TOKENS_PER_MESSAGE: u32 = 4;

/// Prefix of every echo reply.
pub const ECHO_PREFIX: &str = "Echo: ";

const LOREM: [&str; 8] = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
];

/// Token usage in the OpenAI `usage` shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    /// Usage for a prompt made of `contents` (one text per message) answered with `reply`.
    pub fn for_exchange<I, S>(contents: I, reply: &str) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let prompt_tokens = prompt_tokens(contents);
        let completion_tokens = completion_tokens(reply);
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// Number of whitespace-separated words in `text`: the fake's notion of a token.
pub fn count_words_tokens(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}

/// `sum over messages of (count_words_tokens(content) + 4)`.
pub fn prompt_tokens<I, S>(contents: I) -> u32
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    contents.into_iter().fold(0u32, |acc, content| {
        acc.saturating_add(count_words_tokens(content.as_ref()))
            .saturating_add(TOKENS_PER_MESSAGE)
    })
}

/// `count_words_tokens(reply)`.
pub fn completion_tokens(reply: &str) -> u32 {
    count_words_tokens(reply)
}

/// The echo reply: `"Echo: " + last user content` (just `"Echo: "` without a user message).
pub fn echo_reply(last_user_content: Option<&str>) -> String {
    format!("{ECHO_PREFIX}{}", last_user_content.unwrap_or_default())
}

/// `words` words cycling through a fixed lorem-ipsum list, separated by single spaces.
pub fn lorem_reply(words: usize) -> String {
    LOREM
        .iter()
        .cycle()
        .take(words)
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The reply the fake gives: `reply` when set, else lorem words when `reply_words` is set,
/// otherwise the echo.
pub fn reply_text(
    last_user_content: Option<&str>,
    reply_words: Option<usize>,
    reply: Option<&str>,
) -> String {
    match (reply, reply_words) {
        (Some(reply), _) => reply.to_owned(),
        (None, Some(words)) => lorem_reply(words),
        (None, None) => echo_reply(last_user_content),
    }
}

/// Plain text of a message `content`: a string as is, text parts of an array joined with
/// a space (so word counts are unaffected), anything else (null, tool calls) empty.
pub fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| match part {
                Value::String(text) => Some(text.as_str()),
                Value::Object(obj) => obj.get("text").and_then(Value::as_str),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Splits `reply` into word chunks, each keeping its trailing whitespace, so that
/// concatenating the chunks gives `reply` back byte for byte.
pub fn split_word_chunks(reply: &str) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut prev_is_space = false;
    for (idx, ch) in reply.char_indices() {
        let is_space = ch.is_whitespace();
        // A word starts where non-whitespace follows whitespace; leading whitespace stays
        // with the first chunk instead of becoming a chunk of its own.
        if prev_is_space && !is_space && idx > start {
            chunks.push(&reply[start..idx]);
            start = idx;
        }
        prev_is_space = is_space;
    }
    if start < reply.len() {
        chunks.push(&reply[start..]);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chunks_concatenate_to_the_reply() {
        for reply in [
            "Echo: hello  world\n",
            "Echo: ",
            "",
            "  lead",
            "a b c",
            "é ü ß",
        ] {
            assert_eq!(split_word_chunks(reply).concat(), reply);
        }
        assert_eq!(
            split_word_chunks("Echo: hi there"),
            ["Echo: ", "hi ", "there"]
        );
    }

    #[test]
    fn usage_formula() {
        let usage = Usage::for_exchange(["You are terse.", "hi there"], "Echo: hi there");
        assert_eq!(usage.prompt_tokens, (3 + 4) + (2 + 4));
        assert_eq!(usage.completion_tokens, 3);
        assert_eq!(usage.total_tokens, 16);
        assert_eq!(prompt_tokens(Vec::<String>::new()), 0);
    }

    #[test]
    fn replies() {
        assert_eq!(echo_reply(None), "Echo: ");
        assert_eq!(lorem_reply(10).split(' ').count(), 10);
        assert_eq!(lorem_reply(0), "");
        assert_eq!(reply_text(Some("x"), Some(2), None), "lorem ipsum");
        assert_eq!(reply_text(Some("x"), Some(2), Some("set")), "set");
    }

    #[test]
    fn content_parts() {
        let parts = json!([{"type": "text", "text": "a b"}, {"type": "image_url"}, "c"]);
        assert_eq!(content_text(Some(&parts)), "a b c");
        assert_eq!(content_text(Some(&Value::Null)), "");
        assert_eq!(content_text(None), "");
    }
}
