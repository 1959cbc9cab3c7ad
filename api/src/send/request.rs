//! The rules of a sent message, parsed once for REST `send_message` and the WebSocket's
//! `message` frame: what passes is a [`SendMessage`]; what does not is [`Refused`] with its
//! [`SendProblem`]s, which REST answers as field errors (every problem) and the socket as one
//! `error` event (the first problem, in the socket's own words).
use aichat_shared::domain::ContextOptions;

use crate::error::{ApiError, FieldErrors};
use crate::validate::{self, TextProblem};

/// Related-chat messages put in the prompt when the client names no number.
const DEFAULT_CONTEXT_MESSAGE_LIMIT: i64 = 20;
const MIN_CONTEXT_MESSAGE_LIMIT: i32 = 1;
const MAX_CONTEXT_MESSAGE_LIMIT: i32 = 100;

/// The fields of a send as the client wrote them, from a REST body or a WebSocket frame.
pub struct SendFields<'a> {
    /// `None` also for content that is not a string (only the socket lets one through).
    pub content: Option<&'a str>,
    pub include_related_chat_context: Option<bool>,
    pub context_message_limit: Option<i64>,
}

/// A message that passed every rule: ready to be stored and queued.
#[derive(Debug)]
pub struct SendMessage<'a> {
    pub content: &'a str,
    pub options: ContextOptions,
}

/// One rule a send broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendProblem {
    Content(TextProblem),
    ContextMessageLimit,
}

impl SendProblem {
    /// The field the problem is about, as the REST body names it.
    fn field(self) -> &'static str {
        match self {
            SendProblem::Content(_) => "content",
            SendProblem::ContextMessageLimit => "context_message_limit",
        }
    }

    /// The field error a REST client reads.
    fn field_error(self) -> String {
        match self {
            SendProblem::Content(problem) => problem.field_error(),
            SendProblem::ContextMessageLimit => validate::out_of_range(
                MIN_CONTEXT_MESSAGE_LIMIT.into(),
                MAX_CONTEXT_MESSAGE_LIMIT.into(),
            ),
        }
    }

    /// The message of the WebSocket `error` event: the socket's clients read these words.
    fn socket_message(self) -> String {
        match self {
            SendProblem::Content(TextProblem::Missing | TextProblem::Blank) => {
                "Message content cannot be empty".to_owned()
            }
            SendProblem::Content(TextProblem::Nul) => validate::NULL_CHARACTER.to_owned(),
            SendProblem::Content(TextProblem::TooLong { max }) => {
                format!("Message content is too long (at most {max} characters)")
            }
            SendProblem::ContextMessageLimit => format!(
                "context_message_limit must be between {MIN_CONTEXT_MESSAGE_LIMIT} and \
                 {MAX_CONTEXT_MESSAGE_LIMIT}"
            ),
        }
    }
}

/// Why a send was refused: the content's problem and then the limit's, or the limit's alone.
#[derive(Debug)]
pub struct Refused {
    first: SendProblem,
    then: Option<SendProblem>,
}

impl Refused {
    /// Every problem found, in order.
    fn problems(&self) -> impl Iterator<Item = SendProblem> {
        std::iter::once(self.first).chain(self.then)
    }

    /// The WebSocket `error` event's message: the first problem only.
    pub fn socket_message(&self) -> String {
        self.first.socket_message()
    }
}

impl From<Refused> for ApiError {
    /// 400 with every problem under its field.
    fn from(refused: Refused) -> Self {
        let mut errors = FieldErrors::default();
        for problem in refused.problems() {
            errors.add(problem.field(), problem.field_error());
        }
        ApiError::Validation(errors)
    }
}

impl<'a> SendMessage<'a> {
    /// Checks `fields`: the content by the text rule (at most `max_content_chars`
    /// characters), the related-chat limit within 1–100 (20 when absent).
    pub fn parse(fields: SendFields<'a>, max_content_chars: usize) -> Result<Self, Refused> {
        let content =
            validate::check_text(fields.content, max_content_chars).map_err(SendProblem::Content);
        let limit = fields
            .context_message_limit
            .unwrap_or(DEFAULT_CONTEXT_MESSAGE_LIMIT);
        let limit = i32::try_from(limit)
            .ok()
            .filter(|limit| (MIN_CONTEXT_MESSAGE_LIMIT..=MAX_CONTEXT_MESSAGE_LIMIT).contains(limit))
            .ok_or(SendProblem::ContextMessageLimit);
        match (content, limit) {
            (Ok(content), Ok(context_message_limit)) => Ok(SendMessage {
                content,
                options: ContextOptions {
                    include_related_chat_context: fields
                        .include_related_chat_context
                        .unwrap_or(false),
                    context_message_limit,
                },
            }),
            (Err(first), limit) => Err(Refused {
                first,
                then: limit.err(),
            }),
            (Ok(_), Err(first)) => Err(Refused { first, then: None }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(content: Option<&str>, limit: Option<i64>) -> SendFields<'_> {
        SendFields {
            content,
            include_related_chat_context: None,
            context_message_limit: limit,
        }
    }

    fn refused(content: Option<&str>, limit: Option<i64>) -> Vec<SendProblem> {
        match SendMessage::parse(fields(content, limit), 10) {
            Ok(message) => panic!("accepted {message:?}"),
            Err(refused) => refused.problems().collect(),
        }
    }

    #[test]
    fn a_valid_send_keeps_its_content_as_sent_and_defaults_its_options() {
        let send = SendMessage::parse(fields(Some(" hi "), None), 10).expect("valid");
        assert_eq!(send.content, " hi ");
        assert_eq!(send.options.context_message_limit, 20);
        assert!(!send.options.include_related_chat_context);
        let send = SendMessage::parse(fields(Some("hi"), Some(100)), 10).expect("valid");
        assert_eq!(send.options.context_message_limit, 100);
    }

    #[test]
    fn every_problem_is_found_content_first() {
        use SendProblem::{Content, ContextMessageLimit};
        assert_eq!(
            refused(None, Some(0)),
            [Content(TextProblem::Missing), ContextMessageLimit]
        );
        assert_eq!(refused(Some(" \n"), None), [Content(TextProblem::Blank)]);
        assert_eq!(refused(Some("a\0b"), None), [Content(TextProblem::Nul)]);
        assert_eq!(
            refused(Some("12345678901"), None),
            [Content(TextProblem::TooLong { max: 10 })]
        );
        assert_eq!(refused(Some("hi"), Some(101)), [ContextMessageLimit]);
        assert_eq!(refused(Some("hi"), Some(i64::MAX)), [ContextMessageLimit]);
    }

    #[test]
    fn rest_and_the_socket_word_the_same_problems_their_own_way() {
        let problems = [
            (
                SendProblem::Content(TextProblem::Missing),
                "This field is required.",
                "Message content cannot be empty",
            ),
            (
                SendProblem::Content(TextProblem::Blank),
                "This field may not be blank.",
                "Message content cannot be empty",
            ),
            (
                SendProblem::Content(TextProblem::Nul),
                "Null characters are not allowed.",
                "Null characters are not allowed.",
            ),
            (
                SendProblem::Content(TextProblem::TooLong { max: 10 }),
                "Ensure this field has no more than 10 characters.",
                "Message content is too long (at most 10 characters)",
            ),
            (
                SendProblem::ContextMessageLimit,
                "Ensure this value is between 1 and 100.",
                "context_message_limit must be between 1 and 100",
            ),
        ];
        for (problem, rest, socket) in problems {
            assert_eq!(problem.field_error(), rest);
            assert_eq!(problem.socket_message(), socket);
        }
    }
}
