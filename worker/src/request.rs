//! The model request of one job: the history (and the related chat's lines when asked) loaded,
//! the prompt built and trimmed to the token budget (`context.rs`), and the model chosen.
use anyhow::Context;

use aichat_shared::db;
use aichat_shared::db::completions::CompletionSubject;
use aichat_shared::jobs::CompletionJob;

use crate::context;
use crate::llm::ChatRequest;
use crate::state::JobContext;

/// The related chat's lines are never more than this, whatever the job asks.
const MAX_CONTEXT_MESSAGES: i64 = 200;

/// Loads the history (and the related chat's lines when asked), builds the prompt and trims it
/// to the token budget. Also returns the tokens of the new message, stored with it once it is
/// answered so later jobs need not count it again. `None` when the new message alone does not
/// fit the budget.
pub async fn build_request(
    job: &CompletionJob,
    subject: &CompletionSubject,
    ctx: &JobContext,
) -> anyhow::Result<Option<(ChatRequest, usize)>> {
    // Every message costs at least its framing tokens, so more than this can never fit.
    let history_limit = i64::try_from(ctx.token_budget / 4 + 1).unwrap_or(i64::MAX);
    let history = db::completions::list_history(
        &ctx.db,
        subject.ai_chat_id,
        subject.message_id,
        history_limit,
    )
    .await
    .context("loading the conversation")?;
    let related = match subject.related_chat_id {
        Some(chat_id) if job.include_related_chat_context => {
            let limit = i64::from(job.context_message_limit).clamp(0, MAX_CONTEXT_MESSAGES);
            Some(
                db::chats::latest_context_messages(&ctx.db, chat_id, limit)
                    .await
                    .context("loading the related chat")?,
            )
        }
        _ => None,
    };
    let counter = ctx.tokens;
    let budget = ctx.token_budget;
    let system_cap = ctx.system_token_cap;
    let system_prompt = subject.system_prompt.clone();
    let question = subject.content.clone();
    let history_len = history.len();
    // BPE over a few thousand tokens is CPU work: keep it off the async threads.
    let built = tokio::task::spawn_blocking(move || {
        // Counted once, not remembered (it is stored with the message), and handed to the
        // trimming as known.
        let question_tokens = counter.text_once(&question);
        // The system message gets its share of the budget, and never the room the question
        // and the framing of both need: then only history is dropped to fit.
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
        Some((messages, prompt_tokens, question_tokens))
    })
    .await
    .context("counting prompt tokens")?;
    let Some((messages, prompt_tokens, question_tokens)) = built else {
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
