//! The KV cache a shard keeps for each open sequence: per layer, one growable K/V pair, or for
//! latent attention (DeepSeek) one growable latent row per token.

use candle_core::Tensor;
use candle_nn::kv_cache::{Cache, KvCache};

use crate::{ModelError, Result};

/// Tokens of room a cache grows by; small, so short sequences stay cheap.
pub const GROW_TOKENS: usize = 256;

/// One layer's cache for one sequence: keys and values shaped `[1, kv_heads, tokens, head_dim]`,
/// or latent rows `[tokens, kv_lora_rank + qk_rope_head_dim]`. Storage is allocated on first use,
/// so only the kind the layer appends to takes memory.
#[derive(Debug, Clone)]
pub struct SeqKv {
    inner: KvCache,
    latent: Cache,
}

impl Default for SeqKv {
    fn default() -> Self {
        Self {
            inner: KvCache::new(2, GROW_TOKENS),
            latent: Cache::new(0, GROW_TOKENS),
        }
    }
}

impl SeqKv {
    /// Appends this step's keys and values and returns every cached one.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(self.inner.append(&k.contiguous()?, &v.contiguous()?)?)
    }

    /// Appends latent rows `[tokens, width]` and returns every cached one.
    pub fn append_latent(&mut self, rows: &Tensor) -> Result<Tensor> {
        self.latent.append(&rows.contiguous()?)?;
        self.latent
            .current_data()?
            .ok_or_else(|| ModelError::Batch("no latent rows to cache".into()))
    }

    pub fn len(&self) -> usize {
        self.inner.current_seq_len().max(self.latent.current_seq_len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held, including room reserved for growth.
    pub fn allocated_bytes(&self) -> u64 {
        let bytes = |t: &Option<Tensor>| {
            t.as_ref()
                .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
                .unwrap_or(0)
        };
        bytes(self.inner.k_cache().all_data())
            + bytes(self.inner.v_cache().all_data())
            + bytes(self.latent.all_data())
    }
}

/// Everything a shard caches for one sequence.
#[derive(Debug, Clone)]
pub struct SeqCache {
    pub layers: Vec<SeqKv>,
    /// Tokens of this sequence the shard has processed (the next token's position).
    pub pos: usize,
}

impl SeqCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![SeqKv::default(); n_layers],
            pos: 0,
        }
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.layers.iter().map(SeqKv::allocated_bytes).sum()
    }
}
