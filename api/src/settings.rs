//! `aichat-api` settings: flags with environment fallback (`aichat-api --help` lists them).
use clap::{ArgAction, Parser, Subcommand};
use secrecy::SecretString;

use aichat_shared::config::{DatabaseSettings, LogSettings, OpenAiSettings, RedisSettings};

use crate::ip_range::IpRange;

#[derive(Parser, Debug, Clone)]
#[command(name = "aichat-api", version, about = "aichat HTTP and WebSocket API")]
pub struct Settings {
    /// Address the HTTP server listens on (port 0 picks a free one).
    #[arg(long, env = "API_ADDR", default_value = "127.0.0.1:8000")]
    pub api_addr: String,
    #[command(flatten)]
    pub database: DatabaseSettings,
    #[command(flatten)]
    pub redis: RedisSettings,
    #[command(flatten)]
    pub openai: OpenAiSettings,
    #[command(flatten)]
    pub log: LogSettings,
    /// Hours a login session lives (default 14 days; 1 hour to 10 years).
    #[arg(long, env = "SESSION_TTL_HOURS", default_value_t = 336, value_parser = clap::value_parser!(i64).range(1..=87_600))]
    pub session_ttl_hours: i64,
    /// Seconds an instance remembers a session it has looked up (0: look it up every time).
    /// Logout takes effect at once on the instance that served it; elsewhere a revoked or
    /// expired session is still accepted for at most this long.
    #[arg(long, env = "SESSION_CACHE_SECS", default_value_t = 3)]
    pub session_cache_secs: u64,
    /// Bearer token a Prometheus scraper presents on the API's `/metrics` (unset: only staff
    /// sessions may read it).
    #[arg(long, env = "METRICS_TOKEN", value_parser = metrics_token)]
    pub metrics_token: Option<SecretString>,
    /// Mark the `sessionid` cookie `Secure`, so a browser sends it over HTTPS only (turn it off
    /// only to serve plain HTTP on a developer machine; `scripts/run` does).
    #[arg(long, env = "COOKIE_SECURE", action = ArgAction::Set, default_value_t = true)]
    pub cookie_secure: bool,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Longest message content accepted, in characters.
    #[arg(long, env = "MAX_CONTENT_CHARS", default_value_t = 32_000)]
    pub max_content_chars: usize,
    /// Most messages one AI chat import (`POST /api/ai/chats/import/`) may hold.
    #[arg(long, env = "IMPORT_MAX_MESSAGES", default_value_t = 10_000)]
    pub import_max_messages: usize,
    /// Largest AI chat import body accepted, in bytes (a limit of its own: the export of a long
    /// chat is larger than `MAX_BODY_BYTES`); larger ones get 413.
    #[arg(long, env = "IMPORT_MAX_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub import_max_bytes: usize,
    /// Apply pending database migrations at start-up.
    #[arg(long, env = "RUN_MIGRATIONS", action = ArgAction::Set, default_value_t = true)]
    pub run_migrations: bool,
    /// Messages one user may send per minute, over REST and WebSocket together (0: no limit).
    #[arg(long, env = "SEND_RATE_PER_MINUTE", default_value_t = 60)]
    pub send_rate_per_minute: u64,
    /// The default daily token budget: tokens one user may spend per UTC day, prompt and
    /// completion together (0: no limit). A budget staff set for a user wins over it (0 there:
    /// no tokens at all). Each message reserves the most it can cost (`CONTEXT_TOKEN_BUDGET` +
    /// `MAX_COMPLETION_TOKENS`) when it is sent; the worker settles it to the real use.
    #[arg(long, env = "DAILY_TOKEN_BUDGET", default_value_t = 0)]
    pub daily_token_budget: i64,
    /// Send batches written at once, each on a database connection of the writers' own (so
    /// the API opens this many connections beside `DATABASE_MAX_CONNECTIONS`).
    #[arg(long, env = "SEND_BATCH_WRITERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub send_batch_writers: u16,
    /// Milliseconds a send writer's connection must have been idle before it is checked (one
    /// round trip) as a batch takes it; 0: every time (`DATABASE_PING_AFTER_IDLE_MS` is the
    /// other pools'). Under load a writer's connection is never idle, so the check cost every
    /// batch a round trip (BENCHMARKS.md, "Cost per answered message"); a batch whose
    /// connection PostgreSQL ended meanwhile is answered with that error and runs again on
    /// another connection.
    #[arg(long, env = "SEND_BATCH_PING_AFTER_IDLE_MS", default_value_t = 1000)]
    pub send_batch_ping_after_idle_ms: u64,
    /// Most sends written in one batch (one statement, one job push).
    #[arg(long, env = "SEND_BATCH_MAX", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub send_batch_max: u16,
    /// Seconds a client has to send a request's headers (slow-header attacks); the connection
    /// is closed past it.
    #[arg(long, env = "HEADER_READ_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_secs: u64,
    /// Seconds a GET may run, and a body may take to arrive, before the request is answered 503
    /// with `Retry-After` (`send_message?wait` gets `MAX_WAIT_SECS` more); also the longest a
    /// write to a client may stay blocked before its connection is dropped.
    #[arg(long, env = "REQUEST_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_secs: u64,
    /// Connections open at once, WebSockets included; past it a new connection is answered 503
    /// and closed.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// WebSockets one user may have open on one API instance (0: no limit); past it the
    /// upgrade is answered 429.
    #[arg(long, env = "MAX_SOCKETS_PER_USER", default_value_t = 20)]
    pub max_sockets_per_user: usize,
    /// Reply streams (`GET /api/ai/messages/{id}/stream/`) one user may have open on one API
    /// instance (0: no limit); past it the request is answered 429.
    #[arg(long, env = "MAX_STREAMS_PER_USER", default_value_t = 20)]
    pub max_streams_per_user: usize,
    /// Events a WebSocket may fall behind before it is closed (1013).
    #[arg(long, env = "WS_QUEUE_CAPACITY", default_value_t = 256)]
    pub ws_queue_capacity: usize,
    /// Largest WebSocket message a client may send, in bytes.
    #[arg(long, env = "WS_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub ws_max_message_bytes: usize,
    /// Seconds between server pings; a socket silent for two intervals is dropped. At each
    /// ping a socket looks its session up, so a lost revocation ends it within this long.
    #[arg(long, env = "WS_PING_SECS", default_value_t = 30)]
    pub ws_ping_secs: u64,
    /// Seconds one frame may take to reach a client before the socket counts as stuck.
    #[arg(long, env = "WS_SEND_TIMEOUT_SECS", default_value_t = 10)]
    pub ws_send_timeout_secs: u64,
    /// Longest `send_message?wait=N`, in seconds (`?wait=true` waits this long).
    #[arg(long, env = "MAX_WAIT_SECS", default_value_t = 60)]
    pub max_wait_secs: u64,
    /// Longest a stop request (`POST /api/ai/messages/{id}/stop/`) waits for the worker to save
    /// the stopped reply before it answers 202 (the stop still happens).
    #[arg(long, env = "STOP_WAIT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub stop_wait_secs: u64,
    /// Longest one reply stream (`GET /api/ai/messages/{id}/stream/`) stays open; the client
    /// then reconnects with `Last-Event-ID`.
    #[arg(long, env = "STREAM_MAX_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stream_max_secs: u64,
    /// Reverse proxies (addresses or CIDR ranges, comma-separated) whose `X-Forwarded-For`
    /// names the client; from any other peer the header is ignored.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',', num_args = 0..)]
    pub trusted_proxies: Vec<IpRange>,
    /// Most participants of a user-to-user chat, its creator included.
    #[arg(long, env = "MAX_CHAT_PARTICIPANTS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(2..=10_000))]
    pub max_chat_participants: u64,
    /// Other origins (`https://app.example.com`, comma-separated) whose pages may make
    /// cookie-authenticated unsafe requests and WebSocket connections; the API's own origin
    /// always may.
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',', num_args = 0.., value_parser = parse_origin)]
    pub allowed_origins: Vec<String>,
    /// Length in seconds of the sliding windows that count login and registration attempts.
    #[arg(long, env = "AUTH_WINDOW_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub auth_window_secs: u64,
    /// Login attempts one client address may make per window (0: no limit).
    #[arg(long, env = "LOGIN_ATTEMPTS_PER_ADDRESS", default_value_t = 30)]
    pub login_attempts_per_address: u64,
    /// Login attempts for one username per window, from anywhere (0: no limit).
    #[arg(long, env = "LOGIN_ATTEMPTS_PER_USERNAME", default_value_t = 10)]
    pub login_attempts_per_username: u64,
    /// Registrations one client address may make per window (0: no limit).
    #[arg(long, env = "REGISTRATIONS_PER_ADDRESS", default_value_t = 10)]
    pub registrations_per_address: u64,
    /// Consecutive failed logins of one username before each further failure locks it (1 s,
    /// then twice as long each time).
    #[arg(long, env = "LOGIN_FAILURES_BEFORE_BACKOFF", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub login_failures_before_backoff: u64,
    /// Longest lock of a username after failed logins, in seconds.
    #[arg(long, env = "LOGIN_BACKOFF_MAX_SECS", default_value_t = 900)]
    pub login_backoff_max_secs: u64,
    /// Password hashes and checks run at once (argon2, 19 MiB each; 0: one per core), and new
    /// passwords' comparisons with the account's username and email.
    #[arg(long, env = "PASSWORD_HASH_CONCURRENCY", default_value_t = 0)]
    pub password_hash_concurrency: usize,
    /// Milliseconds a login or registration waits for a hashing slot before it gets 503.
    #[arg(long, env = "PASSWORD_HASH_WAIT_MS", default_value_t = 500)]
    pub password_hash_wait_ms: u64,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Create a staff account. The password is read from `ADMIN_PASSWORD` only (never a flag),
    /// so it lands in no shell history or process list. An existing user is made staff only
    /// with `--promote-existing`.
    CreateAdmin {
        #[arg(long)]
        username: String,
        #[arg(long, default_value = "")]
        email: String,
        /// Make the user staff if the account already exists (otherwise that is an error).
        #[arg(long)]
        promote_existing: bool,
    },
    /// End every session of a user: their logins stop working and their WebSockets close
    /// (4401) on every API instance.
    RevokeSessions {
        #[arg(long)]
        username: String,
    },
}

/// The staff password `create-admin` sets, from `ADMIN_PASSWORD`.
pub fn admin_password() -> Option<SecretString> {
    std::env::var("ADMIN_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
        .map(SecretString::from)
}

fn metrics_token(value: &str) -> Result<SecretString, String> {
    if value.len() < 16 {
        return Err("METRICS_TOKEN must be at least 16 characters".into());
    }
    Ok(SecretString::from(value.to_owned()))
}

/// An origin as `ALLOWED_ORIGINS` entries and `Origin` headers are compared: lower case, no
/// trailing slash.
pub fn normalize_origin(value: &str) -> String {
    value.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// An `ALLOWED_ORIGINS` entry: `scheme://host[:port]`, normalized.
fn parse_origin(value: &str) -> Result<String, String> {
    let origin = normalize_origin(value);
    if origin.starts_with("http://") || origin.starts_with("https://") {
        Ok(origin)
    } else {
        Err(format!("{value:?} is not an origin (scheme://host[:port])"))
    }
}
