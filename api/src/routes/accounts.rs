//! Registration, login and logout, and who the user is.
use axum::Json;
use axum::extract::State;
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::IntoResponse;
use chrono::{Duration, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use aichat_shared::db;
use aichat_shared::domain::{User, UserSummary};

use crate::auth::{self, AuthUser, SESSION_COOKIE};
use crate::client_address::ClientAddress;
use crate::error::{ApiError, ApiResult, FieldErrors};
use crate::extract::{ApiJson, ApiQuery};
use crate::paging::{DEFAULT_LIMIT, Order, Page, PageQuery};
use crate::passwords;
use crate::revocation::{self, Revocation};
use crate::routes::schemas::{BAD_PAGE, BadRequestBody, ErrorBody};
use crate::state::AppState;
use crate::throttle::{self, Attempt};
use crate::validate;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(logout_all))
        .routes(routes!(me))
        .routes(routes!(users))
}

#[derive(Deserialize, ToSchema)]
pub struct RegisterRequest {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    password_confirm: Option<String>,
}

/// Create an account.
#[utoipa::path(post, path = "/api/register/", tag = "auth", request_body = RegisterRequest,
    security(()),
    responses((status = 201, description = "The new account", body = User),
        (status = 400, description = "Field errors; or a body that is not a JSON object", body = BadRequestBody),
        (status = 429, description = "Too many registrations from this address", body = ErrorBody),
        (status = 503, description = "Password hashing busy, or a backing service unreachable", body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn register(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> ApiResult<(StatusCode, Json<User>)> {
    throttle::admit(&state, Attempt::Register, address, "").await?;
    let body = RegisterRequest {
        username: body.username.as_deref().map(validate::normalize_username),
        ..body
    };
    let mut errors = FieldErrors::default();
    validate::username(&mut errors, body.username.as_deref());
    let email = body.email.unwrap_or_default();
    validate::email(&mut errors, &email);
    // Compared only with the attributes that are valid, as Django's form compares the
    // password with its cleaned fields: a refused 100 KB email is not worth a comparison that
    // grows with its length times the password's.
    let problems = match &body.password {
        Some(password) => {
            let username = match &body.username {
                Some(username) if !errors.has("username") => username.clone(),
                _ => String::new(),
            };
            let email = if errors.has("email") {
                String::new()
            } else {
                email.clone()
            };
            state
                .hashing
                .password_problems(password.clone(), username, email)
                .await?
        }
        None => Vec::new(),
    };
    validate::password(
        &mut errors,
        body.password.as_deref(),
        body.password_confirm.as_deref(),
        problems,
    );
    errors.check()?;
    let (Some(username), Some(password)) = (body.username, body.password) else {
        return Err(ApiError::BadRequest(
            "username and password are required".into(),
        ));
    };
    let hash = state.hashing.hash(password).await?;
    match db::users::insert_user(&state.db, &username, &email, &hash, false).await {
        Ok(user) => Ok((StatusCode::CREATED, Json(user))),
        Err(e) if e.constraint() == Some(db::users::USERNAME_TAKEN) => Err(FieldErrors::single(
            "username",
            "A user with that username already exists.",
        )),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize, ToSchema)]
pub struct LoginRequest {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Shown without its passwords.
impl std::fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("username", &self.username)
            .field("email", &self.email.as_ref().map(|_| "[redacted]"))
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .finish_non_exhaustive()
    }
}

/// Shown without its password.
impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

#[derive(Serialize, ToSchema)]
pub struct LoginResponse {
    #[serde(flatten)]
    user: User,
    /// The session token: send it as `Authorization: Bearer <token>` (or rely on the cookie).
    token: String,
}

/// Log in: answers the user with a session token and sets the `sessionid` cookie.
#[utoipa::path(post, path = "/api/login/", tag = "auth", request_body = LoginRequest,
    security(()),
    responses((status = 200, description = "The user and a session token", body = LoginResponse,
            headers(("Set-Cookie" = String, description = "`sessionid`, the same token"))),
        (status = 400, description = "Field errors (username or password missing, password too long); or a body that is not a JSON object", body = BadRequestBody),
        (status = 401, description = "Invalid credentials", body = ErrorBody),
        (status = 429, description = "Too many attempts for this address or username; the same body whether or not the user exists", body = ErrorBody),
        (status = 503, description = "Password hashing busy, or a backing service unreachable", body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn login(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    ApiJson(body): ApiJson<LoginRequest>,
) -> ApiResult<impl IntoResponse> {
    // Normalized before its length is checked, as at registration: a name registered as 150
    // characters after NFKC logs in with the spelling it was registered with.
    let username = body.username.as_deref().map(validate::normalize_username);
    let mut errors = FieldErrors::default();
    validate::required_text(&mut errors, "username", username.as_deref(), 150);
    match body.password.as_deref() {
        None | Some("") => errors.add("password", validate::REQUIRED),
        Some(p) if p.len() > passwords::MAX_BYTES => {
            errors.add("password", "This password is too long.")
        }
        Some(_) => {}
    }
    errors.check()?;
    let (Some(username), Some(password)) = (username, body.password) else {
        return Err(ApiError::InvalidCredentials);
    };
    // Before anything is looked up or hashed, and alike for known and unknown usernames.
    throttle::admit(&state, Attempt::Login, address, &username).await?;
    let credentials = db::users::find_credentials(&state.db, &username).await?;
    let user_id = credentials.as_ref().map(|c| c.id);
    let stored = credentials.map(|c| c.password_hash);
    if !state.hashing.verify(password, stored).await? {
        throttle::login_failed(&state, &username).await?;
        return Err(ApiError::InvalidCredentials);
    }
    throttle::login_succeeded(&state, &username).await?;
    let user_id = user_id.ok_or(ApiError::InvalidCredentials)?;
    let user = db::users::get_user(&state.db, user_id)
        .await?
        .ok_or(ApiError::InvalidCredentials)?;

    let ttl = Duration::hours(state.settings.session_ttl_hours);
    let (token, token_hash) = auth::new_token();
    db::sessions::delete_expired_sessions(&state.db, user.id).await?;
    db::sessions::insert_session(&state.db, user.id, &token_hash, Utc::now() + ttl).await?;

    let cookie = session_cookie(&state, &token, ttl.num_seconds());
    let mut headers = HeaderMap::new();
    headers.insert(
        SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| ApiError::Internal(e.into()))?,
    );
    Ok((headers, Json(LoginResponse { user, token })))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageResponse {
    message: String,
}

/// Log out: revokes this session server-side (its WebSockets on every instance close with
/// 4401) and clears the cookie.
#[utoipa::path(post, path = "/api/logout/", tag = "auth",
    responses((status = 200, description = "Logged out", body = MessageResponse,
        headers(("Set-Cookie" = String, description = "`sessionid` cleared")))))]
#[tracing::instrument(skip_all)]
async fn logout(State(state): State<AppState>, auth: AuthUser) -> ApiResult<impl IntoResponse> {
    db::sessions::delete_session(&state.db, &auth.token_hash).await?;
    state.sessions.revoke(&auth.token_hash);
    let mut redis = state.redis.clone();
    revocation::publish(
        &mut redis,
        &state.ns,
        &Revocation::session(&auth.token_hash),
    )
    .await;
    logged_out(&state, "Logged out successfully".into())
}

/// Log out everywhere: ends every session of the caller, this one included (their WebSockets
/// on every instance close with 4401), and clears the cookie.
#[utoipa::path(post, path = "/api/logout/all/", tag = "auth",
    responses((status = 200, description = "Logged out of every session", body = MessageResponse,
        headers(("Set-Cookie" = String, description = "`sessionid` cleared")))))]
