//! The model request of one job: the history (from the context cache and what the job read),
//! then, for each model the job tries, the prompt built and trimmed to that model's budget
//! (`context.rs`).
use std::sync::Arc;

use anyhow::Context;

use aichat_shared::db::completions::{CompletionSubject, HistoryMessage, HistoryRead};
use aichat_shared::domain::ContextMessage;
use aichat_shared::jobs::CompletionJob;
use aichat_shared::models::Model;

use crate::context;
use crate::history_cache;
use crate::llm::ChatRequest;
use crate::state::JobContext;

/// The related chat's lines are never more than this, whatever the job asks.
const MAX_CONTEXT_MESSAGES: i64 = 200;

/// Rows of history a job reads at most: every message costs at least its framing tokens, so
/// more than this can never fit the budget.
pub fn history_limit(ctx: &JobContext) -> usize {
    ctx.token_budget / context::TOKENS_PER_MESSAGE + 1
}

/// The related chat's lines the job asks for, if any.
pub fn related_limit(job: &CompletionJob) -> Option<i64> {
    job.include_related_chat_context
        .then(|| i64::from(job.context_message_limit).clamp(0, MAX_CONTEXT_MESSAGES))
}

/// What every model's prompt is made of, before it is cut to that model's budget.
pub struct PromptParts {
    system_prompt: String,
    related: Option<Vec<ContextMessage>>,
    /// Within `CONTEXT_TOKEN_BUDGET`, which no model's budget exceeds.
    history: Vec<HistoryMessage>,
    question: String,
    /// Tokens of the question, stored with it once it is answered so later jobs need not
    /// count it again.
    pub question_tokens: usize,
}

/// Assembles the history from what the job read with its claim (`db::completions::claim_job`)
/// and what the context cache held (`history_cache.rs`, updated here), within
/// `CONTEXT_TOKEN_BUDGET`.
pub async fn prompt_parts(
    subject: &CompletionSubject,
    history: HistoryRead,
    related: Option<Vec<ContextMessage>>,
    cached: Option<history_cache::Entry>,
    ctx: &JobContext,
) -> anyhow::Result<Arc<PromptParts>> {
    let counter = ctx.tokens;
    let budget = ctx.token_budget;
    let limit = history_limit(ctx);
    let question_id = subject.message_id;
    let question = subject.content.clone();
    // BPE over a few thousand tokens is CPU work: keep it off the async threads.
    let (history, entry, question, question_tokens) = tokio::task::spawn_blocking(move || {
        let (history, entry) =
            history_cache::assemble(cached, history, question_id, limit, budget, &counter);
        // Counted once, not remembered (it is stored with the message).
        let question_tokens = counter.text_once(&question);
        (history, entry, question, question_tokens)
    })
    .await
    .context("counting prompt tokens")?;
    if let Some(entry) = &entry {
        history_cache::store(ctx, subject.ai_chat_id, &entry.over(&history)).await;
    }
    Ok(Arc::new(PromptParts {
        system_prompt: subject.system_prompt.clone(),
        related,
        history,
        question,
        question_tokens,
    }))
}

/// The prompt budget of `model`: its window less its reply cap, never more than
/// `CONTEXT_TOKEN_BUDGET`.
fn prompt_budget(model: &Model, ctx: &JobContext) -> usize {
    usize::try_from(model.prompt_budget(ctx.token_budget as u64)).unwrap_or(usize::MAX)
}

/// What is left of `budget` once the question and the framing of it and the system message
/// are in; `None` when the question alone does not fit.
fn room_besides_question(parts: &PromptParts, budget: usize) -> Option<usize> {
    let fixed = context::REPLY_PRIMING_TOKENS + 2 * context::TOKENS_PER_MESSAGE;
    budget.checked_sub(parts.question_tokens + fixed)
}

/// Whether [`request_for`] makes a request to `model`: the question fits its budget.
pub fn has_room(parts: &PromptParts, model: &Model, ctx: &JobContext) -> bool {
    room_besides_question(parts, prompt_budget(model, ctx)).is_some()
}

/// The request to `model`: the prompt trimmed to the model's budget, the system message within
/// its share of that. `None` when the question alone does not fit.
pub async fn request_for(
    parts: &Arc<PromptParts>,
    model: &Model,
    ctx: &JobContext,
) -> anyhow::Result<Option<ChatRequest>> {
    let counter = ctx.tokens;
    let budget = prompt_budget(model, ctx);
    let system_cap = budget.saturating_mul(usize::from(ctx.system_share_percent)) / 100;
    let parts = parts.clone();
    let built = tokio::task::spawn_blocking(move || {
        // The system message gets its share of the budget, and never the room the question
        // and the framing of both need: then only history is dropped to fit.
        let room = room_besides_question(&parts, budget)?;
        let system = context::system_within(
            &parts.system_prompt,
            parts.related.as_deref(),
            system_cap.min(room),
            &counter,
        );
        let mut prompt = context::build_prompt(system, &parts.history, &parts.question);
        if let Some(last) = prompt.last_mut() {
            // Handed to the trimming as known.
            last.known_tokens = Some(parts.question_tokens);
        }
        let (messages, prompt_tokens) =
            context::trim_to_budget(prompt, budget, |m| counter.message(m));
        Some((messages, prompt_tokens, parts.history.len()))
    })
    .await
    .context("counting prompt tokens")?;
    let Some((messages, prompt_tokens, history_len)) = built else {
        return Ok(None);
    };
    tracing::debug!(
        model = %model.name,
        prompt_tokens,
        messages = messages.len(),
        history = history_len,
        "prompt built"
    );
    let prompt_tokens = u64::try_from(prompt_tokens).unwrap_or(u64::MAX);
    Ok(Some(ChatRequest {
        model: model.name.clone(),
        provider_model: model.provider_model.clone(),
        messages,
        max_completion_tokens: model.max_completion_tokens,
        prompt_tokens,
        estimated_tokens: prompt_tokens.saturating_add(ctx.completion_allowance),
    }))
}
