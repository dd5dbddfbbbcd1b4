//! One description of a decoder's shape (dense, mixture-of-experts, multi-head latent attention),
//! whichever file format it came from.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

/// The families baton runs. Llama covers Llama 2/3.x, SmolLM and Mistral (same graph); the MoE
/// families are their dense relatives with a routed feed-forward; DeepSeek-V3 (also R1, Kimi K2)
/// adds multi-head latent attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    DeepseekV3,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::DeepseekV3 => "deepseek_v3",
        }
    }

    /// Q/K/V projections carry biases (the qwen2 graph).
    fn qkv_bias(self) -> bool {
        matches!(self, Family::Qwen2 | Family::Qwen2Moe)
    }

    /// Per-head RMS norm on Q and K (the qwen3 graph).
    fn qk_norm(self) -> bool {
        matches!(self, Family::Qwen3 | Family::Qwen3Moe)
    }

    /// Maps an architecture name (GGUF `general.architecture` or HF `model_type`) to a family.
    pub fn from_arch(arch: &str) -> Result<Self> {
        match arch {
            "llama" | "mistral" => Ok(Family::Llama),
            "qwen2" => Ok(Family::Qwen2),
            "qwen3" => Ok(Family::Qwen3),
            "mixtral" => Ok(Family::Mixtral),
            "qwen2_moe" | "qwen2moe" => Ok(Family::Qwen2Moe),
            "qwen3_moe" | "qwen3moe" => Ok(Family::Qwen3Moe),
            // llama.cpp names the DeepSeek-V2/V3 graph `deepseek2`; Kimi K2 is the V3 graph.
            "deepseek_v3" | "deepseek2" | "kimi_k2" => Ok(Family::DeepseekV3),
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

/// YaRN context extension (DeepSeek-V3): blended inverse frequencies plus an attention-scale
/// ("mscale") correction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct YarnScaling {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Scales cos/sin (with `mscale_all_dim`, see [`ModelConfig::rope_attention_factor`]).
    pub mscale: f64,
    /// Scales the softmax: `mscale(factor, mscale_all_dim)²`.
    pub mscale_all_dim: f64,
}

/// `0.1 · m · ln(s) + 1`, transformers' and llama.cpp's YaRN magnitude correction.
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// Per-frequency divisors of the rotary base frequencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Computed from Llama 3 parameters (HF checkpoints).
    Llama3(Llama3RopeScaling),
    /// Read from a file (GGUF's `rope_freqs.weight`, which llama.cpp precomputes for Llama 3).
    Factors(Vec<f32>),
    Yarn(YarnScaling),
}

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertScoring {
    /// Softmax over all experts (Mixtral, Qwen-MoE).
    Softmax,
    /// Independent sigmoids (DeepSeek-V3).
    Sigmoid,
}

/// The routed feed-forward of a mixture-of-experts model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub n_experts: usize,
    /// Experts each token is routed to (top-k).
    pub n_experts_used: usize,
    /// Intermediate size of one routed expert.
    pub expert_ff: usize,
    pub scoring: ExpertScoring,
    /// Renormalise the chosen experts' scores to sum to one.
    pub norm_topk_prob: bool,
    /// Multiplies the routed experts' weights (DeepSeek-V3: 2.5).
    pub routed_scaling: f64,
    /// Experts form `n_group` groups, of which only the best `topk_group` may be chosen
    /// (1 and 1 when routing is not group-limited).
    pub n_group: usize,
    pub topk_group: usize,
    /// A per-expert bias added to the scores for selection only (`e_score_correction_bias`).
    pub score_bias: bool,
    /// Intermediate size of the always-active shared expert(s), 0 for none.
    pub shared_ff: usize,
    /// The shared expert's output is gated by `sigmoid(x · w)` (Qwen2-MoE).
    pub shared_gate: bool,
    /// The first layers keep a dense MLP (`first_k_dense_replace`).
    pub first_dense: usize,
    /// Every `sparse_step`-th layer is MoE (Qwen's `decoder_sparse_step`).
    pub sparse_step: usize,
    /// Further layers with a dense MLP (Qwen's `mlp_only_layers`).
    pub dense_layers: Vec<usize>,
}

