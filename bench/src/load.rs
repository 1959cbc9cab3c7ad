//! Load generation: closed-loop HTTP clients bounded in time and count, WebSocket clients,
//! and the progress line on stderr.
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::stats::Samples;

pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Microseconds since the bench started (one clock for publishers and receivers).
pub fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Non-2xx answers of the scenario running now, by status (every request path of the bench
/// reports its status here).
static NON_2XX: Mutex<BTreeMap<u16, u64>> = Mutex::new(BTreeMap::new());

/// Counts `status` if it is not 2xx.
pub fn count_status(status: u16) {
    if !(200..300).contains(&status)
        && let Ok(mut counts) = NON_2XX.lock()
    {
        *counts.entry(status).or_default() += 1;
    }
}

/// The non-2xx answers counted since the last call, by status.
pub fn take_non_2xx() -> BTreeMap<u16, u64> {
    NON_2XX
        .lock()
        .map(|mut counts| std::mem::take(&mut *counts))
        .unwrap_or_default()
}

/// A client pool sized for `conns` concurrent requests to one host.
pub fn http_client(conns: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(conns)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(15))
        .build()?)
}

/// Counters shared by the load tasks and the progress line.
#[derive(Default)]
pub struct Counters {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    first_errors: Mutex<Vec<String>>,
}

impl Counters {
    pub fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut v) = self.first_errors.lock()
            && v.len() < 5
        {
            v.push(what);
        }
    }

    pub fn first_errors(&self) -> Vec<String> {
        self.first_errors
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }
}

/// Prints `[label] elapsed ok err` to stderr every two seconds until dropped.
pub struct Progress {
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start(label: String, counters: Arc<Counters>) -> Self {
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "  [{label}] {:>5.1}s ok={} errors={}",
                    started.elapsed().as_secs_f64(),
                    counters.ok.load(Ordering::Relaxed),
                    counters.errors.load(Ordering::Relaxed)
                );
            }
        });
        Progress { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a closed-loop run did.
pub struct LoadResult {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub samples: Samples,
    pub first_errors: Vec<String>,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-6)
    }
}

/// `clients` tasks each running `op(client, seq)` back to back until `duration` passes or
/// `max_ops` operations were started; latencies of successful operations are recorded.
pub async fn closed_loop<F, Fut>(
    label: &str,
    clients: usize,
    duration: Duration,
    max_ops: u64,
    op: F,
) -> LoadResult
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let counters = Arc::new(Counters::default());
    let issued = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start(label.to_owned(), counters.clone());
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(clients);
    for client in 0..clients {
        let op = op.clone();
        let counters = counters.clone();
        let issued = issued.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Samples::with_capacity(4096);
            while Instant::now() < deadline {
                let seq = issued.fetch_add(1, Ordering::Relaxed);
                if seq >= max_ops {
                    break;
                }
                let t = Instant::now();
                match tokio::time::timeout_at(deadline.into(), op(client, seq)).await {
                    Ok(Ok(())) => {
                        samples.record(t.elapsed());
                        counters.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => counters.error(e),
                    Err(_) => break, // cut off by the deadline: neither counted nor an error
                }
            }
            samples
        }));
    }
    let mut samples = Samples::default();
    for t in tasks {
        if let Ok(s) = t.await {
            samples.merge(s);
        }
    }
    LoadResult {
        ok: counters.ok.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        elapsed: started
            .elapsed()
            .min(duration.max(Duration::from_millis(1))),
        samples,
        first_errors: counters.first_errors(),
    }
}

/// Checks an HTTP response's status, reading (and dropping) its body.
pub async fn expect_status(
    resp: Result<reqwest::Response, reqwest::Error>,
    want: u16,
) -> Result<usize, String> {
    match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            count_status(status);
            let body = r.bytes().await.map_err(|e| format!("body: {e}"))?;
            if status == want {
                Ok(body.len())
            } else {
                Err(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ))
            }
        }
        Err(e) => Err(format!("request: {e}")),
    }
}

/// Opens `/ws/ai-chat/{chat}/?token=` on the API.
pub async fn ws_connect(port: u16, chat: i64, token: &str) -> Result<Ws, String> {
    let url = format!("ws://127.0.0.1:{port}/ws/ai-chat/{chat}/?token={token}");
    match tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async(url),
    )
    .await
    {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(format!("ws connect: {e}")),
        Err(_) => Err("ws connect: timed out".into()),
    }
}

/// The next text frame, skipping control frames; `Err` on close or error.
pub async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("ws: {e}")),
            None => return Err("ws: stream ended".into()),
        }
    }
}
