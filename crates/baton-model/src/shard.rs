//! A shard: layers `[start, end)` of a model, with the embedding when it starts at 0 and the
//! final norm and output projection when it ends at the last layer. Chained in order, shards
//! compute exactly what the unsplit model computes.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::RmsNorm;

use crate::config::ModelConfig;
use crate::kv_cache::{SeqCache, SeqKv};
use crate::layers::{rms_norm, DecoderLayer, Names, Rotary, SeqSpan};
use crate::loader::ModelSource;
use crate::matmul::Matmul;
use crate::{ModelError, Result};

/// One sequence's slice of a micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqChunk {
    pub seq_id: u64,
    /// Position of the chunk's first token in its sequence; must equal what the shard has cached.
    pub start_pos: usize,
    pub n_tokens: usize,
}

/// What enters a shard: token ids on the first shard, hidden states `[T, hidden]` after it.
#[derive(Debug, Clone)]
pub enum BatchInput {
    Tokens(Vec<u32>),
    Hidden(Tensor),
}

/// Several sequences' tokens, concatenated in `seqs` order without padding.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    pub seqs: Vec<SeqChunk>,
    pub input: BatchInput,
}

impl MicroBatch {
    pub fn total_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.n_tokens).sum()
    }
}

/// Which logits the last shard returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// One row per sequence: its last token's (what decoding needs).
    LastToken,
    /// One row per token (what tests against reference logits need).
    AllTokens,
}

#[derive(Debug, Clone)]
pub enum ShardOutput {
    /// `[T, hidden]` f32, for the next shard.
    Hidden(Tensor),
    /// `[rows, vocab]` f32, rows as chosen by [`Logits`].
    Logits(Tensor),
}

/// Token embedding, kept quantized when the file is.
#[derive(Debug, Clone)]
enum Embedding {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Quantized(q) => q.embedding(ids)?,
            Embedding::Dense(w) => w.embedding(ids)?,
        })
    }
}

pub struct Shard {
    cfg: ModelConfig,
    range: Range<usize>,
    device: Device,
    embedding: Option<Embedding>,
    layers: Vec<DecoderLayer>,
    head: Option<(RmsNorm, Matmul)>,
    rotary: Rotary,
    seqs: HashMap<u64, SeqCache>,
}

