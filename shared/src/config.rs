//! Settings pieces both binaries share. Each binary flattens these into its own `Settings`
//! (clap, flags with environment fallback); this is the only place that reads the environment.
use std::fmt;

use clap::{Args, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

use crate::keys::Namespace;
use crate::models::{EnvironmentModels, Keys, Registry, RegistryError};

/// Reads `.env` when present. Values already in the environment win.
pub fn load_dotenv() {
    let _ = dotenvy::dotenv();
}

fn secret(value: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(value.to_owned()))
}

#[derive(Args, Clone)]
pub struct DatabaseSettings {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/aichat", value_parser = secret)]
    pub database_url: SecretString,
    /// Most connections this process keeps open to PostgreSQL.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 20)]
    pub database_max_connections: u32,
    /// Seconds a request waits for a free database connection before it fails with 503.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT_SECS", default_value_t = 5)]
    pub database_acquire_timeout_secs: u64,
    /// Milliseconds a pooled connection must have been idle before it is checked (one round
    /// trip) as it is handed out; one used more recently is handed out as it is. 0 (the
    /// default): check every time, so a connection PostgreSQL dropped is replaced before a
    /// request fails on it (BENCHMARKS.md, "Cost per answered message").
    #[arg(long, env = "DATABASE_PING_AFTER_IDLE_MS", default_value_t = 0)]
    pub database_ping_after_idle_ms: u64,
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field(
                "database_url",
                &redact_url(self.database_url.expose_secret()),
            )
            .field("database_max_connections", &self.database_max_connections)
            .field(
                "database_acquire_timeout_secs",
                &self.database_acquire_timeout_secs,
            )
            .field(
                "database_ping_after_idle_ms",
                &self.database_ping_after_idle_ms,
            )
            .finish()
    }
}

#[derive(Args, Clone)]
pub struct RedisSettings {
    /// Redis connection URL (jobs, pub/sub, rate limits).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379", value_parser = secret)]
    pub redis_url: SecretString,
    /// Prefix of every Redis key, queue and channel this deployment uses.
    #[arg(long, env = "AICHAT_NAMESPACE", default_value = "aichat")]
    pub aichat_namespace: String,
}

impl RedisSettings {
    pub fn namespace(&self) -> Namespace {
        Namespace::new(self.aichat_namespace.clone())
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("redis_url", &redact_url(self.redis_url.expose_secret()))
            .field("aichat_namespace", &self.aichat_namespace)
            .finish()
    }
}

#[derive(Args, Clone)]
pub struct OpenAiSettings {
    /// API key for the model provider. Unset: the README's run command starts the fake model.
    #[arg(long, env = "OPENAI_API_KEY", value_parser = secret)]
    pub openai_api_key: Option<SecretString>,
    /// Model used by AI chats that do not name one.
    #[arg(long, env = "OPENAI_MODEL", default_value = "gpt-3.5-turbo")]
    pub openai_model: String,
    /// Base URL of any OpenAI-compatible chat-completions server.
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    pub openai_base_url: String,
    /// Models an AI chat may use, comma-separated; `OPENAI_MODEL` is always one of them.
    /// Unset: `OPENAI_MODEL` alone. Not read when `MODELS_FILE` is set.
    #[arg(long, env = "ALLOWED_MODELS", value_delimiter = ',')]
    pub allowed_models: Vec<String>,
    /// The model registry (TOML; `models.example.toml`): every model AI chats may use, each
    /// with its endpoint, key variable, window, prices and fallbacks. Unset: `OPENAI_MODEL`
    /// and `ALLOWED_MODELS` on `OPENAI_BASE_URL` with `OPENAI_API_KEY`.
    #[arg(long, env = "MODELS_FILE")]
    pub models_file: Option<std::path::PathBuf>,
    /// Most tokens of prompt sent to the model (tiktoken `cl100k_base`): the oldest turns are
    /// dropped to fit. With `MAX_COMPLETION_TOKENS`, also what one send reserves of a user's
    /// daily budget.
    #[arg(long, env = "CONTEXT_TOKEN_BUDGET", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..))]
    pub context_token_budget: u64,
    /// Most tokens of one reply: sent as `max_completion_tokens` on every model call.
    #[arg(long, env = "MAX_COMPLETION_TOKENS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_completion_tokens: u32,
    /// Most of `CONTEXT_TOKEN_BUDGET` the system message (system prompt and related-chat lines)
    /// may take, in percent: the oldest related lines are dropped first, a long one is cut.
    #[arg(long, env = "SYSTEM_TOKEN_SHARE_PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub system_token_share_percent: u8,
}

impl OpenAiSettings {
    /// The model registry: `MODELS_FILE`, or the models of the environment. `keys` says
    /// whether each model's key variable must be set (the worker) or is only named (the API).
    pub fn registry(&self, keys: Keys) -> Result<Registry, RegistryError> {
        // An empty value (`MODELS_FILE=` in a compose file) is no file.
        let Some(path) = self
            .models_file
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        else {
            return Ok(Registry::from_environment(EnvironmentModels {
                default: &self.openai_model,
                others: &self.allowed_models,
                base_url: &self.openai_base_url,
                api_key: self.openai_api_key.as_ref(),
                max_completion_tokens: self.max_completion_tokens,
            }));
        };
        let source = format!("MODELS_FILE {}", path.display());
        let text = std::fs::read_to_string(path)
            .map_err(|err| RegistryError::new(format!("{source}: cannot be read: {err}")))?;
        Registry::parse(
            &text,
            &source,
            keys,
            |var| std::env::var(var).ok(),
            self.max_completion_tokens,
        )
    }

    /// The most tokens one send can cost: a full prompt and the largest reply of any model.
    pub fn most_tokens_per_send(&self, registry: &Registry) -> i64 {
        i64::try_from(self.context_token_budget)
            .unwrap_or(i64::MAX)
            .saturating_add(i64::from(registry.most_completion_tokens()))
    }
}

impl fmt::Debug for OpenAiSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiSettings")
            .field(
                "openai_api_key",
                &self.openai_api_key.as_ref().map(|_| "[redacted]"),
            )
            .field("openai_model", &self.openai_model)
            .field("openai_base_url", &self.openai_base_url)
            .field("allowed_models", &self.allowed_models)
            .field("models_file", &self.models_file)
            .field("context_token_budget", &self.context_token_budget)
            .field("max_completion_tokens", &self.max_completion_tokens)
            .field(
                "system_token_share_percent",
                &self.system_token_share_percent,
            )
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct LogSettings {
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` env-filter syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
}

/// `scheme://user:password@host/db` → `scheme://user:***@host/db`, so URLs can be logged.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_in_urls_are_hidden() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
