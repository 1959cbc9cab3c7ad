//! The completion job: load the message and its context, ask the model, save the reply (or
//! the failure) and tell the chat.
//!
//! How a run ends decides what apalis does with the job:
//! - `Ok` → done (also when there is nothing to do: message deleted, already answered);
//! - `AbortError` → Killed, parked in the dead set, never retried by the storage: the model
//!   failed for good or after our own retries, and the user message is `failed`;
//! - any other error → the storage runs the job again later (database or Redis trouble, or
//!   shutdown before the model was called). The reply write is idempotent, so a second run is
//!   harmless.
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use apalis::prelude::{AbortError, Attempt, BoxDynError, Data, TaskId, WorkerContext};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use aichat_shared::announce::{self, Claim};
use aichat_shared::backoff::Backoff;
use aichat_shared::db;
use aichat_shared::db::completions::{CompletionSubject, NewReply};
use aichat_shared::events::{ChatEvent, EventMessage, publish_event};
use aichat_shared::jobs::CompletionJob;
use aichat_shared::keys::Namespace;

use crate::context::{self, TokenCounter};
use crate::deltas::{DeltaTarget, publish_deltas};
use crate::llm::{ChatRequest, CompletionError, LlmClient};
use crate::metrics;
use crate::rate_limit::RateLimiter;
use crate::reply_batch::ReplySaver;
use crate::stop::{Ack, Stopping};

/// Between attempts to reach the database while a reply waits to be saved: 100 ms doubling
/// up to 2 s, until `WORKER_SAVE_RETRY_SECS` runs out.
const SAVE_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
/// The related chat's lines are never more than this, whatever the job asks.
const MAX_CONTEXT_MESSAGES: i64 = 200;

/// Everything a job needs, shared by all jobs of the process.
pub struct JobContext {
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub ns: Namespace,
    pub llm: LlmClient,
    pub limiter: RateLimiter,
    pub tokens: TokenCounter,
    pub token_budget: usize,
    /// Most tokens of the system message (`SYSTEM_TOKEN_SHARE_PERCENT` of the budget).
    pub system_token_cap: usize,
    /// Sent as `max_completion_tokens` on every call.
    pub max_completion_tokens: u32,
    /// Models chats may use (`ALLOWED_MODELS` and the default).
    pub allowed_models: Vec<String>,
    /// Completion tokens reserved under the token rate limit before the real count is known.
    pub completion_allowance: u64,
    /// Model of chats that have none.
    pub default_model: String,
    pub delta_flush_every: Duration,
    pub delta_flush_chars: usize,
    /// Turns true when the worker starts shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// Running jobs, and what finished after the stop began (see `stop.rs`).
    pub stopping: Arc<Stopping>,
    /// Writes replies, several per statement.
    pub replies: ReplySaver,
    /// How long a finished reply (or failure) keeps trying to reach the database before the
    /// job is handed back to the queue.
    pub save_retry_for: Duration,
    pub hooks: Hooks,
}

/// Points where the fault suite's worker binary makes the process fail on purpose; none is
/// set in `aichat-worker`.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Runs right after this run's reply is committed, before anything is announced.
    pub after_save: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// How a run ended, for logs.
#[derive(Debug)]
enum Done {
    Answered,
    AlreadyAnswered,
    MessageGone,
    /// The job was queued for another database that had this namespace before (it was
    /// dropped and created again): its message id means another message here.
    OtherDatabase,
    Failed,
}

/// Why a run did not finish.
#[derive(Debug)]
enum JobError {
    /// The message cannot be answered; the job goes to the dead set.
    Abort(String),
    /// Try the job again later.
    Retry(anyhow::Error),
}

impl From<anyhow::Error> for JobError {
    fn from(err: anyhow::Error) -> Self {
        JobError::Retry(err)
    }
}

