//! Owns the shared mutable state: config, failure script, PRNG, request log and change/shutdown signals.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::{
    config::{FakeConfig, Outcome},
    protocol::ChatRequest,
    rng::XorShift64,
    tokens::Usage,
};

/// One chat-completion request as the fake saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// 1-based, monotonic for the server's lifetime (not reset by clearing).
    pub seq: u64,
    /// Unix epoch milliseconds at arrival.
    pub received_at_ms: u64,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// The raw `messages` array.
    pub messages: Vec<Value>,
    /// [`Outcome::name`] of what was done with it.
    pub outcome: String,
    /// Usage reported to the client, when it was answered.
    pub usage: Option<Usage>,
    /// Bearer token of the `Authorization` header, if any.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Every other top-level request field (temperature, max_tokens, stream_options, ...).
    #[serde(default)]
    pub params: Map<String, Value>,
    /// `stream: true` only: the response is over, whichever way (`[DONE]` sent, client gone,
    /// server shut down, an injected cut, or an injected failure answered instead);
    /// `client_hung_up` and `chunks_sent` are final from then on. Always false when `stream` is
    /// false.
    #[serde(default)]
    pub stream_ended: bool,
    /// `stream: true` only: the client closed the connection (or dropped the response) before
    /// the server handed `data: [DONE]` to it, be it mid-stream or before the first byte (during
    /// latency or a hang). False for a stream delivered completely, a stream cut by shutdown or
    /// by an injected [`Outcome::Cut`], an injected failure answered in full, and every
    /// non-streamed request.
    #[serde(default)]
    pub client_hung_up: bool,
    /// Content chunks of the reply (one per word, not counting the role, finish, usage and
    /// `[DONE]` events) handed to the connection before the stream ended; the chunk in flight
    /// when the client left is counted, so the client may have received one fewer. All of them
    /// (`usage.completion_tokens`) for a complete stream; 0 for non-streamed requests.
    #[serde(default)]
    pub chunks_sent: u32,
}

/// Handle on the fake's state; cheap to clone, shared by the router and [`crate::FakeLlm`].
#[derive(Clone)]
pub struct FakeState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Mutex<FakeConfig>,
    script: Mutex<VecDeque<Outcome>>,
    rng: Mutex<XorShift64>,
    records: Mutex<VecDeque<RecordedRequest>>,
    next_seq: AtomicU64,
    /// Bumped on every change of `records`, so waiters wake without polling.
    changes: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
}

