//! AI messages: sending one to the model, and reading them back; token usage.
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use aichat_shared::db;
use aichat_shared::db::ai_messages::Branches;
use aichat_shared::domain::{AiMessage, MessageStatus, Usage};
use aichat_shared::partial;

use crate::access::{NOT_OWNED, not_found_first, own_user_message};
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery, RequestId};
use crate::fanout::Subscription;
use crate::paging::{MAX_LIMIT, Order, Page, PageQuery};
use crate::routes::schemas::{BAD_PAGE, BadRequestBody, ErrorBody};
use crate::run_to_end::run_to_end;
use crate::send::idempotency::{self, Asked, Claim};
use crate::send::retry;
use crate::send::stop::{self, Recorded, StopResponse};
use crate::send::versions;
use crate::send::wait::{self, Outcome};
use crate::send::{LimitsLeft, SendFields, SendMessage, submit_message};
use crate::state::AppState;

/// The refusals every route that queues a message shares (send, retry, regenerate, edit).
const PAST_RATE_OR_BUDGET: &str = "Past `SEND_RATE_PER_MINUTE` (`Retry-After` = `RateLimit-Reset`), \
    or past the user's daily token budget (`Retry-After`: the seconds to midnight UTC); both with \
    the limit headers (`RateLimit-*`, `X-Budget-Remaining`)";
const MODEL_FAILED_WAITING: &str = "With `?wait`: the model could not answer";
const QUEUE_UNREACHABLE: &str = "The queue or a backing service unreachable";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(send_message))
        .routes(routes!(list_chat_messages))
        .routes(routes!(list_messages))
        .routes(routes!(get_message))
        .routes(routes!(stop_message))
        .routes(routes!(retry_message))
        .routes(routes!(regenerate_message))
        .routes(routes!(edit_message))
        .routes(routes!(activate_message))
        .routes(routes!(usage))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SendMessageRequest {
    #[serde(default)]
    content: Option<String>,
    /// Add the related chat's latest messages to the system prompt.
    #[serde(default)]
    include_related_chat_context: Option<bool>,
    /// How many related-chat messages, 1–100 (default 20).
    #[serde(default)]
    context_message_limit: Option<i64>,
}

impl SendMessageRequest {
    fn fields(&self) -> SendFields<'_> {
        SendFields {
            content: self.content.as_deref(),
            include_related_chat_context: self.include_related_chat_context,
            context_message_limit: self.context_message_limit,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SendMessageResponse {
    message: AiMessage,
    status: MessageStatus,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SendMessageQuery {
    /// Hold the request until the reply is saved: `true` (for `MAX_WAIT_SECS`), a number of
    /// seconds up to that, or `false`/`0` (the default: answer 202 at once).
    #[param(example = "true")]
    wait: Option<String>,
}

/// The headers `send_message` reads (`crate::send::idempotency`); only the document uses this
/// type.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[expect(
    dead_code,
    reason = "a shape for the document: the handler reads the header itself"
)]
pub struct SendMessageHeaders {
    /// 1–255 visible ASCII characters: a repeated send with the same key (per user, for 24 h)
    /// answers the message the first one stored and queues nothing new.
    #[param(rename = "Idempotency-Key", value_type = String, required = false,
        min_length = 1, max_length = 255, pattern = "^[!-~]+$")]
    pub idempotency_key: Option<String>,
}

/// Store a user message and queue its completion; the reply comes from a worker.
#[utoipa::path(post, path = "/api/ai/chats/{id}/send_message/", tag = "ai",
    params(("id" = i64, Path), SendMessageQuery, SendMessageHeaders), request_body = SendMessageRequest,
    responses(
        (status = 200, description = "With `?wait`: the assistant's reply, saved within the wait", body = AiMessage),
        (status = 202, description = "The message, queued; with `?wait`, the reply was not saved in time. \
            For a repeated `Idempotency-Key`: the first request's message, as it is now", body = SendMessageResponse),
        (status = 400, description = "Field errors (`content`, `context_message_limit`, `wait`); \
            or a body that is not a JSON object, or a bad `Idempotency-Key`", body = BadRequestBody),
        (status = 404, description = NOT_OWNED, body = ErrorBody),
        (status = 409, description = "A request with this `Idempotency-Key` is still being processed, \
            or the key was used for another chat; or (with `?wait`) the message was stopped before \
            the model answered", body = ErrorBody),
        (status = 422, description = "The `Idempotency-Key` was used for this chat with another body \
            (other `content` or options); nothing was stored", body = ErrorBody),
        (status = 429, description = PAST_RATE_OR_BUDGET, body = ErrorBody),
        (status = 502, description = MODEL_FAILED_WAITING, body = ErrorBody),
        (status = 503, description = "The queue or a backing service unreachable, or (with `?wait`) \
            waiting unavailable", body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(ai_chat_id = id))]
