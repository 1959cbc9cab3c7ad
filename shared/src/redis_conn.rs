//! Opening Redis connections with time-outs that hold under load, and the pub/sub connections
//! of the API's fan-out (`api/src/fanout.rs`) and the worker's stop requests and pushed jobs
//! (`worker/src/subscription.rs`).
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, Value};
use tokio::sync::mpsc;

use crate::backoff::Backoff;

/// How long one Redis command may take before it counts as failed. apalis' own `connect()`
/// uses 500 ms, which fails healthy servers under load.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A reconnecting connection to `url`, shared by clones.
pub async fn connect(url: &str) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(2);
    ConnectionManager::new_with_config(client, config).await
}

/// A pub/sub connection: what its channels carry arrives on the receiver as pushes
/// (`PushKind::Message`; `PushKind::Subscribe` confirms a subscription, also the automatic one
/// after a reconnect; `PushKind::Disconnection` says the connection was lost, see
/// [`reconnect`]).
pub async fn connect_pubsub(
    url: &str,
) -> Result<(ConnectionManager, mpsc::UnboundedReceiver<PushInfo>), redis::RedisError> {
    let (push_tx, push_rx) = mpsc::unbounded_channel();
    let client = redis::Client::open(resp3_url(url))?;
    let config = ConnectionManagerConfig::new()
        .set_push_sender(push_tx)
        .set_automatic_resubscription()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(2));
    let conn = ConnectionManager::new_with_config(client, config).await?;
    Ok((conn, push_rx))
}

/// The RESP3 form of a Redis URL: pub/sub over a `ConnectionManager` needs it.
fn resp3_url(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

/// Between pings of a lost pub/sub connection: 100 ms doubling up to 2 s.
const RECONNECT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// After a `PushKind::Disconnection`: pings with backoff until the connection manager has
/// reconnected (it reconnects on the next command only, and then subscribes every channel
/// again). Ends early when `conn` returns `None` (its owner is gone).
pub async fn reconnect(mut conn: impl FnMut() -> Option<ConnectionManager>) {
    let mut failures = 0u32;
    loop {
        let Some(mut conn) = conn() else { return };
        if redis::cmd("PING")
            .query_async::<Value>(&mut conn)
            .await
            .is_ok()
        {
            tracing::info!("pub/sub connection to Redis is back");
            return;
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(RECONNECT_BACKOFF.ceiling(failures)).await;
    }
}

/// The text of a push's channel or payload.
pub fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::resp3_url;

    #[test]
    fn resp3_is_requested_once() {
        assert_eq!(resp3_url("redis://h:1"), "redis://h:1?protocol=resp3");
        assert_eq!(
            resp3_url("redis://h:1/?db=2"),
            "redis://h:1/?db=2&protocol=resp3"
        );
        assert_eq!(
            resp3_url("redis://h?protocol=resp3"),
            "redis://h?protocol=resp3"
        );
    }
}