/// The apalis handler. Arguments arrive as JSON (what `JobQueue::enqueue_completion` pushes);
/// they are decoded here rather than by the storage so a malformed job is killed instead of
/// stopping the worker's poll loop.
pub async fn answer_message(
    args: serde_json::Value,
    ctx: Data<Arc<JobContext>>,
    attempt: Attempt,
    task_id: TaskId,
    worker: WorkerContext,
) -> Result<(), BoxDynError> {
    let _running = ctx.stopping.job_started();
    let result = answer(args, &ctx, attempt).await;
    // After the stop began apalis no longer acknowledges jobs: the worker does it on exit.
    let ack = match &result {
        Ok(()) => Ack::Done,
        Err(err) if err.downcast_ref::<AbortError>().is_some() => Ack::Dead,
        Err(_) => Ack::Retry,
    };
    ctx.stopping.record(worker.name(), task_id.to_string(), ack);
    result
}

async fn answer(
    args: serde_json::Value,
    ctx: &JobContext,
    attempt: Attempt,
) -> Result<(), BoxDynError> {
    metrics::job_started();
    let job: CompletionJob = match serde_json::from_value(args) {
        Ok(job) => job,
        Err(err) => {
            tracing::error!(error = %err, "undecodable completion job");
            metrics::job_failed("undecodable");
            return Err(Box::new(AbortError::new(format!(
                "undecodable completion job: {err}"
            ))));
        }
    };
    let span = tracing::info_span!(
        "completion",
        message_id = job.message_id,
        ai_chat_id = job.ai_chat_id,
        request_id = job.request_id.as_deref().unwrap_or("-"),
        attempt = attempt.current(),
    );
    let started = std::time::Instant::now();
    let result = run(&job, ctx).instrument(span.clone()).await;
    metrics::job_duration(
        match &result {
            Ok(Done::Answered) => "answered",
            Ok(Done::Failed) => "failed",
            Ok(_) => "skipped",
            Err(JobError::Abort(_)) => "aborted",
            Err(JobError::Retry(_)) => "requeued",
        },
        started.elapsed(),
    );
    match result {
        Ok(done) => {
            span.in_scope(|| tracing::info!(outcome = ?done, "completion job finished"));
            if matches!(done, Done::Failed) {
                return Err(Box::new(AbortError::new("the model could not answer")));
            }
            metrics::job_succeeded();
            Ok(())
        }
        Err(JobError::Abort(reason)) => {
            span.in_scope(|| tracing::error!(%reason, "completion job killed"));
            metrics::job_failed("aborted");
            Err(Box::new(AbortError::new(reason)))
        }
        Err(JobError::Retry(err)) => {
            span.in_scope(|| {
                tracing::warn!(error = format!("{err:#}"), "completion job will run again")
            });
            metrics::job_requeued();
            Err(err.into())
        }
    }
}

