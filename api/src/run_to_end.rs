//! Work a request begins that must not be left halfway when the request is dropped (its client
//! went away, its socket closed): a budget reservation taken and not yet committed with its
//! message, a stop committed and not yet announced.
use std::future::Future;

use crate::error::{ApiError, ApiResult};

/// Runs `work` on a task of its own and waits for it. Dropping the caller drops only the
/// wait: the work still runs to its end, and undoes what it began when it fails.
pub(crate) async fn run_to_end<T: Send + 'static>(
    work: impl Future<Output = ApiResult<T>> + Send + 'static,
) -> ApiResult<T> {
    // In the request's span, so what the work logs still names its request.
    tokio::spawn(tracing::Instrument::in_current_span(work))
        .await
        .map_err(|err| ApiError::Internal(anyhow::Error::new(err).context("a request's task")))?
}
