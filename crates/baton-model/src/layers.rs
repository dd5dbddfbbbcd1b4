//! Building blocks shared by the families: linear layers over quantized or dense weights,
//! RMS norm, rotary embedding at per-token positions, grouped-query attention over a
//! micro-batch of sequences, the gated MLP, and the decoder layer that combines them with the
//! latent attention of [`crate::mla`] and the experts of [`crate::moe`].

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::RmsNorm;

use crate::config::{ModelConfig, RopeStyle};
use crate::kv_cache::SeqKv;
use crate::matmul::Matmul;
use crate::mla::MlaAttention;
use crate::moe::MoeBlock;
use crate::profile::{self, Phase};
use crate::weights::TensorStore;
use crate::Result;

/// Tensor names in the file's own convention (llama.cpp's for GGUF, HF's for safetensors).
#[derive(Debug, Clone, Copy)]
pub struct Names {
    gguf: bool,
}

impl Names {
    pub fn for_store(store: &TensorStore) -> Self {
        Self {
            gguf: store.gguf().is_some(),
        }
    }

    pub fn is_gguf(&self) -> bool {
        self.gguf
    }

    pub fn embedding(&self) -> &'static str {
        if self.gguf { "token_embd.weight" } else { "model.embed_tokens.weight" }
    }

    pub fn output_norm(&self) -> &'static str {
        if self.gguf { "output_norm.weight" } else { "model.norm.weight" }
    }

    pub fn output(&self) -> &'static str {
        if self.gguf { "output.weight" } else { "lm_head.weight" }
    }

    /// Prefix of every tensor of layer `i`, including the trailing dot.
    pub fn layer_prefix(&self, i: usize) -> String {
        if self.gguf { format!("blk.{i}.") } else { format!("model.layers.{i}.") }
    }

    /// Name of a layer tensor; `role` is the llama.cpp role (`attn_q`, `ffn_down`, ...).
    pub fn layer(&self, i: usize, role: &str, suffix: &str) -> String {
        if self.gguf {
            return format!("blk.{i}.{role}.{suffix}");
        }
        let hf = match role {
            "attn_norm" => "input_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            "ffn_norm" => "post_attention_layernorm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            "attn_q_a" => "self_attn.q_a_proj",
            "attn_q_a_norm" => "self_attn.q_a_layernorm",
            "attn_q_b" => "self_attn.q_b_proj",
            "attn_kv_a_mqa" => "self_attn.kv_a_proj_with_mqa",
            "attn_kv_a_norm" => "self_attn.kv_a_layernorm",
            "attn_kv_b" => "self_attn.kv_b_proj",
            other => other,
        };
        format!("model.layers.{i}.{hf}.{suffix}")
    }
}

/// `x @ W^T + b` with W quantized or dense.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Matmul,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(
        store: &TensorStore,
        weight: &str,
        bias: Option<&str>,
        out_in: (usize, usize),
        device: &Device,
    ) -> Result<Self> {
        let (out_dim, in_dim) = out_in;
        let weight = store.matmul(weight, &[out_dim, in_dim], device)?;
        let bias = bias
            .map(|b| store.dense(b, &[out_dim], device))
            .transpose()?;
        Ok(Self { weight, bias })
    }

    pub fn from_parts(weight: Matmul, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

pub fn rms_norm(store: &TensorStore, name: &str, dim: usize, eps: f64, device: &Device) -> Result<RmsNorm> {
    Ok(RmsNorm::new(store.dense(name, &[dim], device)?, eps))
}

/// Rotary embedding evaluated at arbitrary per-token positions, so tokens of different
/// sequences at different offsets share one kernel call.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Tensor,
    style: RopeStyle,
    /// YaRN's magnitude correction of cos/sin; 1 otherwise.
    attention_factor: f64,
}

