//! Owns `POST /v1/chat/completions`: picking the outcome, recording, latency and the (streamed) answer.

use std::{io, time::Duration};

use axum::{
    Json,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::stream;

use crate::{
    config::Outcome,
    delivery::StreamDelivery,
    protocol::{self, ChatRequest, Completion, DONE_FRAME, Frames},
    state::FakeState,
    tokens::{Usage, reply_text, split_word_chunks},
};

pub(crate) async fn chat_completions(
    State(state): State<FakeState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = match ChatRequest::parse(&body, &headers) {
        Ok(request) => request,
        Err(message) => return protocol::invalid_request(&message),
    };
    let config = state.config();
    let outcome = state.next_outcome(&config);
    let reply = reply_text(
        request.last_user_content().as_deref(),
        config.reply_words,
        config.reply.as_deref(),
    );
    let usage = Usage::for_exchange(request.contents(), &reply);
    let seq = state.record(
        &request,
        &outcome,
        (outcome.answers() && config.report_usage).then_some(usage),
        config.max_recorded,
    );
    tracing::debug!(
        seq,
        outcome = outcome.name(),
        stream = request.stream,
        "chat completion"
    );
    // Held from here so a client leaving during latency or a hang also counts as a hang-up.
    let delivery = request
        .stream
        .then(|| StreamDelivery::new(state.clone(), seq));

    let latency_ms = match &outcome {
        Outcome::Hang => {
            return answered_without_stream(delivery, hang(&state, config.hang_ms).await);
        }
        Outcome::Slow { latency_ms } => *latency_ms,
        _ => config.latency_ms,
    };
    if latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
    }

    let cut = match outcome {
        Outcome::Cut { after_chunks } => Some(Cut::AfterWords(after_chunks)),
        Outcome::CutAfterFinish => Some(Cut::AfterFinish),
        _ => None,
    };
    let response = match outcome {
        Outcome::RateLimited { retry_after } => protocol::rate_limited(&retry_after),
        Outcome::InsufficientQuota => protocol::insufficient_quota(),
        Outcome::ServerError => protocol::server_error(),
        // A plain answer has no stream to break; a 500 is the closest whole-response failure.
        Outcome::Cut { .. } | Outcome::CutAfterFinish if delivery.is_none() => {
            protocol::server_error()
        }
        Outcome::BadRequest => {
            protocol::invalid_request("Invalid request (injected by aichat-fake-llm).")
        }
        Outcome::Ok
        | Outcome::Slow { .. }
        | Outcome::Hang
        | Outcome::Cut { .. }
        | Outcome::CutAfterFinish => {
            let completion = Completion {
                id: format!("chatcmpl-{seq}"),
                created: unix_secs(),
                model: request.model,
            };
            match delivery {
                Some(delivery) => {
                    let frames = completion.stream_frames(
                        &split_word_chunks(&reply),
                        usage,
                        request.include_usage && config.report_usage,
                    );
                    let delay = Duration::from_millis(config.chunk_delay_ms);
                    return stream_response(&state, stream_events(frames, cut), delay, delivery);
                }
                None => Json(completion.body(&reply, usage)).into_response(),
            }
        }
    };
    answered_without_stream(delivery, response)
}

/// Closes the delivery record of a `stream: true` request that got a plain answer instead.
fn answered_without_stream(delivery: Option<StreamDelivery>, response: Response) -> Response {
    if let Some(delivery) = delivery {
        delivery.answered_without_stream();
    }
    response
}

/// Never answers on its own; hyper drops this future when the client disconnects.
/// The 504 after `hang_ms` only exists so leaked hangs (and shutdown) terminate.
async fn hang(state: &FakeState, hang_ms: u64) -> Response {
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(hang_ms)) => {}
        () = state.shutdown_requested() => {}
    }
    protocol::error_response(
        StatusCode::GATEWAY_TIMEOUT,
        "Request hung until hang_ms elapsed (injected by aichat-fake-llm).",
        "timeout",
        None,
    )
}

/// One SSE event of a stream, by what it counts as.
enum Event {
    /// Role, finish and usage chunks: sent at once, not counted.
    Other(String),
    /// A word of the reply: sent after `chunk_delay_ms`, counted in `chunks_sent`.
    Content(String),
    /// `data: [DONE]`: once handed over, the client has had the whole stream.
    Done,
    /// An injected [`Outcome::Cut`]: the body fails, so hyper aborts the connection.
    Cut,
}

/// Where an injected cut breaks a stream.
enum Cut {
    /// After at most this many words ([`Outcome::Cut`]).
    AfterWords(u32),
    /// After the finish chunk ([`Outcome::CutAfterFinish`]).
    AfterFinish,
}

/// The events of a streamed answer: all of them, or the ones before `cut` followed by it.
fn stream_events(frames: Frames, cut: Option<Cut>) -> Vec<Event> {
    let mut events: Vec<Event> = Vec::with_capacity(frames.words.len() + 4);
    events.push(Event::Other(frames.role));
    let words = frames.words.into_iter().map(Event::Content);
    match cut {
        Some(Cut::AfterWords(after_chunks)) => {
            let kept = usize::try_from(after_chunks).unwrap_or(usize::MAX);
            events.extend(words.take(kept));
            events.push(Event::Cut);
        }
        Some(Cut::AfterFinish) => {
            events.extend(words);
            events.push(Event::Other(frames.finish));
            events.push(Event::Cut);
        }
        None => {
            events.extend(words);
            events.push(Event::Other(frames.finish));
            events.extend(frames.usage.map(Event::Other));
            events.push(Event::Done);
        }
    }
    events
}

fn stream_response(
    state: &FakeState,
    events: Vec<Event>,
    delay: Duration,
    delivery: StreamDelivery,
) -> Response {
    let shutdown = Box::pin(state.shutdown_requested());
    // `delivery` lives in the stream's state: hyper dropping the body (client gone, or after the
    // injected error) or the stream returning `None` (finished, or cut by shutdown) drops it and
    // updates the record.
    let body = stream::unfold(
        (events.into_iter(), shutdown, delivery),
        move |(mut events, mut shutdown, mut delivery)| async move {
            let frame = match events.next()? {
                Event::Other(frame) => frame,
                Event::Content(frame) => {
                    if !delay.is_zero() {
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            // Cut slow streams short so graceful shutdown is not held up by them.
                            () = &mut shutdown => {
                                delivery.cut_by_shutdown();
                                return None;
                            }
                        }
                    }
                    delivery.sent_content_chunk();
                    frame
                }
                Event::Done => {
                    delivery.sent_done();
                    DONE_FRAME.to_owned()
                }
                Event::Cut => {
                    delivery.cut_on_purpose();
                    // hyper drops the connection on a body error without flushing what it has
                    // buffered; pending once first lets it write the chunks already handed over.
                    tokio::task::yield_now().await;
                    let cut = io::Error::other("stream cut (injected by aichat-fake-llm)");
                    return Some((Err(cut), (events, shutdown, delivery)));
                }
            };
            Some((Ok(Bytes::from(frame)), (events, shutdown, delivery)))
        },
    );

    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