async fn send_message(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(query): ApiQuery<SendMessageQuery>,
    headers: HeaderMap,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<SendMessageRequest>,
) -> ApiResult<Response> {
    // Ownership is checked by the insert itself (one query for the common send); the refusals
    // that come earlier ask for it first, so someone else's chat is still a 404 before anything.
    let user_id = auth.user.id;
    let sender = auth.sender();
    let prepared = prepare_send(&state, user_id, id, &query, &headers, &body).await;
    let Prepared {
        wait,
        send,
        mut events,
        claim,
    } = match prepared {
        Ok(prepared) => prepared,
        Err(err) => return Err(not_found_first(&state, id, user_id, err).await),
    };
    let message = match claim {
        Some(Claim::Existing(message_id)) => {
            // A repeat: answer the first request's message, queue nothing.
            return match repeated(&state, user_id, message_id, |m| m.ai_chat == id).await {
                Ok(message) => Ok(repeat_response(message)),
                Err(err) => Err(not_found_first(&state, id, user_id, err).await),
            };
        }
        claim => {
            let (content, options) = (send.content.to_owned(), send.options);
            let request_id = request_id.clone();
            settled(&state, claim, move |state| async move {
                let send = SendMessage {
                    content: &content,
                    options,
                };
                submit_message(&state, sender, id, send, request_id).await
            })
            .await?
        }
    };
    queued_response(&state, message, wait, events.as_mut()).await
}

/// A repeated `Idempotency-Key`'s answer: 202 with the message the first request queued, as
/// it is now.
fn repeat_response(message: AiMessage) -> Response {
    let status = message.status;
    (
        StatusCode::ACCEPTED,
        Json(SendMessageResponse { message, status }),
    )
        .into_response()
}

/// What a request that queued `message` answers: 202 with it, or with `?wait` (`wait` and
/// the chat's `events`, subscribed before it was stored) the reply saved within the wait
/// (200), its failure (502) or its cancellation (409). The 200 and 202 carry what is `left`
/// of the user's limits.
async fn queued_response(
    state: &AppState,
    (message, left): (AiMessage, LimitsLeft),
    wait: Option<std::time::Duration>,
    events: Option<&mut Subscription>,
) -> ApiResult<Response> {
    if let (Some(limit), Some(events)) = (wait, events) {
        match wait::wait_for_reply(state, events, message.id, limit).await? {
            Outcome::Answered(reply) => {
                return Ok(with_limits(
                    (StatusCode::OK, Json(reply)).into_response(),
                    left,
                ));
            }
            Outcome::Failed(error) => {
                return Err(ApiError::BadGateway(format!(
                    "Failed to get response from ChatGPT: {error}"
                )));
            }
            Outcome::Cancelled => {
                return Err(ApiError::Conflict(
                    "The message was stopped before the model answered",
                ));
            }
            Outcome::Pending => {}
        }
    }
    Ok(with_limits(queued(message).into_response(), left))
}

/// 202 with a message just queued.
fn queued(message: AiMessage) -> (StatusCode, Json<SendMessageResponse>) {
    (
        StatusCode::ACCEPTED,
        Json(SendMessageResponse {
            message,
            status: MessageStatus::Queued,
        }),
    )
}

/// `response` with the headers of what is `left` of the user's limits.
fn with_limits(mut response: Response, left: LimitsLeft) -> Response {
    left.write(response.headers_mut());
    response
}

/// A send that passed its checks: what `send_message` goes on with.
struct Prepared<'a> {
    wait: Option<std::time::Duration>,
    send: SendMessage<'a>,
    events: Option<Subscription>,
    claim: Option<Claim>,
}

/// The checks of a send that come before storing it, in the order a client learns of their
/// problems: `?wait`, the fields, the subscription for `?wait`, the Idempotency-Key.
async fn prepare_send<'a>(
    state: &AppState,
    user_id: i64,
    id: i64,
    query: &SendMessageQuery,
    headers: &HeaderMap,
    body: &'a SendMessageRequest,
) -> ApiResult<Prepared<'a>> {
    let wait = wait::parse_wait(query.wait.as_deref(), state.settings.max_wait_secs)?;
    let send = SendMessage::parse(body.fields(), state.settings.max_content_chars)?;
    // Subscribe before the message exists, so its reply cannot slip past.
    let events = subscribe_for_wait(state, id, wait).await?;
    let claim = idempotent(state, user_id, headers, || Asked::send(id, &send)).await?;
    Ok(Prepared {
        wait,
        send,
        events,
        claim,
    })
}