impl Shard {
    /// Loads layers `range` of `source`, reading only those tensors.
    pub fn load(source: &ModelSource, range: Range<usize>, device: &Device) -> Result<Self> {
        let cfg = source.config().clone();
        if range.start >= range.end || range.end > cfg.n_layers {
            return Err(ModelError::LayerRange {
                start: range.start,
                end: range.end,
                n_layers: cfg.n_layers,
            });
        }
        let store = source.store();
        let names = Names::for_store(store);
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let first = range.start == 0;
        let last = range.end == cfg.n_layers;

        let needs_embedding_matrix = first || (last && cfg.tie_word_embeddings);
        let embedding = if !needs_embedding_matrix {
            None
        } else if store.gguf().is_some() {
            Some(Embedding::Quantized(store.qtensor(names.embedding(), &[vocab, h], device)?))
        } else {
            Some(Embedding::Dense(store.dense(names.embedding(), &[vocab, h], device)?))
        };
        let layers = range
            .clone()
            .map(|i| DecoderLayer::load(store, names, &cfg, i, device))
            .collect::<Result<Vec<_>>>()?;
        let head = if last {
            let norm = rms_norm(store, names.output_norm(), h, cfg.rms_norm_eps, device)?;
            let out = if cfg.tie_word_embeddings {
                match embedding.as_ref() {
                    Some(Embedding::Quantized(q)) => Matmul::from_qtensor(q.clone())?,
                    Some(Embedding::Dense(w)) => Matmul::dense(w.clone()),
                    None => unreachable!("the embedding matrix is loaded for tied output"),
                }
            } else {
                store.matmul(names.output(), &[vocab, h], device)?
            };
            Some((norm, out))
        } else {
            None
        };
        let rotary = Rotary::new(&cfg, device)?;
        Ok(Self {
            embedding: if first { embedding } else { None },
            cfg,
            range,
            device: device.clone(),
            layers,
            head,
            rotary,
            seqs: HashMap::new(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    pub fn is_first(&self) -> bool {
        self.range.start == 0
    }

    pub fn is_last(&self) -> bool {
        self.range.end == self.cfg.n_layers
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Starts a sequence with an empty cache.
    pub fn open_sequence(&mut self, seq_id: u64) -> Result<()> {
        if self.seqs.contains_key(&seq_id) {
            return Err(ModelError::SequenceExists(seq_id));
        }
        self.seqs.insert(seq_id, SeqCache::new(self.layers.len()));
        Ok(())
    }

    /// Frees a sequence's cache.
    pub fn close_sequence(&mut self, seq_id: u64) -> Result<()> {
        self.seqs
            .remove(&seq_id)
            .map(|_| ())
            .ok_or(ModelError::UnknownSequence(seq_id))
    }

    /// Frees every sequence's cache (the chain was rebuilt: nothing cached is valid any more).
    pub fn close_all(&mut self) {
        self.seqs.clear();
    }

    /// Tokens cached for a sequence, if open.
    pub fn sequence_len(&self, seq_id: u64) -> Option<usize> {
        self.seqs.get(&seq_id).map(|c| c.pos)
    }

    pub fn open_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// KV-cache bytes held by every open sequence.
    pub fn kv_bytes(&self) -> u64 {
        self.seqs.values().map(SeqCache::allocated_bytes).sum()
    }

    /// Runs the micro-batch through this shard's layers. The last shard returns logits of each
    /// sequence's last token; the others return hidden states for the next shard.
    pub fn forward(&mut self, batch: &MicroBatch) -> Result<ShardOutput> {
        self.forward_with(batch, Logits::LastToken)
    }

    pub fn forward_with(&mut self, batch: &MicroBatch, logits: Logits) -> Result<ShardOutput> {
        let spans = self.validate(batch)?;
        let total = batch.total_tokens();
        let mut x = match (&batch.input, &self.embedding) {
            (BatchInput::Tokens(ids), Some(embedding)) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                    return Err(ModelError::Batch(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        self.cfg.vocab_size
                    )));
                }
                embedding.forward(&Tensor::new(ids.as_slice(), &self.device)?)?
            }
            (BatchInput::Hidden(h), None) => {
                let want = [total, self.cfg.hidden_size];
                if h.dims() != want {
                    return Err(ModelError::Batch(format!(
                        "hidden states of shape {:?}, expected {want:?}",
                        h.dims()
                    )));
                }
                h.to_device(&self.device)?.to_dtype(DType::F32)?
            }
            (BatchInput::Tokens(_), None) => {
                return Err(ModelError::Batch(format!(
                    "shard [{}, {}) takes hidden states, not token ids",
                    self.range.start, self.range.end
                )))
            }
            (BatchInput::Hidden(_), Some(_)) => {
                return Err(ModelError::Batch("the first shard takes token ids, not hidden states".into()))
            }
        };

        let positions: Vec<u32> = batch
            .seqs
            .iter()
            .flat_map(|s| (s.start_pos..s.start_pos + s.n_tokens).map(|p| p as u32))
            .collect();
        let (cos, sin) = self.rotary.tables(&Tensor::new(positions.as_slice(), &self.device)?)?;

        // Take the caches out so each layer can borrow its slice of every sequence's cache.
        let mut caches: Vec<SeqCache> = batch
            .seqs
            .iter()
            .map(|s| self.seqs.remove(&s.seq_id).expect("validated above"))
            .collect();
        let result = (|| -> Result<Tensor> {
            for (li, layer) in self.layers.iter().enumerate() {
                let mut layer_caches: Vec<&mut SeqKv> =
                    caches.iter_mut().map(|c| &mut c.layers[li]).collect();
                x = layer.forward(&x, &self.rotary, &cos, &sin, &spans, &mut layer_caches)?;
            }
            Ok(x.clone())
        })();
        for (chunk, mut cache) in batch.seqs.iter().zip(caches) {
            if result.is_ok() {
                cache.pos += chunk.n_tokens;
            }
            self.seqs.insert(chunk.seq_id, cache);
        }
        let x = result?;

        let Some((norm, out)) = &self.head else {
            return Ok(ShardOutput::Hidden(x));
        };
        let rows = match logits {
            Logits::AllTokens => x,
            Logits::LastToken => {
                let last: Vec<u32> = spans.iter().map(|s| (s.offset + s.len - 1) as u32).collect();
                x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?
            }
        };
        Ok(ShardOutput::Logits(out.forward(&norm.forward(&rows)?)?))
    }

    /// Checks the batch against the open sequences before any cache is touched.
    fn validate(&self, batch: &MicroBatch) -> Result<Vec<SeqSpan>> {
        if batch.seqs.is_empty() {
            return Err(ModelError::Batch("empty micro-batch".into()));
        }
        let rows = match &batch.input {
            BatchInput::Tokens(ids) => ids.len(),
            BatchInput::Hidden(h) => h.dims().first().copied().unwrap_or(0),
        };
        if rows != batch.total_tokens() {
            return Err(ModelError::Batch(format!(
                "{rows} input rows for {} tokens in the sequence list",
                batch.total_tokens()
            )));
        }
        let mut spans = Vec::with_capacity(batch.seqs.len());
        let mut offset = 0;
        for (i, s) in batch.seqs.iter().enumerate() {
            if batch.seqs[..i].iter().any(|o| o.seq_id == s.seq_id) {
                return Err(ModelError::Batch(format!("sequence {} appears twice", s.seq_id)));
            }
            let cache = self.seqs.get(&s.seq_id).ok_or(ModelError::UnknownSequence(s.seq_id))?;
            if s.n_tokens == 0 {
                return Err(ModelError::Batch(format!("sequence {} has no tokens", s.seq_id)));
            }
            if s.start_pos != cache.pos {
                return Err(ModelError::Batch(format!(
                    "sequence {} chunk starts at position {}, but {} tokens are cached",
                    s.seq_id, s.start_pos, cache.pos
                )));
            }
            let needed = s.start_pos + s.n_tokens;
            if needed > self.cfg.context_length {
                return Err(ModelError::ContextLength {
                    seq: s.seq_id,
                    needed,
                    max: self.cfg.context_length,
                });
            }
            spans.push(SeqSpan {
                offset,
                len: s.n_tokens,
                start_pos: s.start_pos,
            });
            offset += s.n_tokens;
        }
        Ok(spans)
    }
}
