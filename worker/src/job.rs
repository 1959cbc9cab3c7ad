//! The completion job: the apalis handler and the run of one job, from the message to the
//! model's answer. What the job shares with the others is in `state.rs`, what is asked is
//! built in `request.rs`, and how a run ends once the model has spoken (saving, announcing,
//! failing) is in `outcome.rs`.
//!
//! How a run ends decides what apalis does with the job:
//! - `Ok` → done (also when there is nothing to do: message deleted, already answered);
//! - `AbortError` → Killed, parked in the dead set, never retried by the storage: the model
//!   failed for good or after our own retries, and the user message is `failed`;
//! - any other error → the storage runs the job again later (database or Redis trouble, or
//!   shutdown before the model was called). The reply write is idempotent, so a second run is
//!   harmless.
use std::sync::Arc;

use anyhow::Context;
use apalis::prelude::{AbortError, Attempt, BoxDynError, Data, TaskId, WorkerContext};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use aichat_shared::announce::{self, Claim};
use aichat_shared::db;
use aichat_shared::db::claims::ClaimRequest;
use aichat_shared::db::completions::ClaimedJob;
use aichat_shared::jobs::CompletionJob;
use aichat_shared::models::Model;
use aichat_shared::partial;

use crate::deltas::{DeltaTarget, Piece, publish_deltas};
use crate::history_cache;
use crate::llm::{ChatRequest, Completion, CompletionError};
use crate::metrics;
use crate::outcome::{Done, JobError, announce_stored_reply, cancel, fail, save_and_announce};
use crate::request;
use crate::retry::FailureReason;
use crate::state::JobContext;
use crate::stop::Ack;

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
    let _running = ctx.stopping.job_started(worker.name());
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
            Ok(Done::Cancelled) => "cancelled",
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
    // The user's turn first (fair queuing), then one of this worker's model slots: a job
    // waiting for its turn holds neither, and its message stays `queued` meanwhile.
    let _turn = match job.user_id {
        Some(user_id) => ctx
            .user_slots
            .take(user_id, job.message_id, &mut ctx.shutdown.clone())
            .await
            .map_err(|err| JobError::Retry(err.into()))?,
        None => None,
    };
    let mut shutdown = ctx.shutdown.clone();
    let _running = tokio::select! {
        // A free slot is taken even while stopping, as before the per-user limit: only a job
        // still waiting when the stop begins goes back.
        biased;
        permit = ctx.running.acquire() => permit.map_err(|err| JobError::Retry(err.into()))?,
        Ok(_) = shutdown.wait_for(|stopping| *stopping) => {
            return Err(JobError::Retry(anyhow::anyhow!(
                "the worker began to stop before the job's turn came"
            )));
        }
    };
    // Claimed before the message is read, so a run that finds it answered knows whether that
    // answer was announced (`aichat_shared::announce`).
    let claim = announce::claim(&mut ctx.redis.clone(), &ctx.ns, job.message_id).await;
    // Listening before the message is taken: a stop request that finds it `answering` is
    // published after this (`stop_requests.rs`).
    let listening = ctx.stop_requests.listen(job.message_id);
    // What the context cache holds of the chat: the read skips it (`history_cache.rs`).
    let limit = request::history_limit(ctx);
    let cached = history_cache::load(ctx, job.ai_chat_id, limit).await;
    let Some(ClaimedJob {
        subject,
        history,
        related,
    }) = ctx
        .claims
        .claim(ClaimRequest {
            message_id: job.message_id,
            known: cached.as_ref().map(history_cache::Entry::known),
            history_limit: i64::try_from(limit).unwrap_or(i64::MAX),
            related_limit: request::related_limit(job),
        })
        .await
        .context("taking the user message")?
    else {
        announce::release(&mut ctx.redis.clone(), &ctx.ns, job.message_id).await;
        metrics::job_skipped("message_gone");
        return Ok(Done::MessageGone);
    };
    if !subject.claimed {
        // Answered, failed or cancelled: whoever ended it announced it, unless a run that
        // saved a reply died before announcing it.
        metrics::job_skipped(if subject.answered {
            "already_answered"
        } else {
            "not_waiting"
        });
        if claim == Claim::Inherited {
            announce_stored_reply(ctx, claim, &subject).await?;
        } else {
            announce::release(&mut ctx.redis.clone(), &ctx.ns, job.message_id).await;
        }
        return Ok(if subject.answered {
            Done::AlreadyAnswered
        } else {
            Done::NotWaiting
        });
    }
    if subject.ai_chat_id != job.ai_chat_id {
        announce::release(&mut ctx.redis.clone(), &ctx.ns, job.message_id).await;
        return Err(JobError::Abort(format!(
            "message {} belongs to AI chat {}, not {}",
            subject.message_id, subject.ai_chat_id, job.ai_chat_id
        )));
    }
    if claim == Claim::Inherited {
        // An earlier run may have streamed part of a reply and died: followers drop that text;
        // this run's deltas are numbered from 1.
        let mut redis = ctx.redis.clone();
        if let Err(err) =
            partial::restart(&mut redis, &ctx.ns, subject.ai_chat_id, subject.message_id).await
        {
            tracing::warn!(error = %err, "could not start the reply in progress over");
        }
    }
    if subject.stop_requested {
        // Its user stopped it while a run that has since died answered it: the model is not
        // asked again.
        return cancel(ctx, job, claim, &subject).await;
    }

    let parts = request::prompt_parts(&subject, history, related, cached, ctx).await?;
    let model = ctx.models.resolve(&subject.model);
    if !subject.model.is_empty() && model.name != subject.model {
        // The operator took this model out of the registry after the chat chose it.
        tracing::warn!(model = %subject.model, "the chat's model is no longer in the registry; using the default");
    }
    let chain = ctx.models.chain(model);
    let (chunks_tx, chunks_rx) = mpsc::unbounded_channel();
    let target = DeltaTarget {
        redis: ctx.redis.clone(),
        ns: ctx.ns.clone(),
        ai_chat_id: subject.ai_chat_id,
        message_id: subject.message_id,
        flush_every: ctx.delta_flush_every,
        flush_chars: ctx.delta_flush_chars,
    };
    let mut shutdown = ctx.shutdown.clone();
    let mut stop = listening.receiver();
    let call = async {
        // Dropping the sender when the call ends lets the publisher flush and finish: the
        // deltas of the text received before a stop are out before the stopped reply.
        let chunks_tx = chunks_tx;
        call_models(&chain, &parts, ctx, &chunks_tx, &mut shutdown, &mut stop).await
    };
    // Past the shutdown grace, a call still waiting on the model is dropped: the job goes
    // back to the queue for another worker.
    let mut abandoned = ctx.stopping.abandoned();
    let (called, ()) = tokio::select! {
        out = async { tokio::join!(call, publish_deltas(chunks_rx, target)) } => out,
        Ok(_) = abandoned.wait_for(|a| *a) => {
            return Err(JobError::Retry(anyhow::anyhow!(
                "abandoned: the worker's shutdown grace ended during the model call"
            )));
        }
    };
    let question_tokens = parts.question_tokens;
    let Some((result, request)) = called? else {
        // No model of the chain had room for the question.
        let err = CompletionError::Failed {
            reason: FailureReason::TooLong,
            attempts: 0,
            streamed: false,
        };
        return fail(ctx, job, claim, &subject, &err, "too_long").await;
    };

    match result {
        Ok(completion) => {
            save_and_announce(
                ctx,
                job,
                claim,
                &subject,
                &request,
                question_tokens,
                completion,
            )
            .await
        }
        Err(CompletionError::Stopped) => cancel(ctx, job, claim, &subject).await,
        Err(err @ CompletionError::Failed { .. }) => {
            fail(ctx, job, claim, &subject, &err, "model").await
        }
        Err(err) => Err(JobError::Retry(err.into())),
    }
}

