//! baton-model: a transformer as contiguous layer ranges ("shards") that, chained, compute exactly
//! what the unsplit model computes.
//!
//! - [`config`]: one description of a model's shape, read from GGUF metadata or HF `config.json`.
//! - [`weights`]: where tensors live (GGUF, split GGUF sets, safetensors) and reading only a range's.
//! - [`manifest`]: per-layer byte and KV costs from headers alone, for the placement planner.
//! - [`manifests`]: manifests of published models too large to have here (DeepSeek-V3 671B Q4_K_M).
//! - [`matmul`]: `x @ W^T` for weights as stored, with f32 activations for the legacy block
//!   formats on the CPU (candle rounds them to 8 bits).
//! - [`layers`]: shared building blocks (linear, attention, MLP, rotary embedding).
//! - [`mla`]: DeepSeek's multi-head latent attention over a compressed latent cache.
//! - [`moe`]: mixture-of-experts feed-forward (router, grouped expert compute, shared experts).
//! - [`profile`]: opt-in timing of attention, routing and experts.
//! - [`kv_cache`]: the per-sequence KV cache a shard owns.
//! - [`shard`]: a layer range and its micro-batch forward.
//! - [`sampling`], [`tokenizer`], [`chat`]: turning logits into tokens and text into prompts.
//! - [`loader`]: one entry point that opens a model path of any supported format.
//! - [`pipeline`]: shards chained in one process through the wire dtype.
//! - [`generation`]: the prefill/decode loop over a pipeline.

pub mod chat;
pub mod generation;
pub mod config;
pub mod error;
pub mod kv_cache;
pub mod layers;
pub mod loader;
pub mod manifest;
pub mod manifests;
pub mod matmul;
pub mod mla;
pub mod moe;
pub mod pipeline;
pub mod profile;
pub mod sampling;
pub mod shard;
pub mod tokenizer;
pub mod weights;

pub use error::{ModelError, Result};
