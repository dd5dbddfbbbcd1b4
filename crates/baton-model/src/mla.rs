//! Multi-head latent attention (DeepSeek-V2/V3) over a micro-batch, caching only the compressed
//! latent: per token per layer `kv_lora_rank` values plus the `qk_rope_head_dim` rotary key that
//! all heads share.
//!
//! Keys and values are never expanded per head. With `c` a cached latent, head `h`'s key is
//! `[W_UK_h c, k_rot]` and its value `W_UV_h c`, so
//! `q_h · k_h = (q_nope_h W_UK_h) · c + q_rot_h · k_rot` and `Σ p v_h = W_UV_h (Σ p c)`:
//! the query absorbs `W_UK`, attention runs against the latent as one shared (MQA) head of width
//! `kv_lora_rank + qk_rope_head_dim`, and `W_UV` is applied once to the attended latent. The same
//! path serves prefill and decode, so a split model computes exactly what the unsplit one does.

use candle_core::{Device, Module, Tensor};
use candle_nn::RmsNorm;

use crate::config::{MlaConfig, ModelConfig};
use crate::kv_cache::SeqKv;
use crate::layers::{causal_mask, rms_norm, Linear, Names, Rotary, SeqSpan};
use crate::weights::TensorStore;
use crate::{ModelError, Result};

/// How queries are produced: through a low-rank bottleneck (V3) or directly (V2-Lite).
#[derive(Debug, Clone)]
enum Query {
    Lora { a: Linear, norm: RmsNorm, b: Linear },
    Direct(Linear),
}

#[derive(Debug, Clone)]
pub struct MlaAttention {
    q: Query,
    /// `[kv_lora_rank + qk_rope_head_dim, hidden]`: the latent and the shared rotary key.
    kv_a: Linear,
    kv_norm: RmsNorm,
    /// `[heads, qk_nope_head_dim, kv_lora_rank]`: latent → per-head no-rope key, absorbed into q.
    w_uk: Tensor,
    /// `[heads, kv_lora_rank, v_head_dim]`: attended latent → per-head value (transposed `W_UV`).
    w_uv_t: Tensor,
    o: Linear,
    n_heads: usize,
    dims: MlaConfig,
    scale: f64,
}

impl MlaAttention {
    pub fn load(store: &TensorStore, names: Names, cfg: &ModelConfig, i: usize, device: &Device) -> Result<Self> {
        let m = cfg
            .mla
            .clone()
            .ok_or_else(|| ModelError::Config("latent attention without an MLA configuration".into()))?;
        let (h, nh) = (cfg.hidden_size, cfg.n_heads);
        let (nope, kvr, vd) = (m.qk_nope_head_dim, m.kv_lora_rank, m.v_head_dim);
        let w = |role: &str| names.layer(i, role, "weight");
        let lin = |role: &str, out: usize, inp: usize| Linear::load(store, &w(role), None, (out, inp), device);
        let q_out = nh * m.qk_head_dim();
        let q = match m.q_lora_rank {
            Some(r) => Query::Lora {
                a: lin("attn_q_a", r, h)?,
                norm: rms_norm(store, &w("attn_q_a_norm"), r, cfg.rms_norm_eps, device)?,
                b: lin("attn_q_b", q_out, r)?,
            },
            None => Query::Direct(lin("attn_q", q_out, h)?),
        };
        // llama.cpp's converter splits kv_b into k_b (stored transposed) and v_b; older GGUFs
        // and HF checkpoints keep the fused `[heads · (nope + v), kv_lora]` matrix.
        let k_b = w("attn_k_b");
        let (w_uk, w_uv) = if names.is_gguf() && store.contains(&k_b) {
            let k_b = store.dense(&k_b, &[nh, kvr, nope], device)?;
            let v_b = store.dense(&w("attn_v_b"), &[nh, vd, kvr], device)?;
            (k_b.transpose(1, 2)?, v_b)
        } else {
            let kv_b = store.dense(&w("attn_kv_b"), &[nh * (nope + vd), kvr], device)?;
            let kv_b = kv_b.reshape((nh, nope + vd, kvr))?;
            (kv_b.narrow(1, 0, nope)?, kv_b.narrow(1, nope, vd)?)
        };
        Ok(Self {
            q,
            kv_a: lin("attn_kv_a_mqa", m.cache_width(), h)?,
            kv_norm: rms_norm(store, &w("attn_kv_a_norm"), kvr, cfg.rms_norm_eps, device)?,
            w_uk: w_uk.contiguous()?,
            w_uv_t: w_uv.transpose(1, 2)?.contiguous()?,
            o: lin("attn_output", h, nh * vd)?,
            n_heads: nh,
            dims: m,
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
        let nh = self.n_heads;
        let MlaConfig { qk_nope_head_dim: nope, qk_rope_head_dim: rope, kv_lora_rank: kvr, v_head_dim: vd, .. } =
            self.dims;
        let width = kvr + rope;

        let q = match &self.q {
            Query::Lora { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
            Query::Direct(q) => q.forward(x)?,
        };
        let q = q.reshape((t, nh, nope + rope))?.transpose(0, 1)?; // [heads, T, qk]
        let q_nope = q.narrow(2, 0, nope)?.contiguous()?;
        let q_rot = rotary.apply(&q.narrow(2, nope, rope)?.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
        let q_lat = q_nope.matmul(&self.w_uk)?; // [heads, T, kv_lora]
        let q = Tensor::cat(&[&q_lat, &q_rot], 2)?; // [heads, T, width]

        let kv = self.kv_a.forward(x)?;
        let latent = self.kv_norm.forward(&kv.narrow(1, 0, kvr)?.contiguous()?)?;
        let k_rot = kv.narrow(1, kvr, rope)?.contiguous()?.reshape((1, 1, t, rope))?;
        let k_rot = rotary.apply(&k_rot, cos, sin)?.reshape((t, rope))?;
        let entries = Tensor::cat(&[&latent, &k_rot], 1)?; // [T, width]: what the cache keeps

        let mut outs = Vec::with_capacity(spans.len());
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            let all = cache.append_latent(&entries.narrow(0, span.offset, span.len)?)?; // [Tk, width]
            let tk = all.dim(0)?;
            let q_s = q.narrow(1, span.offset, span.len)?.contiguous()?.reshape((nh * span.len, width))?;
            let att = (q_s.matmul(&all.t()?)? * self.scale)?.reshape((nh, span.len, tk))?;
            let att = if span.len > 1 {
                att.broadcast_add(&causal_mask(span.len, tk, x.device())?)?
            } else {
                att
            };
            let p = candle_nn::ops::softmax_last_dim(&att)?.reshape((nh * span.len, tk))?;
            let o_lat = p.matmul(&all.narrow(1, 0, kvr)?.contiguous()?)?;
            outs.push(o_lat.reshape((nh, span.len, kvr))?);
        }
        let o_lat = Tensor::cat(&outs, 1)?; // [heads, T, kv_lora]
        let o = o_lat.matmul(&self.w_uv_t)?; // [heads, T, v]
        let o = o.transpose(0, 1)?.contiguous()?.reshape((t, nh * vd))?;
        Ok(self.o.forward(&o)?)
    }
}
