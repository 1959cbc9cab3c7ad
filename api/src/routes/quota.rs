//! What a user has left of their limits: the day's tokens (the budget staff set for them, else
//! `DAILY_TOKEN_BUDGET`) and the send rate (`SEND_RATE_PER_MINUTE`).
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use aichat_shared::budget::{self, DayUse};

use crate::auth::AuthUser;
use crate::error::ApiResult;
use crate::send::rate;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(quota))
}

/// One user's tokens of the current UTC day.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DailyQuota {
    /// Tokens the user may spend today; `null`: no limit.
    pub limit: Option<i64>,
    /// Tokens today's replies used (settled).
    pub used: i64,
    /// Tokens held by messages still waiting for their reply: each holds the most it can cost
    /// until its reply is saved, then only what it used.
    pub reserved: i64,
    /// `max(0, limit − used − reserved)`; `null` without a limit.
    pub remaining: Option<i64>,
    /// The next midnight UTC, when the day's count starts again.
    pub resets_at: DateTime<Utc>,
}

impl DailyQuota {
    pub fn new(limit: Option<i64>, day: DayUse, now: DateTime<Utc>) -> Self {
        DailyQuota {
            limit,
            used: day.used(),
            reserved: day.reserved,
            remaining: day.remaining(limit),
            resets_at: budget::next_reset(now),
        }
    }
}

/// Where the user stands in the send rate's window of one minute.
#[derive(Debug, Serialize, ToSchema)]
pub struct SendRateQuota {
    /// Messages the user may send per window; `null`: no limit.
    pub limit: Option<u64>,
    /// Messages left in the current window; `null` without a limit.
    pub remaining: Option<u64>,
    /// When the current window ends; `null` without a limit, or when no window is open (no
    /// message in the last minute: the next one opens a window of a minute).
    pub resets_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Quota {
    pub daily: DailyQuota,
    pub send_rate: SendRateQuota,
}

/// What the user has left today of their daily token budget, and of the send rate.
#[utoipa::path(get, path = "/api/ai/quota/", tag = "ai",
    responses((status = 200, description = "The user's limits and what is left of them", body = Quota)))]
#[tracing::instrument(skip_all)]
async fn quota(State(state): State<AppState>, auth: AuthUser) -> ApiResult<Json<Quota>> {
    let sender = auth.sender();
    let now = Utc::now();
    let mut redis = state.redis.clone();
    let (days, rate) = tokio::try_join!(
        async {
            budget::day_use(&mut redis, &state.ns, &[sender.user_id], now)
                .await
                .map_err(Into::into)
        },
        rate::peek(&state, sender.user_id, now),
    )?;
    let day = days.first().copied().unwrap_or_default();
    Ok(Json(Quota {
        daily: DailyQuota::new(sender.daily_limit(&state), day, now),
        send_rate: SendRateQuota {
            limit: rate.map(|r| r.limit),
            remaining: rate.map(|r| r.remaining),
            resets_at: rate.and_then(|r| r.resets_at),
        },
    }))
}
