//! Staff-only: users with their daily token budgets and what they spent of them today, and
//! setting one user's budget.
use axum::Json;
use axum::extract::State;
use axum::http::Uri;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use aichat_shared::budget;
use aichat_shared::db;
use aichat_shared::db::budgets::UserBudget;

use crate::auth::StaffUser;
use crate::error::{ApiError, ApiResult, FieldErrors};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::paging::{DEFAULT_LIMIT, Order, Page, PageQuery};
use crate::revocation::{self, Revocation};
use crate::routes::quota::DailyQuota;
use crate::routes::schemas::{BAD_PAGE, BadRequestBody, ErrorBody};
use crate::state::AppState;
use crate::validate;

/// The largest daily token budget staff may set: as good as no limit, and far from where
/// Redis's or Lua's arithmetic would lose a token.
pub const MAX_DAILY_TOKENS: i64 = 1_000_000_000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users))
        .routes(routes!(get_user))
        .routes(routes!(set_budget))
}

/// A user as staff see them: their own daily token budget, and today's tokens against the
/// limit they are held to.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminUser {
    pub id: i64,
    pub username: String,
    pub is_staff: bool,
    /// The daily token budget staff set for the user (0: no tokens at all); `null`: the
    /// default, `DAILY_TOKEN_BUDGET` (where 0 means no limit).
    pub daily_token_budget: Option<i64>,
    /// Today's tokens; `daily.limit` is the limit the user is held to (the budget above, else
    /// the default; `null`: none).
    pub daily: DailyQuota,
}

/// `users` with today's use of each, read in one round trip to Redis.
async fn with_today(state: &AppState, users: Vec<UserBudget>) -> ApiResult<Vec<AdminUser>> {
    let now = Utc::now();
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    let days = budget::day_use(&mut state.redis.clone(), &state.ns, &ids, now).await?;
    let default = state.settings.daily_token_budget;
    Ok(users
        .into_iter()
        .zip(days)
        .map(|(user, day)| {
            let limit = budget::daily_limit(user.daily_token_budget, default);
            AdminUser {
                id: user.id,
                username: user.username,
                is_staff: user.is_staff,
                daily_token_budget: user.daily_token_budget,
                daily: DailyQuota::new(limit, day, now),
            }
        })
        .collect())
}

/// How much of their limit a user has taken today (used and reserved): above 0 up to 1 and
/// past it under a limit (a limit of 0 counts as reached); below every such share without one.
fn share_taken(user: &AdminUser) -> f64 {
    let taken = (user.daily.used + user.daily.reserved) as f64;
    match user.daily.limit {
        None => -1.0,
        Some(0) => 1.0,
        Some(limit) => taken / limit as f64,
    }
}

/// Users in pages of id order (100 a page by default; a full page links to the next), each
/// page sorted by the share of their daily limit taken today, the nearest their limit first
/// (then by tokens taken, then by id); users without a limit come last.
#[utoipa::path(get, path = "/api/admin/users/", tag = "admin", operation_id = "admin_list_users",
    params(PageQuery),
    responses((status = 200, description = "A page of users with their budgets and today's tokens",
            body = Vec<AdminUser>,
            headers(("Link" = String, description = "When the page is full: `<url>; rel=\"next\"`, the next page"))),
        (status = 400, description = BAD_PAGE, body = BadRequestBody),
        (status = 403, description = "Staff only", body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn list_users(
    State(state): State<AppState>,
    _staff: StaffUser,
    uri: Uri,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> ApiResult<Page<AdminUser>> {
    let (after_id, limit) = page.read(Order::OldestFirst, DEFAULT_LIMIT)?;
    let users = db::budgets::list_user_budgets(&state.db, after_id, limit).await?;
    let users = with_today(&state, users).await?;
    // The link to the next page follows the page's last id, so it is made before the sort.
    Ok(
        Page::new(users, limit, &uri, Order::OldestFirst, |u| u.id).sort_by(|a, b| {
            share_taken(b)
                .total_cmp(&share_taken(a))
                .then_with(|| {
                    (b.daily.used + b.daily.reserved).cmp(&(a.daily.used + a.daily.reserved))
                })
                .then_with(|| a.id.cmp(&b.id))
        }),
    )
}

/// One user with their budget and today's tokens.
#[utoipa::path(get, path = "/api/admin/users/{id}/", tag = "admin", operation_id = "admin_get_user",
    params(("id" = i64, Path)),
    responses((status = 200, description = "The user", body = AdminUser),
        (status = 403, description = "Staff only", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = id))]
async fn get_user(
    State(state): State<AppState>,
    _staff: StaffUser,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<AdminUser>> {
    let user = db::budgets::get_user_budget(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    one(&state, user).await
}

async fn one(state: &AppState, user: UserBudget) -> ApiResult<Json<AdminUser>> {
    with_today(state, vec![user])
        .await?
        .pop()
        .map(Json)
        .ok_or(ApiError::NotFound)
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct BudgetRequest {
    /// Tokens the user may spend per UTC day, prompt and reply together, 0–1,000,000,000 (0:
    /// none at all, every send is refused); `null`: the default, `DAILY_TOKEN_BUDGET` (where 0
    /// means no limit). Required.
    #[serde(default, deserialize_with = "crate::json_body::explicit")]
    #[schema(value_type = Option<i64>, required = true, minimum = 0, maximum = 1_000_000_000)]
    daily_tokens: Option<Option<i64>>,
}

/// Set one user's daily token budget, or give them the default again (`null`). It holds from
/// the user's next request, on every API instance; what their sends already reserved stays
/// reserved.
#[utoipa::path(put, path = "/api/admin/users/{id}/budget/", tag = "admin",
    params(("id" = i64, Path)), request_body = BudgetRequest,
    responses((status = 200, description = "The user, with the new budget", body = AdminUser),
        (status = 400, description = "`daily_tokens` missing, not an integer or `null`, or outside \
            0–1,000,000,000 (field errors); or a body that is not a JSON object", body = BadRequestBody),
        (status = 403, description = "Staff only; or a cross-site request the cookie authenticated", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = id))]
async fn set_budget(
    State(state): State<AppState>,
    _staff: StaffUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<BudgetRequest>,
) -> ApiResult<Json<AdminUser>> {
    let Some(daily_tokens) = body.daily_tokens else {
        return Err(FieldErrors::single(
            "daily_tokens",
            "This field is required.",
        ));
    };
    if let Some(tokens) = daily_tokens {
        let mut errors = FieldErrors::default();
        validate::in_range(&mut errors, "daily_tokens", tokens, 0, MAX_DAILY_TOKENS);
        errors.check()?;
    }
    let user = db::budgets::set_daily_token_budget(&state.db, id, daily_tokens)
        .await?
        .ok_or(ApiError::NotFound)?;
    // Sessions carry the budget in every instance's cache: forgotten here at once, on the
    // other instances when the announcement reaches them (should it be lost, within
    // `SESSION_CACHE_SECS`).
    state.sessions.revoke_user(id);
    revocation::publish(
        &mut state.redis.clone(),
        &state.ns,
        &Revocation::UserChanged(id),
    )
    .await;
    one(&state, user).await
}