impl MoeConfig {
    /// Whether layer `i` routes its feed-forward through experts.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        i >= self.first_dense && (i + 1).is_multiple_of(self.sparse_step.max(1)) && !self.dense_layers.contains(&i)
    }
}

/// Multi-head latent attention (DeepSeek-V2/V3): keys and values are projected up from a
/// per-token latent, which is all the cache holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlaConfig {
    /// Rank of the query compression; `None` projects queries directly (DeepSeek-V2-Lite).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

impl MlaConfig {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values cached per token per layer: the latent and the shared rotary key.
    pub fn cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
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
    /// The routed feed-forward, for mixture-of-experts families.
    pub moe: Option<MoeConfig>,
    /// Latent attention (DeepSeek); `head_dim` is then the rotary part of a head.
    pub mla: Option<MlaConfig>,
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
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} attention heads cannot be shared by {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} must be even and non-zero", self.head_dim));
        }
        if let Some(moe) = &self.moe {
            if moe.n_experts == 0
                || moe.n_experts_used == 0
                || moe.n_experts_used > moe.n_experts
                || moe.expert_ff == 0
                || moe.n_group == 0
                || !moe.n_experts.is_multiple_of(moe.n_group)
                || moe.topk_group == 0
                || moe.topk_group > moe.n_group
                || moe.n_experts_used > moe.topk_group * (moe.n_experts / moe.n_group)
            {
                return bad(format!(
                    "mixture of experts: {} of {} experts per token (intermediate {}) in {} groups, {} used, is not a valid routing",
                    moe.n_experts_used, moe.n_experts, moe.expert_ff, moe.n_group, moe.topk_group
                ));
            }
        }
        if let Some(mla) = &self.mla {
            if mla.kv_lora_rank == 0 || mla.v_head_dim == 0 || mla.qk_rope_head_dim != self.head_dim {
                return bad(format!(
                    "latent attention: kv_lora_rank {}, v_head_dim {}, rotary dims {} (head_dim {})",
                    mla.kv_lora_rank, mla.v_head_dim, mla.qk_rope_head_dim, self.head_dim
                ));
            }
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
        let missing = |key: &str| ModelError::Config(format!("{}: `{key}` is missing for {}", path.display(), raw.model_type));
        let mla = if family == Family::DeepseekV3 {
            Some(MlaConfig {
                q_lora_rank: raw.q_lora_rank,
                kv_lora_rank: raw.kv_lora_rank.ok_or_else(|| missing("kv_lora_rank"))?,
                qk_nope_head_dim: raw.qk_nope_head_dim.ok_or_else(|| missing("qk_nope_head_dim"))?,
                qk_rope_head_dim: raw.qk_rope_head_dim.ok_or_else(|| missing("qk_rope_head_dim"))?,
                v_head_dim: raw.v_head_dim.ok_or_else(|| missing("v_head_dim"))?,
            })
        } else {
            None
        };
        let head_dim = match &mla {
            Some(m) => m.qk_rope_head_dim,
            None => raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
        };
        let moe = raw.moe_config(family).map_err(missing)?;
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
                Some("yarn") => {
                    let mscale_all_dim = s.mscale_all_dim.unwrap_or(0.0);
                    Some(RopeScaling::Yarn(YarnScaling {
                        factor: s.factor.unwrap_or(1.0),
                        original_max_position_embeddings: s
                            .original_max_position_embeddings
                            .or(raw.max_position_embeddings.map(|m| m as f64))
                            .unwrap_or(4096.0),
                        beta_fast: s.beta_fast.unwrap_or(32.0),
                        beta_slow: s.beta_slow.unwrap_or(1.0),
                        mscale: s.mscale.unwrap_or(1.0),
                        mscale_all_dim,
                    }))
                }
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
            // DeepSeek-V3 checkpoints rotate adjacent pairs of the rotary part (`rope_interleave`).
            rope_style: if family == Family::DeepseekV3 && raw.rope_interleave.unwrap_or(true) {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Halves
            },
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: family.qkv_bias() || raw.attention_bias.unwrap_or(false),
            qk_norm: family.qk_norm(),
            context_length: raw.max_position_embeddings.unwrap_or(4096),
            moe,
            mla,
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
        let key = |k: &str| format!("{arch}.{k}");
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            md.get(&key(k)).map(|v| value_usize(v).ok_or_else(|| bad_meta(path, &key(k)))).transpose()
        };
        let opt_f64 = |k: &str| -> Result<Option<f64>> {
            md.get(&key(k)).map(|v| value_f64(v).ok_or_else(|| bad_meta(path, &key(k)))).transpose()
        };
        let opt_bool = |k: &str| -> Result<Option<bool>> {
            match md.get(&key(k)) {
                None => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(bad_meta(path, &key(k))),
            }
        };
        let n_experts = opt_usize("expert_count")?.unwrap_or(0);
        let family = match Family::from_arch(&arch)? {
            // Mixtral is llama.cpp's `llama` architecture with experts.
            Family::Llama if n_experts > 0 => Family::Mixtral,
            f => f,
        };
        let hidden_size = gguf_usize(path, md, &key("embedding_length"))?;
        let n_heads = gguf_usize(path, md, &key("attention.head_count"))?;
        let mla = if family == Family::DeepseekV3 {
            let rope = gguf_usize(path, md, &key("rope.dimension_count"))?;
            // Newer conversions store the latent (absorbed) key/value widths in key_length /
            // value_length and the per-head ones in *_mla; older ones only the per-head ones.
            let (qk, v) = match opt_usize("attention.key_length_mla")? {
                Some(qk) => (qk, gguf_usize(path, md, &key("attention.value_length_mla"))?),
                None => (
                    gguf_usize(path, md, &key("attention.key_length"))?,
                    gguf_usize(path, md, &key("attention.value_length"))?,
                ),
            };
            Some(MlaConfig {
                q_lora_rank: opt_usize("attention.q_lora_rank")?,
                kv_lora_rank: gguf_usize(path, md, &key("attention.kv_lora_rank"))?,
                qk_nope_head_dim: qk.checked_sub(rope).ok_or_else(|| bad_meta(path, &key("rope.dimension_count")))?,
                qk_rope_head_dim: rope,
                v_head_dim: v,
            })
        } else {
            None
        };
        let head_dim = match (&mla, md.get(&key("attention.key_length"))) {
            (Some(m), _) => m.qk_rope_head_dim,
            (None, Some(v)) => value_usize(v).ok_or_else(|| bad_meta(path, &key("attention.key_length")))?,
            (None, None) => hidden_size / n_heads.max(1),
        };
        let moe = if n_experts == 0 {
            None
        } else {
            let deepseek = family == Family::DeepseekV3;
            let expert_ff = match opt_usize("expert_feed_forward_length")? {
                Some(f) => f,
                None => gguf_usize(path, md, &key("feed_forward_length"))?,
            };
            Some(MoeConfig {
                n_experts,
                n_experts_used: gguf_usize(path, md, &key("expert_used_count"))?,
                expert_ff,
                // llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE: 1 softmax, 2 sigmoid.
                scoring: match opt_usize("expert_gating_func")? {
                    Some(2) => ExpertScoring::Sigmoid,
                    _ => ExpertScoring::Softmax,
                },
                // llama.cpp renormalises for llama (Mixtral) and qwen3moe, not for qwen2moe, and
                // reads the flag for deepseek2.
                norm_topk_prob: match family {
                    Family::DeepseekV3 => opt_bool("expert_weights_norm")?.unwrap_or(false),
                    Family::Qwen2Moe => false,
                    _ => true,
                },
                routed_scaling: opt_f64("expert_weights_scale")?.unwrap_or(1.0),
                n_group: opt_usize("expert_group_count")?.unwrap_or(1).max(1),
                topk_group: opt_usize("expert_group_used_count")?.unwrap_or(1).max(1),
                score_bias: has_tensor(&format!("blk.{}.exp_probs_b.bias", opt_usize("leading_dense_block_count")?.unwrap_or(0))),
                shared_ff: if deepseek {
                    opt_usize("expert_shared_count")?.unwrap_or(0) * expert_ff
                } else {
                    opt_usize("expert_shared_feed_forward_length")?.unwrap_or(0)
                },
                shared_gate: family == Family::Qwen2Moe,
                first_dense: opt_usize("leading_dense_block_count")?.unwrap_or(0),
                sparse_step: 1,
                dense_layers: Vec::new(),
            })
        };
        let rope_scaling = match md.get(&key("rope.scaling.type")) {
            Some(Value::String(t)) if t == "yarn" => {
                // llama.cpp stores 0.1·mscale_all_dim and cancels the cos/sin correction, which
                // equals transformers when mscale == mscale_all_dim (as in DeepSeek-V3's config).
                let mscale_all_dim = opt_f64("rope.scaling.yarn_log_multiplier")?.unwrap_or(0.0) / 0.1;
                Some(RopeScaling::Yarn(YarnScaling {
                    factor: gguf_f64(path, md, &key("rope.scaling.factor"))?,
                    original_max_position_embeddings: gguf_f64(path, md, &key("rope.scaling.original_context_length"))?,
                    beta_fast: opt_f64("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                    beta_slow: opt_f64("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
                    mscale: mscale_all_dim,
                    mscale_all_dim,
                }))
            }
            _ => rope_freqs.map(RopeScaling::Factors),
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
            rope_scaling,
            // llama.cpp permutes Q/K of its "llama" architecture for its interleaved rope;
            // qwen2/qwen3 are converted unpermuted and run with neox (halves) rope; deepseek2 is
            // unpermuted and interleaved, like the HF checkpoint.
            rope_style: match family {
                Family::Llama | Family::Mixtral | Family::DeepseekV3 => RopeStyle::Interleaved,
                Family::Qwen2 | Family::Qwen3 | Family::Qwen2Moe | Family::Qwen3Moe => RopeStyle::Halves,
            },
            tie_word_embeddings: !has_tensor("output.weight"),
            attention_bias: has_tensor("blk.0.attn_q.bias"),
            qk_norm: has_tensor("blk.0.attn_q_norm.weight"),
            context_length: match md.get(&key("context_length")) {
                Some(v) => value_usize(v).ok_or_else(|| bad_meta(path, &key("context_length")))?,
                None => 4096,
            },
            moe,
            mla,
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
            Some(RopeScaling::Yarn(y)) => {
                // Transformers' `_compute_yarn_parameters` (truncated correction range).
                let dim = d as f64;
                let corr = |rot: f64| {
                    dim * (y.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * self.rope_theta.ln())
                };
                let low = corr(y.beta_fast).floor().max(0.0);
                let high = corr(y.beta_slow).ceil().min(dim - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                base.iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (f / y.factor * (1.0 - extrapolation) + f * extrapolation) as f32
                    })
                    .collect()
            }
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

    /// Factor on the rotary cos/sin tables (YaRN's `mscale / mscale_all_dim` correction).
    pub fn rope_attention_factor(&self) -> f64 {
        match &self.rope_scaling {
            Some(RopeScaling::Yarn(y)) => yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim),
            _ => 1.0,
        }
    }

    /// Softmax scale of attention: `1/sqrt(qk head dim)`, times YaRN's `mscale²` under MLA.
    pub fn attention_scale(&self) -> f64 {
        match &self.mla {
            None => 1.0 / (self.head_dim as f64).sqrt(),
            Some(mla) => {
                let m = match &self.rope_scaling {
                    Some(RopeScaling::Yarn(y)) if y.mscale_all_dim != 0.0 => yarn_mscale(y.factor, y.mscale_all_dim),
                    _ => 1.0,
                };
                m * m / (mla.qk_head_dim() as f64).sqrt()
            }
        }
    }

    /// KV-cache bytes for one token in one layer at `dtype_size` bytes per element: K and V of
    /// every KV head, or under MLA the latent plus the shared rotary key.
    pub fn kv_bytes_per_token_layer(&self, dtype_size: usize) -> u64 {
        match &self.mla {
            Some(mla) => (mla.cache_width() * dtype_size) as u64,
            None => (2 * self.n_kv_heads * self.head_dim * dtype_size) as u64,
        }
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
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
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
    // Mixture of experts (names differ per family).
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    n_routed_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    routed_scaling_factor: Option<f64>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    n_shared_experts: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    first_k_dense_replace: Option<usize>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    scoring_func: Option<String>,
    // Multi-head latent attention.
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    rope_interleave: Option<bool>,
}

