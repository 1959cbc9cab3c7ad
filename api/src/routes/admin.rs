//! Staff-only JSON: search AI chats, filter messages, token totals, and the dead jobs with
//! their re-drive.
use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use aichat_shared::db;
use aichat_shared::db::admin::UsageRow;
use aichat_shared::domain::{AiChat, AiMessage, MessageStatus, Role};
use aichat_shared::jobs::DeadJob;

use crate::auth::StaffUser;
use crate::error::{ApiError, ApiResult, FieldErrors};
use crate::extract::{ApiPath, ApiQuery};
use crate::routes::schemas::{BadRequestBody, ErrorBody};
use crate::state::AppState;
use crate::validate;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(search_chats))
        .routes(routes!(filter_messages))
        .routes(routes!(usage))
        .routes(routes!(dead_jobs))
        .routes(routes!(redrive))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChatSearch {
    /// Part of the title or of the owner's username.
    q: Option<String>,
    /// At most this many (1–500, default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

/// Every user's AI chats whose title or owner matches `q`.
#[utoipa::path(get, path = "/api/admin/ai-chats/", tag = "admin", params(ChatSearch),
    responses((status = 200, description = "The matching AI chats", body = Vec<AiChat>),
        (status = 400, description = "`limit` outside 1–500 or a NUL in `q` (field errors); or a query that does not parse", body = BadRequestBody),
        (status = 403, description = "Staff only", body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn search_chats(
    State(state): State<AppState>,
    _staff: StaffUser,
    ApiQuery(query): ApiQuery<ChatSearch>,
) -> ApiResult<Json<Vec<AiChat>>> {
    let limit = checked_limit(query.limit, 500)?;
    let q = query.q.unwrap_or_default();
    let mut errors = FieldErrors::default();
    validate::no_nul(&mut errors, "q", &q);
    errors.check()?;
    Ok(Json(
        db::admin::search_ai_chats(&state.db, q.trim(), limit).await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessageFilter {
    /// `user`, `assistant` or `system`.
    #[param(pattern = "^(user|assistant|system)$")]
    role: Option<String>,
    /// Only messages at or after this time (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// Only messages before this time (RFC 3339).
    until: Option<DateTime<Utc>>,
    /// At most this many (1–1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// Messages of every user, newest first, filtered by role and date.
#[utoipa::path(get, path = "/api/admin/messages/", tag = "admin", params(MessageFilter),
    responses((status = 200, description = "The matching messages, newest first", body = Vec<AiMessage>),
        (status = 400, description = "An unknown `role`, `limit` outside 1–1000, or `since`/`until` outside the years 1–9999 (field errors); or a query that does not parse", body = BadRequestBody),
        (status = 403, description = "Staff only", body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn filter_messages(
    State(state): State<AppState>,
    _staff: StaffUser,
    ApiQuery(query): ApiQuery<MessageFilter>,
) -> ApiResult<Json<Vec<AiMessage>>> {
    let limit = checked_limit(query.limit, 1000)?;
    let mut errors = FieldErrors::default();
    if let Some(r) = &query.role
        && r.parse::<Role>().is_err()
    {
        errors.add("role", "Must be user, assistant or system.");
    }
    for (field, time) in [("since", &query.since), ("until", &query.until)] {
        if time.as_ref().is_some_and(|t| !validate::storable_time(t)) {
            errors.add(field, validate::TIME_OUT_OF_RANGE);
        }
    }
    errors.check()?;
    let messages = db::admin::filter_messages(
        &state.db,
        query.role.as_deref(),
        query.since,
        query.until,
        limit,
    )
    .await?;
    Ok(Json(messages))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// How many days back (1–366, default 30).
    #[param(minimum = 1, maximum = 366)]
    days: Option<i64>,
}

/// Token totals per user, model and UTC day.
#[utoipa::path(get, path = "/api/admin/usage/", tag = "admin", operation_id = "admin_usage", params(UsageQuery),
    responses((status = 200, description = "Token totals per user, model and day", body = Vec<UsageRow>),
        (status = 400, description = "`days` outside 1–366 (field errors); or a query that does not parse", body = BadRequestBody),
        (status = 403, description = "Staff only", body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn usage(
    State(state): State<AppState>,
    _staff: StaffUser,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> ApiResult<Json<Vec<UsageRow>>> {
    let days = query.days.unwrap_or(30);
    let mut errors = FieldErrors::default();
    validate::in_range(&mut errors, "days", days, 1, 366);
    errors.check()?;
    let days = i32::try_from(days).unwrap_or(30);
    Ok(Json(
        db::admin::usage_by_user_model_day(&state.db, days).await?,
    ))
}

/// Completion jobs the worker gave up on, newest first, but for those whose message has been
/// answered, stopped or deleted since: those are forgotten here. A sweep answers a message whose
/// job died in a database outage longer than the job's retries, and a retry more than a day
/// after the first push follows no chain back to the dead job, so nothing else forgets them;
/// a re-drive of one could only answer 409. A job whose message waits again is still listed
/// (a sweep that gave up on the message leaves it to staff).
#[utoipa::path(get, path = "/api/admin/dead-jobs/", tag = "admin",
    responses((status = 200, description = "The dead jobs whose message is failed or waiting, newest first, of the newest 500", body = Vec<DeadJob>),
        (status = 403, description = "Staff only", body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn dead_jobs(
    State(state): State<AppState>,
    _staff: StaffUser,
) -> ApiResult<Json<Vec<DeadJob>>> {
    let jobs = state.queue.dead_jobs(DEAD_JOBS_LISTED).await?;
    let ids: Vec<i64> = jobs.iter().map(|job| job.message_id).collect();
    let statuses: HashMap<i64, MessageStatus> = db::admin::message_statuses(&state.db, &ids)
        .await?
        .into_iter()
        .collect();
    let (listed, ended): (Vec<DeadJob>, Vec<DeadJob>) = jobs.into_iter().partition(|job| {
        matches!(
            statuses.get(&job.message_id),
            Some(MessageStatus::Failed | MessageStatus::Queued | MessageStatus::Answering)
        )
    });
    let ended: Vec<&str> = ended.iter().map(|job| job.task_id.as_str()).collect();
    if let Err(err) = state.queue.remove_dead_jobs(&ended).await {
        tracing::warn!(error = %err, jobs = ended.len(),
            "could not forget the dead jobs of messages that ended since");
    }
    Ok(Json(listed))
}

/// Dead jobs one listing looks at, newest first.
const DEAD_JOBS_LISTED: usize = 500;

#[derive(Debug, Serialize, ToSchema)]
pub struct Redriven {
    task_id: String,
    message_id: i64,
    status: MessageStatus,
}

/// Queue a dead job's message again: it goes back to `queued` and a new job is pushed.
#[utoipa::path(post, path = "/api/admin/dead-jobs/{task_id}/redrive/", tag = "admin",
    params(("task_id" = String, Path)),
    responses((status = 202, description = "The message, queued again", body = Redriven),
        (status = 403, description = "Staff only; or a cross-site request the cookie authenticated", body = ErrorBody),
        (status = 404, description = "No such dead job, or its message no longer exists", body = ErrorBody),
        (status = 409, description = "The message of this job is not failed", body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(task_id = %task_id))]
async fn redrive(
    State(state): State<AppState>,
    _staff: StaffUser,
    ApiPath(task_id): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<Redriven>)> {
    let dead = state
        .queue
        .dead_job(&task_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let job = state
        .queue
        .job_args(&task_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    // Back to `queued`, committed before the push: a worker that takes the job at once must
    // find the message waiting (it takes only a message that waits). If the push fails, the
    // message goes back to `failed`.
    let before = db::ai_messages::find_message(&state.db, dead.message_id).await?;
    if !db::admin::requeue_failed_message(&state.db, dead.message_id).await? {
        return match db::ai_messages::find_message(&state.db, dead.message_id).await? {
            None => {
                state.queue.remove_dead_job(&task_id).await?;
                Err(ApiError::NotFoundBecause(
                    "The message of this job no longer exists",
                ))
            }
            Some(_) => Err(ApiError::Conflict("The message of this job is not failed")),
        };
    }
    // Pushed where the message's chain of jobs goes on (past the dead job), as a retry of a
    // failed message is: a sweep walking the chain finds this job alive, also when the chain's
    // keys expired with a day-old dead job (the push starts the chain again).
    if let Err(err) = crate::send::retry::push_on_chain(&state, &job, true, &[]).await {
        let error = before.as_ref().and_then(|m| m.error.as_deref());
        let restored =
            db::stops::unrequeue(&state.db, dead.message_id, MessageStatus::Failed, error).await;
        if let Err(restore) = restored {
            // Left `queued`: the sweeper pushes its job.
            tracing::warn!(error = %restore, "could not undo a re-drive whose job was not queued");
        }
        return Err(err);
    }
    state.queue.remove_dead_job(&task_id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Redriven {
            task_id,
            message_id: dead.message_id,
            status: MessageStatus::Queued,
        }),
    ))
}

fn checked_limit(limit: Option<i64>, max: i64) -> ApiResult<i64> {
    let limit = limit.unwrap_or(100);
    let mut errors = FieldErrors::default();
    validate::in_range(&mut errors, "limit", limit, 1, max);
    errors.check()?;
    Ok(limit)
}
