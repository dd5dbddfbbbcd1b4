//! What an operator sets: where to listen, who may call, from where, and how much.

use std::net::SocketAddr;
use std::time::Duration;

/// The environment variable holding API keys, comma-separated.
pub const API_KEYS_ENV: &str = "BATON_API_KEYS";

/// The default listen address: loopback only, so nothing is exposed by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8421";

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Keys accepted as `Authorization: Bearer <key>` on `/v1/*` and `/tokenize`; empty is open.
    pub api_keys: Vec<String>,
    /// Origins allowed by CORS; empty turns CORS off, `"*"` allows any origin.
    pub cors_origins: Vec<String>,
    /// Largest request body in bytes; a larger one gets 413.
    pub body_limit: usize,
    /// Client connections open at once; more wait in the kernel's backlog until one closes.
    pub max_connections: usize,
    /// `Retry-After` sent with 429 (queue full) and 503 (not ready).
    pub retry_after: Duration,
    /// Generated tokens when a request names no `max_tokens`; `None` is the rest of the context.
    pub default_max_tokens: Option<usize>,
    /// The most `max_tokens` a request may ask for; `None` is the context length.
    pub max_tokens_limit: Option<usize>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("a valid literal address"),
            api_keys: Vec::new(),
            cors_origins: Vec::new(),
            body_limit: 4 << 20,
            max_connections: 256,
            retry_after: Duration::from_secs(1),
            default_max_tokens: None,
            max_tokens_limit: None,
        }
    }
}

impl ApiConfig {
    /// Adds the keys of [`API_KEYS_ENV`] (comma-separated, blanks ignored) to `api_keys`.
    pub fn with_env_keys(mut self) -> Self {
        if let Ok(v) = std::env::var(API_KEYS_ENV) {
            self.api_keys.extend(parse_keys(&v));
        }
        self
    }

    /// Retry-After in whole seconds, at least 1 (the header has no finer unit).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs().max(1)
    }

    /// Logs a warning when `addr` is reachable from other hosts and no key guards it.
    pub fn warn_if_exposed(&self, addr: SocketAddr) {
        if !addr.ip().is_loopback() && self.api_keys.is_empty() {
            tracing::warn!(
                %addr,
                "the API listens on a non-loopback address without API keys: anyone who can reach it \
                 can use the model (set {API_KEYS_ENV} or api_keys)"
            );
        }
    }
}

/// Keys from a comma-separated list, blanks ignored.
pub fn parse_keys(list: &str) -> impl Iterator<Item = String> + '_ {
    list.split(',').map(str::trim).filter(|k| !k.is_empty()).map(str::to_owned)
}
