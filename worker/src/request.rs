//! The model request of one job: the history (from the context cache and what the job read),
//! the prompt built and trimmed to the token budget (`context.rs`), and the model chosen.
use anyhow::Context;

use aichat_shared::db::completions::{CompletionSubject, HistoryRead};
use aichat_shared::domain::ContextMessage;
use aichat_shared::jobs::CompletionJob;

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

/// Builds the prompt from what the job read with its claim (`db::completions::claim_job`) and
/// what the context cache held (`history_cache.rs`, updated here), and trims it to the token
/// budget. Also returns the tokens of the new message, stored with it once it is answered so
/// later jobs need not count it again. `None` when the new message alone does not fit the
/// budget.
pub async fn build_request(
    subject: &CompletionSubject,
    history: HistoryRead,
    related: Option<Vec<ContextMessage>>,
    cached: Option<history_cache::Entry>,
    ctx: &JobContext,
) -> anyhow::Result<Option<(ChatRequest, usize)>> {
    let counter = ctx.tokens;
    let budget = ctx.token_budget;
    let limit = history_limit(ctx);
    let question_id = subject.message_id;
    let system_cap = ctx.system_token_cap;
    let system_prompt = subject.system_prompt.clone();
    let question = subject.content.clone();
    // BPE over a few thousand tokens is CPU work: keep it off the async threads.
    let (built, entry) = tokio::task::spawn_blocking(move || {
        let (history, entry) =
            history_cache::assemble(cached, history, question_id, limit, budget, &counter);
        let build = || {
            // Counted once, not remembered (it is stored with the message), and handed to the
            // trimming as known.
            let question_tokens = counter.text_once(&question);
            // The system message gets its share of the budget, and never the room the
            // question and the framing of both need: then only history is dropped to fit.
            let fixed = context::REPLY_PRIMING_TOKENS + 2 * context::TOKENS_PER_MESSAGE;
            let room = budget.checked_sub(question_tokens + fixed)?;
            let system = context::system_within(
                &system_prompt,
                related.as_deref(),
                system_cap.min(room),
                &counter,
            );
            let mut prompt = context::build_prompt(system, &history, &question);
            if let Some(last) = prompt.last_mut() {
                last.known_tokens = Some(question_tokens);
            }
            let (messages, prompt_tokens) =
                context::trim_to_budget(prompt, budget, |m| counter.message(m));
            Some((messages, prompt_tokens, question_tokens, history.len()))
        };
        (build(), entry)
    })
    .await
    .context("counting prompt tokens")?;
    if let Some(entry) = &entry {
        history_cache::store(ctx, subject.ai_chat_id, entry).await;
    }
    let Some((messages, prompt_tokens, question_tokens, history_len)) = built else {
        return Ok(None);
    };
    let model = if subject.model.is_empty() {
        ctx.default_model.clone()
    } else if ctx.allowed_models.contains(&subject.model) {
        subject.model.clone()
    } else {
        // The operator took this model off ALLOWED_MODELS after the chat chose it.
        tracing::warn!(model = %subject.model, "the chat's model is no longer allowed; using the default");
        ctx.default_model.clone()
    };
    tracing::debug!(
        prompt_tokens,
        messages = messages.len(),
        history = history_len,
        "prompt built"
    );
    let request = ChatRequest {
        model,
        messages,
        max_completion_tokens: ctx.max_completion_tokens,
        prompt_tokens: u64::try_from(prompt_tokens).unwrap_or(u64::MAX),
        estimated_tokens: u64::try_from(prompt_tokens)
            .unwrap_or(u64::MAX)
            .saturating_add(ctx.completion_allowance),
    };
    Ok(Some((request, question_tokens)))
}