async fn run(job: &CompletionJob, ctx: &JobContext) -> Result<Done, JobError> {
    if let Some(theirs) = job.installation.as_deref()
        && ctx.ns.installation().is_some_and(|ours| ours != theirs)
    {
        // Either the job is older than the database, or this worker is (it started before
        // the database was created again): the database says which.
        let current = db::installation_id(&ctx.db)
            .await
            .map_err(|err| JobError::Retry(err.into()))?;
        if current != theirs {
            tracing::warn!(
                job_database = theirs,
                "dropping a job queued for an earlier database of this namespace"
            );
            return Ok(Done::OtherDatabase);
        }
        tracing::warn!(
            "the database was created again after this worker started: restart it so its \
             Redis keys name the new one"
        );
    }
    // Claimed before the message is read, so a run that finds it answered knows whether that
    // answer was announced (`announce.rs`).
    let claim = announce::claim(&mut ctx.redis.clone(), &ctx.ns, job.message_id).await;
    let Some(subject) = db::completions::find_completion_subject(&ctx.db, job.message_id)
        .await
        .context("loading the user message")?
    else {
        announce::release(&mut ctx.redis.clone(), &ctx.ns, job.message_id).await;
        metrics::job_skipped("message_gone");
        return Ok(Done::MessageGone);
    };
    if subject.answered {
        metrics::job_skipped("already_answered");
        if claim == Claim::Inherited {
            announce_stored_reply(ctx, claim, &subject).await?;
        } else {
            announce::release(&mut ctx.redis.clone(), &ctx.ns, job.message_id).await;
        }
        return Ok(Done::AlreadyAnswered);
    }
    if subject.ai_chat_id != job.ai_chat_id {
        announce::release(&mut ctx.redis.clone(), &ctx.ns, job.message_id).await;
        return Err(JobError::Abort(format!(
            "message {} belongs to AI chat {}, not {}",
            subject.message_id, subject.ai_chat_id, job.ai_chat_id
        )));
    }

    let Some((request, question_tokens)) = build_request(job, &subject, ctx).await? else {
        let err = CompletionError::Failed {
            reason: "too_long",
            attempts: 0,
        };
        return fail(ctx, job, claim, &subject, &err, "too_long").await;
    };
    let (chunks_tx, chunks_rx) = mpsc::unbounded_channel();
    let target = DeltaTarget {
        redis: ctx.redis.clone(),
        ns: ctx.ns.clone(),
        ai_chat_id: subject.ai_chat_id,
        message_id: subject.message_id,
        flush_every: ctx.delta_flush_every,
        flush_chars: ctx.delta_flush_chars,
    };
    let mut cancel = ctx.shutdown.clone();
    let call = async {
        // Dropping the sender when the call ends lets the publisher flush and finish.
        let chunks_tx = chunks_tx;
        ctx.llm
            .complete(&request, &ctx.limiter, &chunks_tx, &mut cancel)
            .await
    };
    // Past the shutdown grace, a call still waiting on the model is dropped: the job goes
    // back to the queue for another worker.
    let mut abandoned = ctx.stopping.abandoned();
    let (result, ()) = tokio::select! {
        out = async { tokio::join!(call, publish_deltas(chunks_rx, target)) } => out,
        Ok(_) = abandoned.wait_for(|a| *a) => {
            return Err(JobError::Retry(anyhow::anyhow!(
                "abandoned: the worker's shutdown grace ended during the model call"
            )));
        }
    };

    match result {
        Ok(completion) => {
            save_and_announce(
                ctx,
                job,
                claim,
                &subject,
                &request.model,
                question_tokens,
                completion,
            )
            .await
        }
        Err(err @ CompletionError::Failed { .. }) => {
            fail(ctx, job, claim, &subject, &err, "model").await
        }
        Err(err) => Err(JobError::Retry(err.into())),
    }
}

/// Ends a run that cannot be answered (`reason` labels the failure metric): the message is
/// marked failed, unless another run answered it meanwhile, whose reply then stands (and is
/// announced if it may not have been).
async fn fail(
    ctx: &JobContext,
    job: &CompletionJob,
    claim: Claim,
    subject: &CompletionSubject,
    err: &CompletionError,
    reason: &'static str,
) -> Result<Done, JobError> {
    if record_failure(ctx, job, claim, subject, err).await? {
        metrics::job_failed(reason);
        Ok(Done::Failed)
    } else {
        announce_stored_reply(ctx, claim, subject).await?;
        Ok(Done::AlreadyAnswered)
    }
}

/// Loads the history (and the related chat's lines when asked), builds the prompt and trims it
/// to the token budget. Also returns the tokens of the new message, stored with it once it is
/// answered so later jobs need not count it again. `None` when the new message alone does not
/// fit the budget.
async fn build_request(
    job: &CompletionJob,
    subject: &CompletionSubject,
    ctx: &JobContext,
) -> Result<Option<(ChatRequest, usize)>, JobError> {
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
        estimated_tokens: u64::try_from(prompt_tokens)
            .unwrap_or(u64::MAX)
            .saturating_add(ctx.completion_allowance),
    };
    Ok(Some((request, question_tokens)))
}

/// Replaces the message's budget reservation by what it really used (nothing, when it failed;
/// the reservation stands when the provider reported no usage). Only the run that saved the
/// reply or marked the failure settles, so a job that runs twice settles once.
async fn settle_budget(ctx: &JobContext, job: &CompletionJob, used: Option<i64>) {
    let (Some(reservation), Some(used)) = (&job.budget, used) else {
        return;
    };
    let mut redis = ctx.redis.clone();
    if let Err(err) = aichat_shared::budget::settle(&mut redis, reservation, used).await {
        tracing::warn!(error = %err, "could not settle the token budget");
    }
}