/// An AI message as a chat's message list shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ListedMessage {
    #[serde(flatten)]
    message: AiMessage,
    /// On a user message being answered (`answering`): the text of its reply so far. Absent
    /// otherwise; gone once the reply is saved.
    #[serde(skip_serializing_if = "Option::is_none")]
    partial: Option<String>,
}

/// Which messages of an AI chat a list or an export holds.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BranchesQuery {
    /// `true`: every version of every turn, with `parent_id`, `version` and `active`; absent
    /// or `false`: the active path only (what the user sees).
    all: Option<bool>,
}

impl BranchesQuery {
    pub fn branches(&self) -> Branches {
        if self.all == Some(true) {
            Branches::All
        } else {
            Branches::Active
        }
    }
}

/// The messages of one AI chat's active path, oldest first (1000 a page by default; a full
/// page links to the next); `?all=true`: every version of every turn. A message being
/// answered carries its reply's text so far (`partial`).
#[utoipa::path(get, path = "/api/ai/chats/{id}/messages/", tag = "ai", operation_id = "list_ai_chat_messages",
    params(("id" = i64, Path), PageQuery, BranchesQuery),
    responses((status = 200, description = "A page of the AI chat's messages", body = Vec<ListedMessage>,
            headers(("Link" = String, description = "When the page is full: `<url>; rel=\"next\"`, the next page"))),
        (status = 400, description = BAD_PAGE, body = BadRequestBody),
        (status = 404, description = NOT_OWNED, body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn list_chat_messages(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
    uri: Uri,
    ApiQuery(page): ApiQuery<PageQuery>,
    ApiQuery(branches): ApiQuery<BranchesQuery>,
) -> ApiResult<Page<ListedMessage>> {
    let (after_id, limit) = page.read(Order::OldestFirst, MAX_LIMIT)?;
    // The ownership check and the page in one query.
    let messages = db::ai_messages::list_owned_chat_messages(
        &state.db,
        id,
        auth.user.id,
        branches.branches(),
        after_id,
        Some(limit),
    )
    .await?
    .ok_or(ApiError::NotFound)?;
    let listed = with_partials(&state, messages).await;
    Ok(Page::new(listed, limit, &uri, Order::OldestFirst, |m| {
        m.message.id
    }))
}

/// `messages` with the text so far of the replies in progress among them, read in one round
/// trip (none when none is in progress). Without Redis the list is still served, without it.
async fn with_partials(state: &AppState, messages: Vec<AiMessage>) -> Vec<ListedMessage> {
    let answering: Vec<i64> = messages
        .iter()
        .filter(|m| m.status == MessageStatus::Answering)
        .map(|m| m.id)
        .collect();
    let partials = match partial::read_many(&mut state.redis.clone(), &state.ns, &answering).await {
        Ok(partials) => answering
            .into_iter()
            .zip(partials)
            .map(|(id, p)| (id, p.content()))
            .collect(),
        Err(err) => {
            tracing::warn!(error = %err, "could not read the replies in progress");
            std::collections::HashMap::new()
        }
    };
    messages
        .into_iter()
        .map(|message| ListedMessage {
            partial: partials.get(&message.id).cloned(),
            message,
        })
        .collect()
}

/// The user's AI messages, oldest first (1000 a page by default; a full page links to the
/// next).
#[utoipa::path(get, path = "/api/ai/messages/", tag = "ai", params(PageQuery),
    responses((status = 200, description = "A page of the user's AI messages", body = Vec<AiMessage>,
            headers(("Link" = String, description = "When the page is full: `<url>; rel=\"next\"`, the next page"))),
        (status = 400, description = BAD_PAGE, body = BadRequestBody)))]
#[tracing::instrument(skip_all)]
async fn list_messages(
    State(state): State<AppState>,
    auth: AuthUser,
    uri: Uri,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> ApiResult<Page<AiMessage>> {
    let (after_id, limit) = page.read(Order::OldestFirst, MAX_LIMIT)?;
    let messages =
        db::ai_messages::list_user_messages(&state.db, auth.user.id, after_id, limit).await?;
    Ok(Page::new(messages, limit, &uri, Order::OldestFirst, |m| {
        m.id
    }))
}

/// One AI message of the user's.
#[utoipa::path(get, path = "/api/ai/messages/{id}/", tag = "ai", params(("id" = i64, Path)),
    responses((status = 200, description = "The message", body = AiMessage),
        (status = 404, description = "No such AI message of the user's", body = ErrorBody)))]
