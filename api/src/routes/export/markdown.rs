//! The Markdown export: the active path as a conversation to read.
use chrono::{DateTime, Utc};

use aichat_shared::domain::{AiChat, AiMessage, MessageStatus, Role};

/// How a time reads in the Markdown export.
fn when(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// The active path as a conversation to read: the title, the model and the export time, then
/// each message under a heading naming who wrote it and when.
pub fn markdown(chat: &AiChat, messages: &[AiMessage], exported_at: DateTime<Utc>) -> String {
    let one_line = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = vec![
        format!("# {}", one_line(&chat.title)),
        String::new(),
        format!(
            "*Model: {} — exported {}*",
            one_line(&chat.model),
            when(exported_at)
        ),
    ];
    // Each reply right after its question, however late it was saved (a regeneration).
    let mut in_turns: Vec<&AiMessage> = messages.iter().collect();
    in_turns.sort_by_key(|m| (m.reply_to.unwrap_or(m.id), m.id));
    for m in in_turns {
        let who = match (m.role, m.model.as_deref()) {
            (Role::User, _) => "You".to_owned(),
            (Role::Assistant, Some(model)) => format!("Assistant ({})", one_line(model)),
            (Role::Assistant, None) => "Assistant".to_owned(),
            (Role::System, _) => "System".to_owned(),
        };
        let stopped = if m.stopped { " (stopped)" } else { "" };
        out.push(String::new());
        out.push(format!("### {who} — {}{stopped}", when(m.timestamp)));
        out.push(String::new());
        out.push(m.content.trim_end().to_owned());
        let note = match m.status {
            MessageStatus::Failed => Some(format!(
                "**Failed:** {}",
                m.error.as_deref().unwrap_or("the model could not answer")
            )),
            MessageStatus::Cancelled => Some("*(stopped before the model answered)*".to_owned()),
            MessageStatus::Queued | MessageStatus::Answering => {
                Some("*(waiting for the reply)*".to_owned())
            }
            MessageStatus::Answered | MessageStatus::Complete => None,
        };
        if let Some(note) = note {
            out.push(String::new());
            out.extend(note.lines().map(|line| format!("> {line}")));
        }
    }
    out.push(String::new());
    out.join("\n")
}
