//! baton-model: a transformer as contiguous layer ranges ("shards") that, chained, compute exactly
//! what the unsplit model computes.
//!
//! - [`config`]: one description of a model's shape, read from GGUF metadata or HF `config.json`.
//! - [`weights`]: where tensors live (GGUF, split GGUF sets, safetensors) and reading only a range's.
//! - [`manifest`]: per-layer byte and KV costs from headers alone, for the placement planner.
//! - [`layers`]: shared building blocks (linear, attention, MLP, rotary embedding).
//! - [`kv_cache`]: the per-sequence KV cache a shard owns.
//! - [`shard`]: a layer range and its micro-batch forward.
//! - [`sampling`], [`tokenizer`], [`chat`]: turning logits into tokens and text into prompts.
//! - [`loader`]: one entry point that opens a model path of any supported format.

pub mod chat;
pub mod config;
pub mod error;
pub mod kv_cache;
pub mod layers;
pub mod loader;
pub mod manifest;
pub mod sampling;
pub mod shard;
pub mod tokenizer;
pub mod weights;

pub use error::{ModelError, Result};