#[tracing::instrument(skip_all)]
async fn get_message(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<AiMessage>> {
    db::ai_messages::get_user_message(&state.db, id, auth.user.id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound)
}

/// Stop the reply to one of the user's messages (`{id}`: the user message, as in
/// `assistant_delta.message_id`), from any API instance. A message no worker has taken yet is
/// cancelled; one being answered gets its stream cut and the text so far saved as a reply with
/// `stopped: true`. Repeating a stop answers the same.
#[utoipa::path(post, path = "/api/ai/messages/{id}/stop/", tag = "ai", params(("id" = i64, Path)),
    responses(
        (status = 200, description = "Stopped: the message `cancelled` with no reply, or `answered` \
            with the stopped reply", body = StopResponse),
        (status = 202, description = "The stop is recorded, but the worker answering the message \
            has not saved the stopped reply within `STOP_WAIT_SECS`; the events follow", body = StopResponse),
        (status = 404, description = "No such user message of the user's", body = ErrorBody),
        (status = 409, description = "The message was answered (whole) or failed before the stop", body = ErrorBody),
        (status = 429, description = "Past `SEND_RATE_PER_MINUTE`", body = ErrorBody),
        (status = 503, description = "Redis unreachable (the rate limit, or the events the stop waits for)", body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(message_id = id))]
async fn stop_message(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    let user_id = auth.user.id;
    let mut events = None;
    let recorded = stop::record(&state, user_id, id, |ai_chat_id| {
        let state = &state;
        let events = &mut events;
        async move {
            // Subscribed before the workers are told, so the stopped reply cannot slip past.
            let refusal = "Stopping is unavailable right now; please retry";
            *events = Some(wait::subscribe(state, ai_chat_id, refusal).await?);
            Ok(())
        }
    })
    .await?;
    if let (Recorded::Requested, Some(events)) = (&recorded, events.as_mut()) {
        // A worker that found the stop when it took the message may have ended it already.
        let (ended, _) = stop::outcome(&state, user_id, id).await?;
        if !ended {
            let limit = std::time::Duration::from_secs(state.settings.stop_wait_secs);
            stop::wait_for_end(events, id, limit).await;
        }
    }
    let (ended, response) = match recorded {
        Recorded::Cancelled(message) => (
            true,
            StopResponse {
                message: *message,
                reply: None,
            },
        ),
        Recorded::Requested | Recorded::Ended => stop::outcome(&state, user_id, id).await?,
    };
    let status = if ended {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(response)).into_response())
}

/// Queue one of the user's messages again that got no reply (`failed`, or `cancelled` by a
/// stop): the same message, back to `queued` with its error cleared, answered as a send is.
#[utoipa::path(post, path = "/api/ai/messages/{id}/retry/", tag = "ai", params(("id" = i64, Path)),
    responses(
        (status = 202, description = "The message, queued again", body = SendMessageResponse),
        (status = 404, description = "No such user message of the user's", body = ErrorBody),
        (status = 409, description = "The message is not failed or cancelled (it waits for its reply, \
            or has it); also the loser of concurrent retries", body = ErrorBody),
        (status = 429, description = PAST_RATE_OR_BUDGET, body = ErrorBody),
        (status = 503, description = QUEUE_UNREACHABLE, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(message_id = id))]
async fn retry_message(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
    RequestId(request_id): RequestId,
) -> ApiResult<Response> {
    let sender = auth.sender();
    let (message, left) =
        run_to_end(async move { retry::retry(&state, sender, id, request_id).await }).await?;
    Ok(with_limits(queued(message).into_response(), left))
}