impl Rotary {
    pub fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let inv = cfg.rope_inv_freqs();
        let n = inv.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, (1, n), device)?,
            style: cfg.rope_style,
            attention_factor: cfg.rope_attention_factor(),
        })
    }

    /// cos and sin tables `[T, d/2]` for the given positions.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(1)?;
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        if self.attention_factor == 1.0 {
            return Ok((cos, sin));
        }
        Ok(((cos * self.attention_factor)?, (sin * self.attention_factor)?))
    }

    /// Applies the rotation to `x` of shape `[1, heads, T, d]`.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(match self.style {
            RopeStyle::Halves => candle_nn::rotary_emb::rope(&x, cos, sin)?,
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
        })
    }
}

/// Where each sequence's tokens sit in a micro-batch: rows `[offset, offset + len)` of the
/// batch tensor, at positions `[start_pos, start_pos + len)` of that sequence.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan {
    pub offset: usize,
    pub len: usize,
    pub start_pos: usize,
}

/// Grouped-query self-attention with optional Q/K/V bias (qwen2) and Q/K norm (qwen3).
#[derive(Debug, Clone)]
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    pub fn load(store: &TensorStore, names: Names, cfg: &ModelConfig, i: usize, device: &Device) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let q_out = cfg.n_heads * hd;
        let kv_out = cfg.n_kv_heads * hd;
        let bias = |role: &str| cfg.attention_bias.then(|| names.layer(i, role, "bias"));
        let proj = |role: &str, out: usize, inp: usize, with_bias: bool| {
            let b = if with_bias { bias(role) } else { None };
            Linear::load(store, &names.layer(i, role, "weight"), b.as_deref(), (out, inp), device)
        };
        let norm = |role: &str| rms_norm(store, &names.layer(i, role, "weight"), hd, cfg.rms_norm_eps, device);
        Ok(Self {
            q: proj("attn_q", q_out, h, true)?,
            k: proj("attn_k", kv_out, h, true)?,
            v: proj("attn_v", kv_out, h, true)?,
            o: proj("attn_output", h, q_out, false)?,
            q_norm: cfg.qk_norm.then(|| norm("attn_q_norm")).transpose()?,
            k_norm: cfg.qk_norm.then(|| norm("attn_k_norm")).transpose()?,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: hd,
            scale: cfg.attention_scale(),
        })
    }

    /// `x`: `[T, hidden]` for all tokens of the micro-batch; `caches[s]` is the cache of
    /// `spans[s]`'s sequence for this layer.
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        cos: &Tensor,
        sin: &Tensor,
        spans: &[SeqSpan],
        caches: &mut [&mut SeqKv],
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let hd = self.head_dim;
        let heads = |y: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let y = y.reshape((t, n, hd))?;
            let y = match norm {
                Some(norm) => norm.forward(&y)?,
                None => y,
            };
            // [1, heads, T, d]: one "batch" whose time axis holds every token of the micro-batch.
            Ok(y.transpose(0, 1)?.unsqueeze(0)?)
        };
        let q = heads(self.q.forward(x)?, self.n_heads, &self.q_norm)?;
        let k = heads(self.k.forward(x)?, self.n_kv_heads, &self.k_norm)?;
        let v = heads(self.v.forward(x)?, self.n_kv_heads, &None)?.contiguous()?;
        let q = rotary.apply(&q, cos, sin)?;
        let k = rotary.apply(&k, cos, sin)?;

        let scale = self.scale;
        let n_rep = self.n_heads / self.n_kv_heads;
        let mut outs = Vec::with_capacity(spans.len());
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            let q_s = q.narrow(2, span.offset, span.len)?;
            let k_s = k.narrow(2, span.offset, span.len)?;
            let v_s = v.narrow(2, span.offset, span.len)?;
            let (k_all, v_all) = cache.append(&k_s, &v_s)?;
            let k_all = candle_transformers::utils::repeat_kv(k_all, n_rep)?.contiguous()?;
            let v_all = candle_transformers::utils::repeat_kv(v_all, n_rep)?.contiguous()?;
            let att = (q_s.contiguous()?.matmul(&k_all.t()?)? * scale)?;
            let att = if span.len > 1 {
                let mask = causal_mask(span.len, k_all.dim(2)?, x.device())?;
                att.broadcast_add(&mask)?
            } else {
                att
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v_all)?; // [1, heads, len, d]
            outs.push(y.squeeze(0)?.transpose(0, 1)?.reshape((span.len, self.n_heads * hd))?);
        }
        let y = Tensor::cat(&outs, 0)?;
        Ok(self.o.forward(&y)?)
    }
}

