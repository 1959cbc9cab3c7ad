//! How a run ends: what it reports ([`Done`], [`JobError`]) and, once it knows its result, the
//! reply or the failure saved (`save.rs`), the token budget settled, and the chat told exactly
//! once, even when two runs of the same job, or a run and a crashed one before it, meet
//! (`aichat_shared::announce`).
use aichat_shared::announce::{self, Claim};
use aichat_shared::budget::Reservation;
use aichat_shared::db;
use aichat_shared::db::completions::{CompletionSubject, NewReply};
use aichat_shared::events::{ChatEvent, EventMessage, publish_event};
use aichat_shared::jobs::CompletionJob;

use crate::context::TokenCounter;
use crate::llm::{ChatRequest, Completion, CompletionError};
use crate::metrics;
use crate::save::{db_retry, save_reply};
use crate::state::JobContext;

/// How a run ended, for logs.
#[derive(Debug)]
pub enum Done {
    /// Its reply was saved (a stopped one included).
    Answered,
    AlreadyAnswered,
    /// Failed or cancelled by another run (or its user) before this one took it.
    NotWaiting,
    /// Its user stopped it before the model answered.
    Cancelled,
    MessageGone,
    /// The job was queued for another database that had this namespace before (it was
    /// dropped and created again): its message id means another message here.
    OtherDatabase,
    Failed,
}

/// Why a run did not finish.
#[derive(Debug)]
pub enum JobError {
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

/// Saves the model's reply and announces it; when another run answered first, its reply
/// stands and is announced if it may not have been.
pub async fn save_and_announce(
    ctx: &JobContext,
    job: &CompletionJob,
    claim: Claim,
    subject: &CompletionSubject,
    request: &ChatRequest,
    question_tokens: usize,
    completion: Completion,
) -> Result<Done, JobError> {
    let model = request.model.as_str();
    let reply_tokens = count_text(ctx.tokens, &completion.content).await;
    let usage = reply_usage(&completion, request, reply_tokens);
    let to_i32 = |n: u64| i32::try_from(n).unwrap_or(i32::MAX);
    // Priced by the model that answered (a fallback's prices when one did).
    let pricing = ctx.models.get(model).and_then(|m| m.pricing.as_ref());
    let cost = pricing.map(|p| p.cost(usage.prompt, usage.completion));
    let reply = NewReply {
        content: completion.content,
        prompt_tokens: Some(to_i32(usage.prompt)),
        completion_tokens: Some(to_i32(usage.completion)),
        total_tokens: Some(to_i32(usage.total())),
        model: model.to_owned(),
        latency_ms: i32::try_from(completion.latency.as_millis()).unwrap_or(i32::MAX),
        content_tokens: reply_tokens.and_then(|n| i32::try_from(n).ok()),
        question_tokens: i32::try_from(question_tokens).ok(),
        stopped: completion.stopped,
        currency: cost.as_ref().and(pricing).map(|p| p.currency.clone()),
        cost,
    };
    let latency_ms = reply.latency_ms;
    let saved = save_reply(ctx, subject.message_id, reply).await?;
    metrics::tokens(model, usage.prompt, usage.completion);
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
    let used = i64::try_from(usage.total()).unwrap_or(i64::MAX);
    settle_budget(ctx, job, subject, used).await;
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
        stopped = saved.stopped,
        "reply saved"
    );
    Ok(Done::Answered)
}

/// Tokens of one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReplyUsage {
    prompt: u64,
    completion: u64,
}

impl ReplyUsage {
    fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// What a reply used: as the provider reported it; when it reported nothing (a reply stopped
/// before the provider's usage came, or a provider that ignores `include_usage`), the prompt
/// as counted here and the reply's text counted with the tokenizer (the provider bills what it
/// generated, which is at least that), so the reply is counted and its reservation settled
/// all the same.
fn reply_usage(
    completion: &Completion,
    request: &ChatRequest,
    reply_tokens: Option<usize>,
) -> ReplyUsage {
    match &completion.usage {
        Some(usage) => ReplyUsage {
            prompt: u64::from(usage.prompt_tokens),
            completion: u64::from(usage.completion_tokens),
        },
        None => ReplyUsage {
            prompt: request.prompt_tokens,
            completion: reply_tokens.map_or(0, |n| u64::try_from(n).unwrap_or(u64::MAX)),
        },
    }
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

/// Ends a run that cannot be answered (`reason` labels the failure metric): the message is
/// marked failed, unless another run answered it meanwhile, whose reply then stands (and is
/// announced if it may not have been).
pub async fn fail(
    ctx: &JobContext,
    job: &CompletionJob,
    claim: Claim,
    subject: &CompletionSubject,
    err: &CompletionError,
    reason: &'static str,
) -> Result<Done, JobError> {
    if record_failure(ctx, job, claim, subject, err).await? {
        metrics::job_failed(reason);
        if let Some(after_failure) = &ctx.hooks.after_failure {
            after_failure().await;
        }
        Ok(Done::Failed)
    } else {
        announce_stored_reply(ctx, claim, subject).await?;
        Ok(Done::AlreadyAnswered)
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
        settle_budget(ctx, job, subject, 0).await;
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

/// Replaces the message's budget reservation by what it really used (nothing, when it failed
/// or was cancelled). Only the run
/// that saved the reply or marked the failure or the cancellation settles, so a job that runs
/// twice settles once.
///
/// The reservation is the one the message records (a retry reserves anew, while the job that
/// runs it may be the one queued before); jobs of messages stored before messages recorded it
/// carry it themselves.
async fn settle_budget(
    ctx: &JobContext,
    job: &CompletionJob,
    subject: &CompletionSubject,
    used: i64,
) {
    let reservation = Reservation::of_message(
        &ctx.ns,
        subject.owner_id,
        subject.budget_day,
        subject.budget_tokens,
    )
    .or_else(|| job.budget.clone());
    let Some(reservation) = reservation else {
        return;
    };
    let mut redis = ctx.redis.clone();
    if let Err(err) = aichat_shared::budget::settle(&mut redis, &reservation, used).await {
        tracing::warn!(error = %err, "could not settle the token budget");
    }
}

/// Ends a run whose user stopped the message before the model answered: the message becomes
/// `cancelled`, its budget reservation is given back, and the chat is told
/// (`message_cancelled`). When the message no longer waits (another run ended it), that run's
/// outcome stands.
pub async fn cancel(
    ctx: &JobContext,
    job: &CompletionJob,
    claim: Claim,
    subject: &CompletionSubject,
) -> Result<Done, JobError> {
    let changed = db_retry(ctx, "cancelling the message", || {
        db::retry::on_conflict("cancel", || db::stops::cancel(&ctx.db, subject.message_id))
    })
    .await?;
    if !changed {
        announce_stored_reply(ctx, claim, subject).await?;
        return Ok(Done::NotWaiting);
    }
    settle_budget(ctx, job, subject, 0).await;
    metrics::job_skipped("cancelled");
    let event = ChatEvent::MessageCancelled {
        message_id: subject.message_id,
    };
    // As for a failure: the message is not run again, so a lost event stays lost; clients see
    // the status on their next read.
    if let Err(err) = announce(ctx, claim, subject, &event).await {
        tracing::warn!(error = %err, "could not publish a chat event");
    }
    tracing::info!("message cancelled by its user before the model answered");
    Ok(Done::Cancelled)
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
        Claim::Unknown => {
            publish_event(&mut redis, &ctx.ns, subject.ai_chat_id, event).await?;
            announce::clear_partial(&mut redis, &ctx.ns, subject.message_id).await;
            Ok(true)
        }
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
pub async fn announce_stored_reply(
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
