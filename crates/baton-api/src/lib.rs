//! baton-api: the OpenAI-compatible HTTP API, served over any generation [`backend::Backend`].
//!
//! - [`backend`]: the trait a generation engine implements (the head's scheduler, or
//!   [`local::LocalBackend`]), and the token stream whose drop cancels a generation.
//! - [`local`]: a single-process backend running a [`baton_model::pipeline::LocalPipeline`] on a
//!   dedicated thread.
//! - [`openai`]: request parsing and validation (errors name the field) and response bodies.
//! - [`routes`]: the axum router: completions, chat completions (SSE or not), models,
//!   tokenize, health, readiness, metrics, OpenAPI.
//! - [`metrics`]: Prometheus figures of one server.
//! - [`openapi`]: the OpenAPI 3 description of exactly what [`routes`] serves.
//! - [`errors`]: OpenAI error objects and their status codes.
//! - [`auth`]: API keys (`Authorization: Bearer`).
//! - [`config`]: listen address, keys, CORS, limits (request body, connections).
//!
//! [`serve`] binds and runs the whole API; [`routes::router`] gives the router alone.

// The OpenAPI document is one large `json!` literal.
#![recursion_limit = "512"]

pub mod auth;
pub mod backend;
pub mod config;
pub mod errors;
mod listen;
pub mod local;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod routes;

use std::sync::Arc;

pub use backend::Backend;
pub use config::ApiConfig;

/// Errors of starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid API configuration: {0}")]
    Config(String),
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

/// Binds `cfg.listen` and serves the API over `backend` until `shutdown` resolves.
pub async fn serve(
    backend: Arc<dyn Backend>,
    cfg: ApiConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind { addr: cfg.listen, source })?;
    serve_on(listener, backend, cfg, shutdown).await
}

/// Serves the API on an already bound listener (tests bind port 0 and read the address back).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    backend: Arc<dyn Backend>,
    cfg: ApiConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    cfg.warn_if_exposed(addr);
    let app = routes::router(backend, &cfg)?;
    tracing::info!(%addr, "OpenAI-compatible API listening");
    axum::serve(listen::Capped::new(listener, cfg.max_connections), app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