/// Additive mask for `len` new queries attending to `total` keys, the last `len` of which are
/// the queries' own positions.
pub(crate) fn causal_mask(len: usize, total: usize, device: &Device) -> Result<Tensor> {
    let past = total - len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (len, total), device)?)
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    pub fn new(gate: Linear, up: Linear, down: Linear) -> Self {
        Self { gate, up, down }
    }

    pub fn load(store: &TensorStore, names: Names, cfg: &ModelConfig, i: usize, device: &Device) -> Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let lin = |role: &str, out: usize, inp: usize| {
            Linear::load(store, &names.layer(i, role, "weight"), None, (out, inp), device)
        };
        Ok(Self {
            gate: lin("ffn_gate", f, h)?,
            up: lin("ffn_up", f, h)?,
            down: lin("ffn_down", h, f)?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(gate * self.up.forward(x)?)?)
    }
}

/// A layer's attention: grouped-query, or DeepSeek's latent attention.
#[derive(Debug, Clone)]
enum Mixer {
    Gqa(Attention),
    Mla(MlaAttention),
}

/// A layer's feed-forward: dense, or routed through experts.
#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Moe(MoeBlock),
}

/// One pre-norm decoder layer: `x + attn(norm(x))`, then `x + ffn(norm(x))`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    attn_norm: RmsNorm,
    attn: Mixer,
    ffn_norm: RmsNorm,
    ffn: FeedForward,
}

impl DecoderLayer {
    pub fn load(store: &TensorStore, names: Names, cfg: &ModelConfig, i: usize, device: &Device) -> Result<Self> {
        let norm = |role: &str| rms_norm(store, &names.layer(i, role, "weight"), cfg.hidden_size, cfg.rms_norm_eps, device);
        let attn = match &cfg.mla {
            Some(_) => Mixer::Mla(MlaAttention::load(store, names, cfg, i, device)?),
            None => Mixer::Gqa(Attention::load(store, names, cfg, i, device)?),
        };
        let ffn = match &cfg.moe {
            Some(moe) if moe.is_moe_layer(i) => FeedForward::Moe(MoeBlock::load(store, names, cfg, i, device)?),
            _ => FeedForward::Dense(Mlp::load(store, names, cfg, i, device)?),
        };
        Ok(Self {
            attn_norm: norm("attn_norm")?,
            attn,
            ffn_norm: norm("ffn_norm")?,
            ffn,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        cos: &Tensor,
        sin: &Tensor,
        spans: &[SeqSpan],
        caches: &mut [&mut SeqKv],
    ) -> Result<Tensor> {
        let timer = profile::start();
        let normed = self.attn_norm.forward(x)?;
        let h = match &self.attn {
            Mixer::Gqa(a) => a.forward(&normed, rotary, cos, sin, spans, caches)?,
            Mixer::Mla(a) => a.forward(&normed, rotary, cos, sin, spans, caches)?,
        };
        profile::record(Phase::Attention, timer);
        let x = (x + h)?;
        let normed = self.ffn_norm.forward(&x)?;
        let h = match &self.ffn {
            FeedForward::Dense(mlp) => {
                let timer = profile::start();
                let h = mlp.forward(&normed)?;
                profile::record(Phase::DenseMlp, timer);
                h
            }
            FeedForward::Moe(moe) => moe.forward(&normed)?,
        };
        Ok((x + h)?)
    }
}
