//! One description of a dense decoder's shape, whichever file format it came from.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

/// The families baton runs. Llama covers Llama 2/3.x, SmolLM and Mistral (same graph).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// Maps an architecture name (GGUF `general.architecture` or HF `model_type`) to a family.
    pub fn from_arch(arch: &str) -> Result<Self> {
        match arch {
            "llama" | "mistral" => Ok(Family::Llama),
            "qwen2" => Ok(Family::Qwen2),
            "qwen3" => Ok(Family::Qwen3),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Pairs (i, i + d/2): HF checkpoints, and llama.cpp's "neox" models (qwen2, qwen3).
    Halves,
    /// Pairs (2i, 2i + 1): llama.cpp permutes the Q/K rows of llama-family GGUFs to this layout.
    Interleaved,
}

/// Llama 3.x frequency-dependent rope scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Per-frequency divisors of the rotary base frequencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Computed from Llama 3 parameters (HF checkpoints).
    Llama3(Llama3RopeScaling),
    /// Read from a file (GGUF's `rope_freqs.weight`, which llama.cpp precomputes for Llama 3).
    Factors(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    /// The architecture name as the file spells it.
    pub arch_name: String,
    pub n_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rope_style: RopeStyle,
    pub tie_word_embeddings: bool,
    /// Q/K/V projections carry a bias (qwen2, some llama variants).
    pub attention_bias: bool,
    /// Per-head RMS norm on Q and K before rope (qwen3).
    pub qk_norm: bool,
    pub context_length: usize,
}

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(ModelError::Config(what));
        if self.n_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad(format!(
                "layers ({}), hidden size ({}) and vocabulary ({}) must be non-zero",
                self.n_layers, self.hidden_size, self.vocab_size
            ));
        }
        if self.n_heads == 0 || self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "{} attention heads cannot be shared by {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad(format!("head dimension {} must be even and non-zero", self.head_dim));
        }
        if let Some(RopeScaling::Factors(f)) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return bad(format!(
                    "rope_freqs has {} factors, expected head_dim/2 = {}",
                    f.len(),
                    self.head_dim / 2
                ));
            }
        }
        Ok(())
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::Format {
            path: path.to_path_buf(),
            format: "config.json",
            reason: e.to_string(),
        })?;
        let family = Family::from_arch(&raw.model_type)?;
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let rope_scaling = match raw.rope_scaling {
            None => None,
            Some(s) => match s.rope_type.as_deref().or(s.r#type.as_deref()) {
                Some("llama3") => Some(RopeScaling::Llama3(Llama3RopeScaling {
                    factor: s.factor.unwrap_or(1.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192.0),
                })),
                Some("default") | None => None,
                Some(other) => {
                    return Err(ModelError::Config(format!(
                        "{}: rope scaling type `{other}` is not supported for {}",
                        path.display(),
                        raw.model_type
                    )))
                }
            },
        };
        let cfg = ModelConfig {
            family,
            arch_name: raw.model_type.clone(),
            n_layers: raw.num_hidden_layers,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            n_heads: raw.num_attention_heads,
            n_kv_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rope_style: RopeStyle::Halves,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: family == Family::Qwen2 || raw.attention_bias.unwrap_or(false),
            qk_norm: family == Family::Qwen3,
            context_length: raw.max_position_embeddings.unwrap_or(4096),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads llama.cpp GGUF metadata. `has_tensor` tells which optional tensors the file holds
    /// (biases, the output matrix), since llama.cpp records those by presence, not by key.
    pub fn from_gguf(
        path: &Path,
        md: &HashMap<String, Value>,
        has_tensor: &dyn Fn(&str) -> bool,
        rope_freqs: Option<Vec<f32>>,
    ) -> Result<Self> {
        let arch = gguf_str(path, md, "general.architecture")?;
        let family = Family::from_arch(&arch)?;
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = gguf_usize(path, md, &key("embedding_length"))?;
        let n_heads = gguf_usize(path, md, &key("attention.head_count"))?;
        let head_dim = match md.get(&key("attention.key_length")) {
            Some(v) => value_usize(v).ok_or_else(|| bad_meta(path, &key("attention.key_length")))?,
            None => hidden_size / n_heads.max(1),
        };
        let vocab_size = match md.get(&key("vocab_size")) {
            Some(v) => value_usize(v).ok_or_else(|| bad_meta(path, &key("vocab_size")))?,
            None => match md.get("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => tokens.len(),
                _ => {
                    return Err(ModelError::MissingMetadata {
                        path: path.to_path_buf(),
                        key: key("vocab_size"),
                    })
                }
            },
        };
        let cfg = ModelConfig {
            family,
            arch_name: arch.clone(),
            n_layers: gguf_usize(path, md, &key("block_count"))?,
            hidden_size,
            intermediate_size: gguf_usize(path, md, &key("feed_forward_length"))?,
            n_heads,
            n_kv_heads: match md.get(&key("attention.head_count_kv")) {
                Some(v) => value_usize(v).ok_or_else(|| bad_meta(path, &key("attention.head_count_kv")))?,
                None => n_heads,
            },
            head_dim,
            vocab_size,
            rms_norm_eps: gguf_f64(path, md, &key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: match md.get(&key("rope.freq_base")) {
                Some(v) => value_f64(v).ok_or_else(|| bad_meta(path, &key("rope.freq_base")))?,
                None => 10_000.0,
            },
            rope_scaling: rope_freqs.map(RopeScaling::Factors),
            // llama.cpp permutes Q/K of its "llama" architecture for its interleaved rope;
            // qwen2/qwen3 are converted unpermuted and run with neox (halves) rope.
            rope_style: match family {
                Family::Llama => RopeStyle::Interleaved,
                Family::Qwen2 | Family::Qwen3 => RopeStyle::Halves,
            },
            tie_word_embeddings: !has_tensor("output.weight"),
            attention_bias: has_tensor("blk.0.attn_q.bias"),
            qk_norm: has_tensor("blk.0.attn_q_norm.weight"),
            context_length: match md.get(&key("context_length")) {
                Some(v) => value_usize(v).ok_or_else(|| bad_meta(path, &key("context_length")))?,
                None => 4096,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Per-frequency inverse rotary frequencies, after any scaling.
    pub fn rope_inv_freqs(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        match &self.rope_scaling {
            None => base.iter().map(|&f| f as f32).collect(),
            Some(RopeScaling::Factors(factors)) => base
                .iter()
                .zip(factors)
                .map(|(&f, &s)| (f / s as f64) as f32)
                .collect(),
            Some(RopeScaling::Llama3(s)) => {
                // Transformers' `_compute_llama3_parameters`, in the same order of operations.
                let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / s.factor } else { f };
                        let smooth = (s.original_max_position_embeddings / wavelen
                            - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        let smoothed = (1.0 - smooth) * scaled / s.factor + smooth * scaled;
                        let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                        (if medium { smoothed } else { scaled }) as f32
                    })
                    .collect()
            }
        }
    }

    /// KV-cache bytes for one token in one layer at `dtype_size` bytes per element.
    pub fn kv_bytes_per_token_layer(&self, dtype_size: usize) -> u64 {
        (2 * self.n_kv_heads * self.head_dim * dtype_size) as u64
    }
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    r#type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    max_position_embeddings: Option<usize>,
}

fn bad_meta(path: &Path, key: &str) -> ModelError {
    ModelError::Format {
        path: path.to_path_buf(),
        format: "GGUF",
        reason: format!("metadata `{key}` has an unexpected type"),
    }
}

pub(crate) fn value_usize(v: &Value) -> Option<usize> {
    match v {
        Value::U8(x) => Some(*x as usize),
        Value::U16(x) => Some(*x as usize),
        Value::U32(x) => Some(*x as usize),
        Value::U64(x) => usize::try_from(*x).ok(),
        Value::I8(x) => usize::try_from(*x).ok(),
        Value::I16(x) => usize::try_from(*x).ok(),
        Value::I32(x) => usize::try_from(*x).ok(),
        Value::I64(x) => usize::try_from(*x).ok(),
        _ => None,
    }
}

fn value_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        other => value_usize(other).map(|x| x as f64),
    }
}

fn gguf_usize(path: &Path, md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    let v = md.get(key).ok_or_else(|| ModelError::MissingMetadata {
        path: path.to_path_buf(),
        key: key.to_string(),
    })?;
    value_usize(v).ok_or_else(|| bad_meta(path, key))
}

fn gguf_f64(path: &Path, md: &HashMap<String, Value>, key: &str) -> Result<f64> {
    let v = md.get(key).ok_or_else(|| ModelError::MissingMetadata {
        path: path.to_path_buf(),
        key: key.to_string(),
    })?;
    value_f64(v).ok_or_else(|| bad_meta(path, key))
}

pub(crate) fn gguf_str(path: &Path, md: &HashMap<String, Value>, key: &str) -> Result<String> {
    match md.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad_meta(path, key)),
        None => Err(ModelError::MissingMetadata {
            path: path.to_path_buf(),
            key: key.to_string(),
        }),
    }
}