async fn save_and_announce(
    ctx: &JobContext,
    job: &CompletionJob,
    claim: Claim,
    subject: &CompletionSubject,
    model: &str,
    question_tokens: usize,
    completion: crate::llm::Completion,
) -> Result<Done, JobError> {
    let usage = completion.usage.as_ref();
    let to_i32 = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    let reply_tokens = count_text(ctx.tokens, &completion.content).await;
    let reply = NewReply {
        content: completion.content,
        prompt_tokens: usage.map(|u| to_i32(u.prompt_tokens)),
        completion_tokens: usage.map(|u| to_i32(u.completion_tokens)),
        total_tokens: usage.map(|u| to_i32(u.total_tokens)),
        model: model.to_owned(),
        latency_ms: i32::try_from(completion.latency.as_millis()).unwrap_or(i32::MAX),
        content_tokens: reply_tokens.and_then(|n| i32::try_from(n).ok()),
        question_tokens: i32::try_from(question_tokens).ok(),
    };
    let latency_ms = reply.latency_ms;
    let saved = save_reply(ctx, subject.message_id, reply).await?;
    if let Some(usage) = usage {
        metrics::tokens(
            model,
            u64::from(usage.prompt_tokens),
            u64::from(usage.completion_tokens),
        );
    }
    let Some(saved) = saved else {
        // Another run answered first (or the message went away): its reply stands.
        metrics::duplicate_reply();
        announce_stored_reply(ctx, claim, subject).await?;
        return Ok(Done::AlreadyAnswered);
    };
    if let Some(after_save) = &ctx.hooks.after_save {
        after_save();
    }
    // Settled before the event goes out, so whoever the event wakes sees the real use.
    settle_budget(ctx, job, usage.map(|u| i64::from(u.total_tokens))).await;
    let event = ChatEvent::AssistantMessage {
        message: EventMessage::assistant(&saved),
    };
    // A reply whose announcement Redis refused runs the job again: the next run finds the
    // message answered and the marker still there, and announces it then.
    announce(ctx, claim, subject, &event)
        .await
        .map_err(|err| JobError::Retry(anyhow::Error::from(err).context("announcing the reply")))?;
    tracing::info!(
        reply_id = saved.id,
        attempts = completion.attempts,
        latency_ms,
        "reply saved"
    );
    Ok(Done::Answered)
}

/// Texts longer than this are counted on a blocking thread.
const COUNT_INLINE_BYTES: usize = 2048;

/// Tokens of a reply, stored with it for later prompts. A short text is counted in place; BPE
/// over a long one is CPU work kept off the async threads. `None` if that thread failed: the
/// count is then left to whoever needs it.
async fn count_text(counter: TokenCounter, text: &str) -> Option<usize> {
    if text.len() <= COUNT_INLINE_BYTES {
        return Some(counter.text_once(text));
    }
    let text = text.to_owned();
    tokio::task::spawn_blocking(move || counter.text_once(&text))
        .await
        .ok()
}

/// Saves the reply (with the other replies finishing at the same time: one statement, one
/// commit; `reply_batch.rs`). The model's answer is in hand, so a database
/// that cannot be reached is retried here (up to `save_retry_for`) rather than by running the
/// job, and the model call, again. When a save failed without saying whether it happened and the
/// retry then finds the message answered, the stored reply is returned as this run's: it is
/// almost surely the one just committed, and its event must still go out.
async fn save_reply(
    ctx: &JobContext,
    message_id: i64,
    reply: NewReply,
) -> Result<Option<aichat_shared::domain::AiMessage>, JobError> {
    let deadline = tokio::time::Instant::now() + ctx.save_retry_for;
    let mut failures = 1u32;
    let mut commit_unknown = false;
    loop {
        // The error, and whether it came from the commit (outcome unknown).
        // One autocommitted statement: a connection lost while it ran may have committed it.
        let attempt = ctx
            .replies
            .save(message_id, reply.clone())
            .await
            .map_err(|e| {
                let unknown = e.is_unavailable();
                (e, unknown)
            });
        let err = match attempt {
            Ok(Some(saved)) => return Ok(Some(saved)),
            Ok(None) if commit_unknown => {
                return db_retry(ctx, "loading the saved reply", || {
                    db::ai_messages::find_reply(&ctx.db, message_id)
                })
                .await;
            }
            Ok(None) => return Ok(None),
            Err((err, during_commit)) => {
                commit_unknown |= during_commit;
                err
            }
        };
        let transient = err.is_unavailable() || err.is_conflict();
        let delay = SAVE_BACKOFF.ceiling(failures);
        if !transient || tokio::time::Instant::now() + delay > deadline {
            return Err(JobError::Retry(
                anyhow::Error::from(err).context("saving the reply"),
            ));
        }
        tracing::warn!(error = %err, "database unreachable or busy while saving the reply; retrying");
        metrics::save_retry();
        tokio::time::sleep(delay).await;
        failures = failures.saturating_add(1);
    }
}

