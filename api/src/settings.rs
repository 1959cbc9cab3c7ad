//! `aichat-api` settings: flags with environment fallback (`aichat-api --help` lists them).
use clap::{ArgAction, Parser, Subcommand};

use aichat_shared::config::{DatabaseSettings, LogSettings, OpenAiSettings, RedisSettings};

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
    /// Hours a login session lives (default 14 days).
    #[arg(long, env = "SESSION_TTL_HOURS", default_value_t = 336)]
    pub session_ttl_hours: i64,
    /// Mark the `sessionid` cookie `Secure` (set it when served over HTTPS).
    #[arg(long, env = "COOKIE_SECURE", action = ArgAction::Set, default_value_t = false)]
    pub cookie_secure: bool,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Longest message content accepted, in characters.
    #[arg(long, env = "MAX_CONTENT_CHARS", default_value_t = 32_000)]
    pub max_content_chars: usize,
    /// Apply pending database migrations at start-up.
    #[arg(long, env = "RUN_MIGRATIONS", action = ArgAction::Set, default_value_t = true)]
    pub run_migrations: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Create a staff account (or make an existing one staff). The password is read from
    /// `ADMIN_PASSWORD`, so it never lands in shell history.
    CreateAdmin {
        #[arg(long)]
        username: String,
        #[arg(long, default_value = "")]
        email: String,
        #[arg(long, env = "ADMIN_PASSWORD", hide_env_values = true)]
        password: String,
    },
}