/// Asks the chat's model, then, while it failed before any of its text went out, each model of
/// its fallback list in turn, every one with the prompt cut to its own window. Once text went
/// out, the reply is that model's or none: a stored reply never holds two models' text.
/// Returns the last call's result and the request it made; `None` when no model had room for
/// the question, so none was called.
async fn call_models(
    chain: &[&Model],
    parts: &Arc<request::PromptParts>,
    ctx: &JobContext,
    chunks: &mpsc::UnboundedSender<Piece>,
    shutdown: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<(Result<Completion, CompletionError>, ChatRequest)>, JobError> {
    let mut last = None;
    for (i, model) in chain.iter().enumerate() {
        let next = chain.get(i + 1);
        // A failure is handed over at once (instead of spending this model's own retries)
        // only to a later model with room for the question.
        let fallback_ready = chain[i + 1..]
            .iter()
            .any(|later| request::has_room(parts, later, ctx));
        let Some(request) = request::request_for(parts, model, ctx).await? else {
            tracing::info!(model = %model.name, "the question does not fit this model's window");
            if let Some(next) = next {
                metrics::fallback(&model.name, &next.name, FailureReason::TooLong.as_str());
            }
            continue;
        };
        let result = ctx
            .llm
            .complete(
                &request,
                &ctx.limiter,
                chunks,
                shutdown,
                stop,
                fallback_ready,
            )
            .await;
        match (&result, next) {
            (
                Err(CompletionError::Failed {
                    reason,
                    streamed: false,
                    ..
                }),
                Some(next),
            ) => {
                tracing::warn!(from = %model.name, to = %next.name, reason = reason.as_str(), "falling back to the next model");
                metrics::fallback(&model.name, &next.name, reason.as_str());
                last = Some((result, request));
            }
            _ => return Ok(Some((result, request))),
        }
    }
    Ok(last)
}
