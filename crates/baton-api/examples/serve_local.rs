//! Serves one model file through the API in this process, for the Python tests and the CI script:
//!
//! ```text
//! cargo run -p baton-api --example serve_local -- --model PATH [--listen 127.0.0.1:8421]
//!     [--model-id ID] [--split N] [--max-queued N] [--default-max-tokens N] [--max-tokens-limit N]
//! ```
//! API keys come from `BATON_API_KEYS`. Ctrl-C (or SIGTERM) stops it.

use std::path::PathBuf;
use std::sync::Arc;

use baton_api::local::{LocalBackend, LocalOptions};
use baton_api::ApiConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
    ).init();
    let mut model = None;
    let mut opts = LocalOptions::default();
    let mut cfg = ApiConfig::default().with_env_keys();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--listen" => cfg.listen = value()?.parse()?,
            "--model-id" => opts.model_id = Some(value()?),
            "--split" => opts.split = value()?.parse()?,
            "--max-queued" => opts.max_queued = value()?.parse()?,
            "--default-max-tokens" => cfg.default_max_tokens = Some(value()?.parse()?),
            "--max-tokens-limit" => cfg.max_tokens_limit = Some(value()?.parse()?),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let model = model.ok_or("--model PATH is required")?;
    let backend = Arc::new(LocalBackend::start(&model, opts)?);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(baton_api::serve(backend, cfg, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }))?;
    Ok(())
}