#[tracing::instrument(skip_all)]
async fn logout_all(State(state): State<AppState>, auth: AuthUser) -> ApiResult<impl IntoResponse> {
    let ended =
        revocation::end_user_sessions(&state.db, &state.redis, &state.ns, auth.user.id).await?;
    state.sessions.revoke_user(auth.user.id);
    logged_out(&state, format!("Logged out of {ended} session(s)"))
}

/// The answer of a logout: `message`, and the cookie cleared.
fn logged_out(state: &AppState, message: String) -> ApiResult<impl IntoResponse + use<>> {
    let clear = session_cookie(state, "", 0);
    let mut headers = HeaderMap::new();
    headers.insert(
        SET_COOKIE,
        HeaderValue::from_str(&clear).map_err(|e| ApiError::Internal(e.into()))?,
    );
    Ok((headers, Json(MessageResponse { message })))
}

/// The `sessionid` cookie carrying `token` for `max_age` seconds; the one that clears it has
/// the same attributes, so a browser replaces rather than keeps the first.
fn session_cookie(state: &AppState, token: &str, max_age: i64) -> String {
    let secure = if state.settings.cookie_secure {
        "; Secure"
    } else {
        ""
    };
    format!("{SESSION_COOKIE}={token}; HttpOnly; SameSite=Lax; Path=/; Max-Age={max_age}{secure}")
}

/// The logged-in user.
#[utoipa::path(get, path = "/api/me/", tag = "auth",
    responses((status = 200, description = "The user", body = User)))]
async fn me(auth: AuthUser) -> Json<User> {
    Json(auth.user)
}

/// The users, to pick chat participants from, in id order (100 a page by default; a full page
/// links to the next).
#[utoipa::path(get, path = "/api/users/", tag = "auth", params(PageQuery),
    responses((status = 200, description = "A page of users", body = Vec<UserSummary>,
            headers(("Link" = String, description = "When the page is full: `<url>; rel=\"next\"`, the next page"))),
        (status = 400, description = BAD_PAGE, body = BadRequestBody)))]
#[tracing::instrument(skip_all)]
async fn users(
    State(state): State<AppState>,
    _auth: AuthUser,
    uri: Uri,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> ApiResult<Page<UserSummary>> {
    let (after_id, limit) = page.read(Order::OldestFirst, DEFAULT_LIMIT)?;
    let users = db::users::list_users(&state.db, after_id, limit).await?;
    Ok(Page::new(users, limit, &uri, Order::OldestFirst, |u| u.id))
}