/// Poisoning only means another handler panicked mid-update; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl FakeState {
    pub fn new(config: FakeConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                rng: Mutex::new(XorShift64::new(config.seed)),
                config: Mutex::new(config),
                script: Mutex::new(VecDeque::new()),
                records: Mutex::new(VecDeque::new()),
                next_seq: AtomicU64::new(1),
                changes: watch::Sender::new(0),
                shutdown: watch::Sender::new(false),
            }),
        }
    }

    pub fn config(&self) -> FakeConfig {
        lock(&self.inner.config).clone()
    }

    /// Replaces the config and re-seeds the failure PRNG from `config.seed`.
    pub fn set_config(&self, config: FakeConfig) {
        *lock(&self.inner.rng) = XorShift64::new(config.seed);
        *lock(&self.inner.config) = config;
    }

    /// Applies a JSON object holding any subset of the config fields; unknown fields are rejected.
    pub fn patch_config(&self, patch: Map<String, Value>) -> Result<FakeConfig, String> {
        let current = serde_json::to_value(self.config()).map_err(|e| e.to_string())?;
        let Value::Object(mut merged) = current else {
            return Err("config did not serialize to an object".to_owned());
        };
        for (key, value) in patch {
            if !merged.contains_key(&key) {
                return Err(format!("unknown config field `{key}`"));
            }
            merged.insert(key, value);
        }
        let config: FakeConfig =
            serde_json::from_value(Value::Object(merged)).map_err(|e| e.to_string())?;
        config.validate()?;
        self.set_config(config.clone());
        Ok(config)
    }

    pub fn push_script(&self, outcomes: impl IntoIterator<Item = Outcome>) {
        lock(&self.inner.script).extend(outcomes);
    }

    /// Outcomes not consumed yet, in order.
    pub fn script(&self) -> Vec<Outcome> {
        lock(&self.inner.script).iter().cloned().collect()
    }

    pub fn clear_script(&self) {
        lock(&self.inner.script).clear();
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.inner.records).iter().cloned().collect()
    }

    pub fn clear_requests(&self) {
        lock(&self.inner.records).clear();
        self.inner.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Waits until at least `n` requests are recorded or `timeout` passes, then returns them all.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        self.wait_until(timeout, |records| records.len() >= n)
            .await
            .unwrap_or_else(|| self.requests())
    }

    /// Waits until `done` holds for the request log, re-checking on every change of it (a new
    /// record, a stream ending, clearing); returns the log that satisfied it, `None` on timeout.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[RecordedRequest]) -> bool,
    ) -> Option<Vec<RecordedRequest>> {
        // Subscribing before the first check means no change can slip in unnoticed.
        let mut changes = self.inner.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let records = self.requests();
            if done(&records) {
                return Some(records);
            }
            if !matches!(
                tokio::time::timeout_at(deadline, changes.changed()).await,
                Ok(Ok(()))
            ) {
                let records = self.requests();
                return done(&records).then_some(records);
            }
        }
    }

    /// Waits until a recorded streamed request has [`RecordedRequest::client_hung_up`] and
    /// returns the first such record, `None` if none appears within `timeout`.
    pub async fn wait_for_hang_up(&self, timeout: Duration) -> Option<RecordedRequest> {
        let hung_up =
            |records: &[RecordedRequest]| records.iter().find(|r| r.client_hung_up).cloned();
        let records = self
            .wait_until(timeout, |records| hung_up(records).is_some())
            .await?;
        hung_up(&records)
    }

    /// Picks the outcome of the next request: script first, then `always`, then `fail_rate`.
    pub(crate) fn next_outcome(&self, config: &FakeConfig) -> Outcome {
        if let Some(outcome) = lock(&self.inner.script).pop_front() {
            return outcome;
        }
        if let Some(outcome) = &config.always {
            return outcome.clone();
        }
        // NaN compares false everywhere, so it behaves like 0.
        let rate = config.fail_rate.clamp(0.0, 1.0);
        if rate > 0.0 {
            let mut rng = lock(&self.inner.rng);
            if rng.next_f64() < rate {
                return match rng.next_u64() % 3 {
                    0 => Outcome::RateLimited {
                        retry_after: "1".to_owned(),
                    },
                    1 => Outcome::ServerError,
                    _ => Outcome::Hang,
                };
            }
        }
        Outcome::Ok
    }

    /// Logs a request and returns its sequence number.
    pub(crate) fn record(
        &self,
        request: &ChatRequest,
        outcome: &Outcome,
        usage: Option<Usage>,
        max_recorded: usize,
    ) -> u64 {
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let record = RecordedRequest {
            seq,
            received_at_ms: now_ms(),
            model: request.model.clone(),
            stream: request.stream,
            include_usage: request.include_usage,
            messages: request.messages.clone(),
            outcome: outcome.name().to_owned(),
            usage,
            api_key: request.api_key.clone(),
            params: request.params.clone(),
            stream_ended: false,
            client_hung_up: false,
            chunks_sent: 0,
        };
        {
            let mut records = lock(&self.inner.records);
            records.push_back(record);
            while records.len() > max_recorded {
                records.pop_front();
            }
        }
        self.inner.changes.send_modify(|v| *v = v.wrapping_add(1));
        seq
    }

    /// Writes how the streamed response of request `seq` ended into its record, unless the
    /// record is gone already (cleared, or evicted by `max_recorded`).
    pub(crate) fn end_stream(&self, seq: u64, chunks_sent: u32, client_hung_up: bool) {
        let found = {
            let mut records = lock(&self.inner.records);
            // Records are (nearly) in `seq` order and a stream ends soon after its request.
            let record = records.iter_mut().rev().find(|r| r.seq == seq);
            record
                .map(|record| {
                    record.stream_ended = true;
                    record.client_hung_up = client_hung_up;
                    record.chunks_sent = chunks_sent;
                })
                .is_some()
        };
        if found {
            self.inner.changes.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    pub(crate) fn trigger_shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Resolves once shutdown has been requested; lets hangs and streams end early.
    pub(crate) fn shutdown_requested(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|down| *down).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_rate_is_deterministic_per_seed() {
        let config = FakeConfig {
            fail_rate: 0.5,
            seed: 7,
            ..FakeConfig::default()
        };
        let run = || {
            let state = FakeState::new(config.clone());
            (0..200)
                .map(|_| state.next_outcome(&config))
                .collect::<Vec<_>>()
        };
        let first = run();
        assert_eq!(first, run());
        let failures = first.iter().filter(|o| **o != Outcome::Ok).count();
        assert!((60..140).contains(&failures), "{failures} failures");
    }

    #[test]
    fn script_then_always_then_ok() {
        let state = FakeState::new(FakeConfig::default());
        state.push_script([Outcome::ServerError]);
        let mut config = state.config();
        assert_eq!(state.next_outcome(&config), Outcome::ServerError);
        assert_eq!(state.next_outcome(&config), Outcome::Ok);
        config.always = Some(Outcome::BadRequest);
        assert_eq!(state.next_outcome(&config), Outcome::BadRequest);
    }

    #[test]
    fn patch_rejects_unknown_and_out_of_range() {
        let state = FakeState::new(FakeConfig::default());
        let patch = |v: Value| state.patch_config(v.as_object().cloned().unwrap_or_default());
        assert!(patch(serde_json::json!({"latncy_ms": 1})).is_err());
        assert!(patch(serde_json::json!({"fail_rate": 2.0})).is_err());
        let config = patch(serde_json::json!({"latency_ms": 5, "always": {"kind": "hang"}}));
        assert_eq!(
            config.map(|c| (c.latency_ms, c.always)),
            Ok((5, Some(Outcome::Hang)))
        );
    }
}
