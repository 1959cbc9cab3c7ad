//! What an import must be before anything of it is stored.
use std::collections::{HashMap, HashSet};

use aichat_shared::db::export::ImportedMessage;
use aichat_shared::domain::{MessageStatus, Role};
use aichat_shared::models::{MAX_MODEL_NAME_CHARS, Registry};

use super::document::{ChatExport, ExportedMessage, FORMAT_TAG, FORMAT_VERSION};
use crate::error::{ApiError, ApiResult, FieldErrors};
use crate::routes::ai_chats::ChatFields;
use crate::settings::Settings;
use crate::validate::{self, TextProblem};

/// Problems of an import's messages listed at most: the rest are counted.
const MAX_LISTED_PROBLEMS: usize = 20;

/// The problems of an import's messages, as one field error each (`messages[i]: ...`), the
/// first [`MAX_LISTED_PROBLEMS`] of them and a count of the rest.
#[derive(Default)]
struct Problems {
    listed: Vec<String>,
    more: usize,
}

impl Problems {
    fn add(&mut self, index: usize, problem: impl std::fmt::Display) {
        if self.listed.len() < MAX_LISTED_PROBLEMS {
            self.listed.push(format!("messages[{index}]: {problem}"));
        } else {
            self.more += 1;
        }
    }

    fn into_errors(self, errors: &mut FieldErrors) {
        for problem in self.listed {
            errors.add("messages", problem);
        }
        if self.more > 0 {
            errors.add("messages", format!("and {} more problems", self.more));
        }
    }
}

/// Highest `version` an import takes: far more than any turn has, and far enough from the end
/// of PostgreSQL's `integer` that the versions later regenerations and edits add never reach it.
const MAX_IMPORTED_VERSION: i32 = 1_000_000;

/// Most digits of an imported cost before, and after, its point: far more than any price
/// gives, and a number PostgreSQL's `numeric` stores exactly.
const MAX_COST_DIGITS: usize = 20;
/// How far past now an imported timestamp may be (another server's clock).
const FUTURE_SKEW_MINUTES: i64 = 5;

/// A cost as the server writes it: a non-negative decimal, digits with an optional fraction.
fn is_cost(text: &str) -> bool {
    let digits = |part: &str| {
        (1..=MAX_COST_DIGITS).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit())
    };
    match text.split_once('.') {
        Some((whole, fraction)) => digits(whole) && digits(fraction),
        None => digits(text),
    }
}

/// A currency as a models file names it: an ISO 4217 code such as `USD`.
fn is_currency(text: &str) -> bool {
    text.len() == 3 && text.bytes().all(|b| b.is_ascii_uppercase())
}

/// What one parent's children of one role hold: the active one, the versions seen.
#[derive(Default)]
struct Siblings {
    active: bool,
    versions: HashSet<i32>,
}

/// Checks everything an import must be before anything is stored: the format, the chat's
/// fields (as create checks them), and each message (its tree, role, status, version, content
/// and counts); the messages to store, in order.
pub fn check_import<'a>(
    export: &'a ChatExport,
    settings: &Settings,
    models: &Registry,
) -> ApiResult<Vec<ImportedMessage<'a>>> {
    let mut errors = FieldErrors::default();
    if export.format != FORMAT_TAG {
        errors.add("format", format!("Expected \"{FORMAT_TAG}\"."));
    }
    if export.version != FORMAT_VERSION {
        errors.add(
            "version",
            format!(
                "Unsupported version {}; this server reads version {FORMAT_VERSION}.",
                export.version
            ),
        );
    }
    // Another format's fields mean something else: nothing more to say about them.
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }

    let chat = &export.chat;
    let fields = ChatFields {
        title: Some(&chat.title),
        system_prompt: Some(&chat.system_prompt),
        model: Some(&chat.model),
    };
    fields.check(&mut errors, "chat.", models);
    let max = settings.import_max_messages;
    if export.messages.len() > max {
        errors.add(
            "messages",
            format!(
                "Ensure this field has no more than {max} messages (it has {}).",
                export.messages.len()
            ),
        );
        return Err(ApiError::Validation(errors));
    }
    let messages = check_messages(&export.messages, settings.max_content_chars, &mut errors);
    errors.check()?;
    Ok(messages)
}

