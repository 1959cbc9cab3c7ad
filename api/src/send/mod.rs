//! The send path: a user message taken in over REST `send_message` or a WebSocket `message`
//! frame. [`request`] parses it; [`limits`] admits it ([`rate`], then [`budget`]) and says
//! what is left of them; [`batch`] stores it, queues its completion job and announces it;
//! [`idempotency`] and [`wait`] serve REST's `Idempotency-Key` and `?wait`. What a user does to a message after sending it: [`stop`],
//! [`retry`], and new [`versions`] of it.
pub mod batch;
pub mod budget;
pub mod idempotency;
pub mod limits;
pub mod rate;
pub mod request;
pub mod retry;
pub mod stop;
pub mod versions;
pub mod wait;

use aichat_shared::budget::Reservation;
use aichat_shared::db::ai_messages::NewUserMessage;
use aichat_shared::domain::AiMessage;

use crate::access::not_found_first;
use crate::error::ApiResult;
use crate::state::AppState;

pub use limits::{LimitsLeft, Sender};
pub use request::{SendFields, SendMessage};

/// Stores `message` as a queued user message of `ai_chat_id` and queues its completion job;
/// 404 unless the sender owns the chat (checked by the insert itself, so callers need not).
/// The message, and what is left of the sender's limits.
///
/// The message is committed before the push, so a worker can never take a job whose message
/// is not visible yet. If Redis refuses the push, the message is removed again and the caller
/// gets 503: no message is left waiting for a reply that nothing will produce. Nothing else is
/// written: the sweeper ages a message by its `timestamp`. Sends that arrive together share
/// one statement and one push ([`batch`]).
#[tracing::instrument(skip(state, message), fields(options = ?message.options))]
pub async fn submit_message(
    state: &AppState,
    sender: Sender,
    ai_chat_id: i64,
    message: SendMessage<'_>,
    request_id: Option<String>,
) -> ApiResult<(AiMessage, LimitsLeft)> {
    let user_id = sender.user_id;
    let limits::Admitted { reservation, left } = match limits::admit(state, sender).await {
        Ok(admitted) => admitted,
        // Someone else's chat is not found before anything else is said about it.
        Err(err) => return Err(not_found_first(state, ai_chat_id, user_id, err).await),
    };
    // Written with whatever other sends are waiting: one statement (ownership check, insert,
    // the chat's `updated_at`) committed before one push of their jobs.
    let message = NewUserMessage {
        ai_chat_id,
        user_id,
        content: message.content.to_owned(),
        options: message.options,
        budget: reservation.as_ref().and_then(Reservation::stored),
    };
    let result = state
        .sends
        .submit(message, request_id, reservation.clone())
        .await;
    if result.is_err()
        && let Some(reservation) = &reservation
    {
        budget::release(state, reservation).await;
    }
    result.map(|message| (message, left))
}