/// Queue a new reply to one of the user's questions (`{id}`: the user message, or a reply to
/// it). The earlier replies are kept; the new one is the next `version` and, once saved, the
/// active one (a question off the active path has its branch made active first).
#[utoipa::path(post, path = "/api/ai/messages/{id}/regenerate/", tag = "ai",
    params(("id" = i64, Path), SendMessageQuery, SendMessageHeaders),
    responses(
        (status = 200, description = "With `?wait`: the new reply, saved within the wait", body = AiMessage),
        (status = 202, description = "The question, queued for its new reply; with `?wait`, the reply \
            was not saved in time. For a repeated `Idempotency-Key`: that request's question, as it is now",
            body = SendMessageResponse),
        (status = 400, description = "Field errors (`wait`), or a bad `Idempotency-Key`", body = BadRequestBody),
        (status = 404, description = "No such AI message of the user's", body = ErrorBody),
        (status = 409, description = "The question still waits for its reply (also the loser of \
            concurrent regenerations); the `Idempotency-Key` is in use or was used for another \
            message; or (with `?wait`) the regeneration was stopped before the model answered", body = ErrorBody),
        (status = 429, description = PAST_RATE_OR_BUDGET, body = ErrorBody),
        (status = 502, description = MODEL_FAILED_WAITING, body = ErrorBody),
        (status = 503, description = QUEUE_UNREACHABLE, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(message_id = id))]
