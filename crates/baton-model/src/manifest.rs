//! What a model costs, per layer, read from file headers alone: the placement planner's input.

use serde::{Deserialize, Serialize};

/// A model's memory and compute shape, built without reading any weight data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Family as baton runs it: `llama`, `qwen2`, `qwen3`, `deepseek_v3`, ...
    pub architecture: String,
    /// The model's own name, where the file gives one.
    pub name: Option<String>,
    /// `gguf` or `safetensors`.
    pub format: String,
    pub n_layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Longest context the model was trained for.
    pub context_length: usize,
    /// Weight bytes of each transformer layer, as stored (quantized bytes stay quantized).
    pub layer_bytes: Vec<u64>,
    /// Token embedding bytes (held by the first stage).
    pub embedding_bytes: u64,
    /// Final norm + output projection bytes (held by the last stage). With tied embeddings the
    /// last stage holds its own copy of the embedding matrix, and it is counted here.
    pub head_bytes: u64,
    /// KV-cache bytes one token occupies in each layer, at the cache dtype.
    pub kv_bytes_per_token: Vec<u64>,
    /// Cache dtype the KV figures assume (`f32`, `bf16`, `f16`).
    pub kv_dtype: String,
    /// Bytes of one token's hidden state between stages at f32 (scale for other wire dtypes).
    pub activation_bytes_per_token: u64,
    /// Bytes per tensor storage type (`q4_k`, `f32`, `bf16`, ...), all tensors.
    pub bytes_by_dtype: std::collections::BTreeMap<String, u64>,
}

impl Manifest {
    pub fn total_weight_bytes(&self) -> u64 {
        self.layer_bytes.iter().sum::<u64>() + self.embedding_bytes + self.head_bytes
    }

    /// Weight bytes of a stage holding layers `[start, end)` of `n_layers`.
    pub fn stage_weight_bytes(&self, start: usize, end: usize) -> u64 {
        let mut bytes: u64 = self.layer_bytes[start..end].iter().sum();
        if start == 0 {
            bytes += self.embedding_bytes;
        }
        if end == self.n_layers {
            bytes += self.head_bytes;
        }
        bytes
    }

    /// KV-cache bytes of layers `[start, end)` for `tokens` cached tokens.
    pub fn stage_kv_bytes(&self, start: usize, end: usize, tokens: u64) -> u64 {
        self.kv_bytes_per_token[start..end].iter().sum::<u64>() * tokens
    }
}
