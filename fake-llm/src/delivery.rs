//! Owns how a streamed response ends: [`StreamDelivery`], the guard that writes `chunks_sent`,
//! `client_hung_up` and `stream_ended` into the request's record once the response is over.

use crate::state::FakeState;

/// How the response of a `stream: true` request ended, as far as the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Dropped before `[DONE]` was handed to hyper: the client went away.
    ClientLeft,
    /// `[DONE]` (or, for injected failures, the whole non-stream answer) was handed to hyper.
    Delivered,
    /// Cut short by graceful shutdown, not by the client.
    ShutDown,
    /// Broken on purpose by an injected [`crate::Outcome::Cut`], not by the client.
    Cut,
}

/// Follows one `stream: true` request from its record to the end of its response.
///
/// Created by the handler and moved into the body stream, so it is dropped by whoever holds
/// the response last: a client closing its connection makes hyper drop the handler future
/// while it waits (latency, hang) or the body stream afterwards, and [`Drop`] then records
/// [`Ending::ClientLeft`] unless `[DONE]` went out or shutdown or an injected cut ended the
/// stream first.
///
/// How soon: hyper 1.x (half-close off, as `axum::serve` runs it) keeps reading a connection
/// while it writes the response, so the client's FIN makes it drop the response at once,
/// measured at well under a millisecond and tested with a minute-long chunk delay
/// (`a_hang_up_is_noticed_before_the_next_chunk_is_due`). Were that read off (half-close on),
/// only writes would reveal the close: the kernel still accepts the first write after it and
/// fails the next, so a slow stream would notice within two `chunk_delay_ms`.
pub(crate) struct StreamDelivery {
    state: FakeState,
    seq: u64,
    chunks_sent: u32,
    ending: Ending,
}

impl StreamDelivery {
    pub(crate) fn new(state: FakeState, seq: u64) -> Self {
        Self {
            state,
            seq,
            chunks_sent: 0,
            ending: Ending::ClientLeft,
        }
    }

    /// A content (word) chunk is being handed to hyper.
    pub(crate) fn sent_content_chunk(&mut self) {
        self.chunks_sent = self.chunks_sent.saturating_add(1);
    }

    /// `data: [DONE]` is being handed to hyper: the client can no longer leave early.
    pub(crate) fn sent_done(&mut self) {
        self.ending = Ending::Delivered;
    }

    pub(crate) fn cut_by_shutdown(&mut self) {
        self.ending = Ending::ShutDown;
    }

    /// The injected cut is about to abort the connection.
    pub(crate) fn cut_on_purpose(&mut self) {
        self.ending = Ending::Cut;
    }

    /// The request got a complete non-stream answer instead (an injected error, a hang's 504).
    pub(crate) fn answered_without_stream(mut self) {
        self.ending = Ending::Delivered;
    }
}

impl Drop for StreamDelivery {
    fn drop(&mut self) {
        self.state.end_stream(
            self.seq,
            self.chunks_sent,
            self.ending == Ending::ClientLeft,
        );
    }
}