async fn regenerate_message(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(query): ApiQuery<SendMessageQuery>,
    headers: HeaderMap,
    RequestId(request_id): RequestId,
) -> ApiResult<Response> {
    let user_id = auth.user.id;
    let sender = auth.sender();
    let question = versions::question_of(&state, user_id, id).await?;
    let wait = wait::parse_wait(query.wait.as_deref(), state.settings.max_wait_secs)?;
    let mut events = subscribe_for_wait(&state, question.ai_chat, wait).await?;
    let asked = || Asked::regenerate(question.id);
    let message = match idempotent(&state, user_id, &headers, asked).await? {
        Some(Claim::Existing(message_id)) => {
            let message = repeated(&state, user_id, message_id, |m| m.id == question.id).await?;
            return Ok(repeat_response(message));
        }
        claim => {
            let question = question.clone();
            settled(&state, claim, move |state| async move {
                versions::regenerate(&state, sender, &question, request_id).await
            })
            .await?
        }
    };
    queued_response(&state, message, wait, events.as_mut()).await
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct EditMessageRequest {
    /// The question's new text (the rules of `send_message`'s `content`).
    #[serde(default)]
    content: Option<String>,
}

/// Edit one of the user's questions: its new text is stored as a new user message, the next
/// `version` of that turn, and queued. It and its reply become the active path; the turns
/// after the old version stay in their own branch.
#[utoipa::path(post, path = "/api/ai/messages/{id}/edit/", tag = "ai",
    params(("id" = i64, Path), SendMessageQuery, SendMessageHeaders), request_body = EditMessageRequest,
    responses(
        (status = 200, description = "With `?wait`: the reply to the new version, saved within the wait", body = AiMessage),
        (status = 202, description = "The new version, queued; with `?wait`, the reply was not saved in \
            time. For a repeated `Idempotency-Key`: that request's message, as it is now", body = SendMessageResponse),
        (status = 400, description = "Field errors (`content`, `wait`); or a body that is not a JSON \
            object, or a bad `Idempotency-Key`", body = BadRequestBody),
        (status = 404, description = "No such user message of the user's", body = ErrorBody),
        (status = 409, description = "The question still waits for its reply; the `Idempotency-Key` is in \
            use or was used for another message; or (with `?wait`) the new version was stopped before \
            the model answered", body = ErrorBody),
        (status = 422, description = "The `Idempotency-Key` was used for this turn with other `content`; \
            nothing was stored", body = ErrorBody),
        (status = 429, description = PAST_RATE_OR_BUDGET, body = ErrorBody),
        (status = 502, description = MODEL_FAILED_WAITING, body = ErrorBody),
        (status = 503, description = QUEUE_UNREACHABLE, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(message_id = id))]
async fn edit_message(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(query): ApiQuery<SendMessageQuery>,
    headers: HeaderMap,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<EditMessageRequest>,
) -> ApiResult<Response> {
    let user_id = auth.user.id;
    let sender = auth.sender();
    let question = own_user_message(&state, user_id, id).await?;
    let wait = wait::parse_wait(query.wait.as_deref(), state.settings.max_wait_secs)?;
    let fields = SendFields {
        content: body.content.as_deref(),
        include_related_chat_context: None,
        context_message_limit: None,
    };
    let content = SendMessage::parse(fields, state.settings.max_content_chars)?.content;
    let mut events = subscribe_for_wait(&state, question.ai_chat, wait).await?;
    let asked = || Asked::edit(question.ai_chat, question.parent_id, content);
    let message = match idempotent(&state, user_id, &headers, asked).await? {
        Some(Claim::Existing(message_id)) => {
            let same_turn =
                |m: &AiMessage| m.ai_chat == question.ai_chat && m.parent_id == question.parent_id;
            let message = repeated(&state, user_id, message_id, same_turn).await?;
            return Ok(repeat_response(message));
        }
        claim => {
            let (question, content) = (question.clone(), content.to_owned());
            settled(&state, claim, move |state| async move {
                versions::edit(&state, sender, &question, &content, request_id).await
            })
            .await?
        }
    };
    queued_response(&state, message, wait, events.as_mut()).await
}

/// Make the branch through one of the user's messages (`{id}`, a question or a reply) the
/// active path of its chat: the turns before it, its turn (with that reply, for a reply), and
/// after it the newest version of each following turn. Every other message leaves the path.
#[utoipa::path(post, path = "/api/ai/messages/{id}/activate/", tag = "ai", params(("id" = i64, Path)),
    responses(
        (status = 200, description = "The message, now on the active path", body = AiMessage),
        (status = 404, description = "No such AI message of the user's", body = ErrorBody),
        (status = 503, description = "The database unreachable", body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(message_id = id))]
async fn activate_message(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<AiMessage>> {
    Ok(Json(versions::activate(&state, auth.user.id, id).await?))
}

/// The chat's events for `?wait`, subscribed before anything is stored.
async fn subscribe_for_wait(
    state: &AppState,
    ai_chat_id: i64,
    wait: Option<std::time::Duration>,
) -> ApiResult<Option<Subscription>> {
    match wait {
        Some(_) => {
            let refusal = "Waiting for replies is unavailable right now; send without ?wait";
            Ok(Some(wait::subscribe(state, ai_chat_id, refusal).await?))
        }
        None => Ok(None),
    }
}

/// The request's `Idempotency-Key` claim, if it sent one, for what it `asked`.
async fn idempotent(
    state: &AppState,
    user_id: i64,
    headers: &HeaderMap,
    asked: impl FnOnce() -> Asked,
) -> ApiResult<Option<Claim>> {
    match idempotency::key_from(headers)? {
        Some(key) => Ok(Some(
            idempotency::claim(state, user_id, &key, &asked()).await?,
        )),
        None => Ok(None),
    }
}

/// The message an earlier request with the same key produced, as it is now, if `fits` this
/// request; 409 when the key was used for something else.
async fn repeated(
    state: &AppState,
    user_id: i64,
    message_id: i64,
    fits: impl Fn(&AiMessage) -> bool,
) -> ApiResult<AiMessage> {
    db::ai_messages::get_user_message(&state.db, message_id, user_id)
        .await?
        .filter(|m| fits(m))
        .ok_or(ApiError::Conflict(
            "This Idempotency-Key was used for another message",
        ))
}

/// Runs the work of a request that may have claimed an `Idempotency-Key`, then settles the
/// key ([`settle`]), to its end even when the request is dropped first (the client went away,
/// [`run_to_end`]): once under way the work may still store the message, its budget
/// reservation must be kept with it or given back, and a key left `pending` would let a repeat
/// store a second one once the claim expires.
async fn settled<W>(
    state: &AppState,
    claim: Option<Claim>,
    work: impl FnOnce(AppState) -> W,
) -> ApiResult<(AiMessage, LimitsLeft)>
where
    W: Future<Output = ApiResult<(AiMessage, LimitsLeft)>> + Send + 'static,
{
    let work = work(state.clone());
    let state = state.clone();
    run_to_end(async move {
        let result = work.await;
        settle(&state, claim, result).await
    })
    .await
}

/// Records what a new claim produced (or frees it when the request failed).
async fn settle(
    state: &AppState,
    claim: Option<Claim>,
    result: ApiResult<(AiMessage, LimitsLeft)>,
) -> ApiResult<(AiMessage, LimitsLeft)> {
    if let Some(Claim::New(held)) = &claim {
        match &result {
            Ok((message, _)) => idempotency::complete(state, held, message.id).await,
            Err(_) => idempotency::release(state, held).await,
        }
    }
    result
}

/// The user's token totals: overall, per model and per UTC day.
#[utoipa::path(get, path = "/api/ai/usage/", tag = "ai",
    responses((status = 200, description = "The user's token totals", body = Usage)))]
#[tracing::instrument(skip_all)]
async fn usage(State(state): State<AppState>, auth: AuthUser) -> ApiResult<Json<Usage>> {
    let mut conn = state.db.acquire().await?;
    Ok(Json(
        db::usage::usage_for_user(&mut conn, auth.user.id).await?,
    ))
}