/// Runs a database operation, retrying while the database cannot be reached, for at most
/// `save_retry_for`; then (or for any other error) the job will run again.
async fn db_retry<T, F, Fut>(ctx: &JobContext, what: &'static str, mut op: F) -> Result<T, JobError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, aichat_shared::Error>>,
{
    let deadline = tokio::time::Instant::now() + ctx.save_retry_for;
    let mut failures = 1u32;
    loop {
        let delay = SAVE_BACKOFF.ceiling(failures);
        match op().await {
            Ok(value) => return Ok(value),
            Err(err) if err.is_unavailable() && tokio::time::Instant::now() + delay <= deadline => {
                tracing::warn!(error = %err, "database unreachable ({what}); retrying");
                metrics::save_retry();
                tokio::time::sleep(delay).await;
                failures = failures.saturating_add(1);
            }
            Err(err) => return Err(JobError::Retry(anyhow::Error::from(err).context(what))),
        }
    }
}

/// Marks the message failed with a user-safe error and tells the chat. False when the message
/// was answered meanwhile or is gone.
async fn record_failure(
    ctx: &JobContext,
    job: &CompletionJob,
    claim: Claim,
    subject: &CompletionSubject,
    err: &CompletionError,
) -> Result<bool, JobError> {
    let message = err.user_message();
    let changed = db_retry(ctx, "marking the message failed", || {
        db::retry::on_conflict("mark_failed", || {
            db::completions::mark_failed(&ctx.db, subject.message_id, message)
        })
    })
    .await?;
    if changed {
        settle_budget(ctx, job, Some(0)).await;
        let event = ChatEvent::Error {
            message: message.to_owned(),
            message_id: Some(subject.message_id),
        };
        // A failed message is not run again, so a lost `error` event stays lost; clients see
        // the status on their next read.
        if let Err(err) = announce(ctx, claim, subject, &event).await {
            tracing::warn!(error = %err, "could not publish a chat event");
        }
        tracing::warn!(error = %err, "message marked failed");
    }
    Ok(changed)
}

/// Announces the outcome this run stored, unless another run already did; true when this call
/// published. An error leaves the marker in place for the job's next run (when the script did
/// not run) or means it was published (when only its answer was lost), never both.
async fn announce(
    ctx: &JobContext,
    claim: Claim,
    subject: &CompletionSubject,
    event: &ChatEvent,
) -> Result<bool, aichat_shared::Error> {
    let mut redis = ctx.redis.clone();
    match claim {
        Claim::Unknown => publish_event(&mut redis, &ctx.ns, subject.ai_chat_id, event)
            .await
            .map(|_| true),
        Claim::Created | Claim::Inherited => {
            announce::announce_once(
                &mut redis,
                &ctx.ns,
                subject.message_id,
                subject.ai_chat_id,
                event,
            )
            .await
        }
    }
}

/// The message was answered by another run: announces that run's reply if it may never have
/// been (the other run died between saving and publishing); otherwise nothing.
async fn announce_stored_reply(
    ctx: &JobContext,
    claim: Claim,
    subject: &CompletionSubject,
) -> Result<(), JobError> {
    if claim == Claim::Unknown {
        return Ok(());
    }
    let stored = db_retry(ctx, "loading the stored reply", || {
        db::ai_messages::find_reply(&ctx.db, subject.message_id)
    })
    .await?;
    match stored {
        Some(reply) => {
            let event = ChatEvent::AssistantMessage {
                message: EventMessage::assistant(&reply),
            };
            let published = announce(ctx, claim, subject, &event).await.map_err(|err| {
                JobError::Retry(anyhow::Error::from(err).context("announcing the stored reply"))
            })?;
            if published {
                metrics::late_announcement();
            }
        }
        None => announce::release(&mut ctx.redis.clone(), &ctx.ns, subject.message_id).await,
    }
    Ok(())
}