/// [`check_import`]'s part for the messages: each problem added to `errors`.
fn check_messages<'a>(
    messages: &'a [ExportedMessage],
    max_content_chars: usize,
    errors: &mut FieldErrors,
) -> Vec<ImportedMessage<'a>> {
    let mut problems = Problems::default();
    // A message from the future would sort its chat first for good and count in usage reports
    // of days to come; a few minutes allow for the exporting server's clock.
    let latest_time = chrono::Utc::now() + chrono::Duration::minutes(FUTURE_SKEW_MINUTES);
    let mut positions: HashMap<i64, usize> = HashMap::with_capacity(messages.len());
    let mut siblings: HashMap<(Option<usize>, Role), Siblings> = HashMap::new();
    let mut imported: Vec<ImportedMessage<'a>> = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let mut problem = |text: String| problems.add(i, text);
        if positions.insert(m.id, i).is_some() {
            problem(format!("id {} is the id of an earlier message", m.id));
        }
        let parent = match m.parent_id {
            None => None,
            Some(parent_id) => match positions.get(&parent_id) {
                Some(&p) if p < i => Some(p),
                _ => {
                    problem(format!("parent_id {parent_id} is not an earlier message"));
                    None
                }
            },
        };
        let parent_role = parent.and_then(|p| imported.get(p)).map(|p| p.role);
        match (m.role, m.parent_id, parent_role) {
            (Role::User, None, _) | (Role::User, _, Some(Role::User)) => {}
            (Role::User, _, Some(_)) => {
                problem(
                    "a user message's parent must be a user message (the question before it)"
                        .into(),
                );
            }
            (Role::Assistant, None, _) => {
                problem(
                    "an assistant message needs a parent_id: the user message it answers".into(),
                );
            }
            (Role::Assistant, _, Some(Role::User)) => {}
            (Role::Assistant, _, Some(_)) => {
                problem("an assistant message's parent must be a user message (the question it answers)".into());
            }
            (Role::System, _, _) => problem("role must be user or assistant".into()),
            // A parent that is not an earlier message: said above.
            (_, Some(_), None) => {}
        }
        let status = match (m.role, m.status) {
            (
                Role::User,
                MessageStatus::Answered | MessageStatus::Failed | MessageStatus::Cancelled,
            )
            | (Role::Assistant, MessageStatus::Complete) => m.status,
            // Nothing will answer them: no job is queued for an import.
            (Role::User, MessageStatus::Queued | MessageStatus::Answering) => {
                MessageStatus::Cancelled
            }
            (role, status) => {
                problem(format!("status {status} is not valid for role {role}"));
                m.status
            }
        };
        if m.version < 1 {
            problem(format!("version {} is below 1", m.version));
        } else if m.version > MAX_IMPORTED_VERSION {
            problem(format!(
                "version {} is above {MAX_IMPORTED_VERSION}",
                m.version
            ));
        }
        if let Some(t) = m.timestamp {
            if !validate::storable_time(&t) {
                problem("timestamp is not between the years 1 and 9999".into());
            } else if t > latest_time {
                problem("timestamp is in the future".into());
            }
        }
        let content = match m.role {
            Role::User => validate::check_text(Some(&m.content), max_content_chars).err(),
            _ if m.content.contains('\0') => Some(TextProblem::Nul),
            _ if m.content.chars().count() > max_content_chars => Some(TextProblem::TooLong {
                max: max_content_chars,
            }),
            _ => None,
        };
        if let Some(content) = content {
            problem(format!("content: {}", content.field_error()));
        }
        for (field, text, max) in [
            ("error", m.error.as_deref(), max_content_chars),
            ("model", m.model.as_deref(), MAX_MODEL_NAME_CHARS),
        ] {
            if let Some(text) = text {
                if text.contains('\0') {
                    problem(format!("{field}: {}", validate::NULL_CHARACTER));
                } else if text.chars().count() > max {
                    problem(format!(
                        "{field}: {}",
                        TextProblem::TooLong { max }.field_error()
                    ));
                }
            }
        }
        for (field, count) in [
            ("prompt_tokens", m.prompt_tokens),
            ("completion_tokens", m.completion_tokens),
            ("total_tokens", m.total_tokens),
        ] {
            if count.is_some_and(|n| n < 0) {
                problem(format!("{field} is negative"));
            }
        }
        match (m.cost.as_deref(), m.currency.as_deref()) {
            (None, None) => {}
            _ if m.role != Role::Assistant => {
                problem("only an assistant message can have a cost".into());
            }
            (Some(cost), Some(currency)) => {
                if !is_cost(cost) {
                    problem(format!(
                        "cost must be a decimal such as \"0.00045\" (at most {MAX_COST_DIGITS} digits on each side of the point)"
                    ));
                }
                if !is_currency(currency) {
                    problem("currency must be a code such as \"USD\"".into());
                }
            }
            _ => problem("cost and currency go together".into()),
        }
        if m.stopped && m.role != Role::Assistant {
            problem("only an assistant message can be stopped".into());
        }
        if m.active
            && parent
                .and_then(|p| imported.get(p))
                .is_some_and(|p| !p.active)
        {
            problem("an active message's parent must be active".into());
        }
        // A message whose parent is not in the file has no siblings to compare with.
        let family = (parent.is_some() || m.parent_id.is_none())
            .then(|| siblings.entry((parent, m.role)).or_default());
        if let Some(family) = family {
            if m.active && family.active {
                problem(match (m.role, parent) {
                    (Role::Assistant, Some(p)) => format!("messages[{p}] has another active reply"),
                    (_, Some(p)) => {
                        format!("the turn after messages[{p}] has another active version")
                    }
                    (_, None) => "the first turn has another active version".into(),
                });
            }
            family.active |= m.active;
            // A question's replies are told apart by their version (a unique index), and a
            // turn's questions by theirs (an edit numbers the next one after them).
            if !family.versions.insert(m.version) {
                problem(match m.role {
                    Role::Assistant => format!(
                        "another reply to the same question is version {}",
                        m.version
                    ),
                    _ => format!("another version of the same turn is version {}", m.version),
                });
            }
        }
        imported.push(ImportedMessage {
            parent,
            role: m.role,
            content: &m.content,
            timestamp: m.timestamp,
            status,
            error: m.error.as_deref(),
            model: m.model.as_deref(),
            prompt_tokens: m.prompt_tokens,
            completion_tokens: m.completion_tokens,
            total_tokens: m.total_tokens,
            cost: m.cost.as_deref(),
            currency: m.currency.as_deref(),
            stopped: m.stopped,
            version: m.version,
            active: m.active,
            reply_version: 1,
        });
    }
    let replied: HashSet<usize> = imported
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .filter_map(|m| m.parent)
        .collect();
    for (i, m) in imported.iter().enumerate() {
        if m.role == Role::User && m.status == MessageStatus::Answered && !replied.contains(&i) {
            problems.add(
                i,
                "an answered question needs a reply (an assistant message whose parent_id is its id)",
            );
        }
    }
    check_active_path(&imported, &mut problems);
    set_reply_versions(&mut imported);
    problems.into_errors(errors);
    imported
}