impl HfConfig {
    /// The routed feed-forward with each family's transformers defaults; `Err` names a missing key.
    fn moe_config(&self, family: Family) -> std::result::Result<Option<MoeConfig>, &'static str> {
        let used = || self.num_experts_per_tok.ok_or("num_experts_per_tok");
        let moe_ff = || self.moe_intermediate_size.ok_or("moe_intermediate_size");
        let base = |n_experts: usize, expert_ff: usize, used: usize| MoeConfig {
            n_experts,
            n_experts_used: used,
            expert_ff,
            scoring: ExpertScoring::Softmax,
            norm_topk_prob: false,
            routed_scaling: 1.0,
            n_group: 1,
            topk_group: 1,
            score_bias: false,
            shared_ff: 0,
            shared_gate: false,
            first_dense: 0,
            sparse_step: 1,
            dense_layers: Vec::new(),
        };
        Ok(match family {
            Family::Llama | Family::Qwen2 | Family::Qwen3 => None,
            Family::Mixtral => Some(MoeConfig {
                norm_topk_prob: true,
                ..base(self.num_local_experts.ok_or("num_local_experts")?, self.intermediate_size, used()?)
            }),
            Family::Qwen2Moe | Family::Qwen3Moe => Some(MoeConfig {
                norm_topk_prob: self.norm_topk_prob.unwrap_or(false),
                shared_ff: if family == Family::Qwen2Moe {
                    self.shared_expert_intermediate_size.unwrap_or(0)
                } else {
                    0
                },
                shared_gate: family == Family::Qwen2Moe,
                sparse_step: self.decoder_sparse_step.unwrap_or(1),
                dense_layers: self.mlp_only_layers.clone().unwrap_or_default(),
                ..base(self.num_experts.ok_or("num_experts")?, moe_ff()?, used()?)
            }),
            Family::DeepseekV3 => Some(MoeConfig {
                scoring: match self.scoring_func.as_deref() {
                    Some("softmax") => ExpertScoring::Softmax,
                    _ => ExpertScoring::Sigmoid,
                },
                norm_topk_prob: self.norm_topk_prob.unwrap_or(true),
                routed_scaling: self.routed_scaling_factor.unwrap_or(2.5),
                n_group: self.n_group.unwrap_or(8),
                topk_group: self.topk_group.unwrap_or(4),
                score_bias: true,
                shared_ff: self.n_shared_experts.unwrap_or(1) * moe_ff()?,
                first_dense: self.first_k_dense_replace.unwrap_or(3),
                ..base(self.n_routed_experts.ok_or("n_routed_experts")?, moe_ff()?, used()?)
            }),
        })
    }
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