/// The active messages must be what the rest of the code keeps them: one path from an active
/// first turn to its end, so that the chat's next message goes after that end (a message sent
/// after a question that still has later ones would be another version 1 of their turn), and
/// an answered question on it shows one of its replies. (That an active message's parent is
/// active, and that no two siblings are, is checked with each message.)
fn check_active_path(imported: &[ImportedMessage<'_>], problems: &mut Problems) {
    let mut first_turns: Option<(usize, bool)> = None;
    // A question's later questions: whether one of them is active.
    let mut later_active: HashMap<usize, bool> = HashMap::new();
    let mut with_active_reply: HashSet<usize> = HashSet::new();
    for (i, m) in imported.iter().enumerate() {
        match (m.role, m.parent) {
            (Role::User, None) => {
                first_turns.get_or_insert((i, false)).1 |= m.active;
            }
            (Role::User, Some(parent)) => *later_active.entry(parent).or_default() |= m.active,
            (Role::Assistant, Some(question)) if m.active => {
                with_active_reply.insert(question);
            }
            _ => {}
        }
    }
    if let Some((first, false)) = first_turns {
        problems.add(
            first,
            "no first turn is active: the active path starts at an active message without a parent_id",
        );
    }
    for (i, m) in imported.iter().enumerate() {
        if !m.active || m.role != Role::User {
            continue;
        }
        if later_active.get(&i) == Some(&false) {
            problems.add(
                i,
                "an active question with later questions needs one of them active (the active path goes on to its end)",
            );
        }
        if m.status == MessageStatus::Answered && !with_active_reply.contains(&i) {
            problems.add(i, "an active answered question needs an active reply");
        }
    }
}

/// Each question's `reply_version`: the version its last reply took when it is `answered`
/// (a regeneration's reply takes the next), and the version after its replies when it ended
/// without one (a retry's reply takes it), so no new reply takes a version already there.
fn set_reply_versions(messages: &mut [ImportedMessage<'_>]) {
    let mut newest: HashMap<usize, i32> = HashMap::new();
    for m in messages.iter() {
        if let (Role::Assistant, Some(p)) = (m.role, m.parent) {
            let top = newest.entry(p).or_default();
            *top = (*top).max(m.version);
        }
    }
    for (i, m) in messages.iter_mut().enumerate() {
        if m.role == Role::User {
            let top = newest.get(&i).copied().unwrap_or(0);
            m.reply_version = if m.status == MessageStatus::Answered {
                top.max(1)
            } else {
                top.saturating_add(1)
            };
        }
    }
}
