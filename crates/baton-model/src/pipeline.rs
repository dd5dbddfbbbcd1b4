//! Several shards chained inside one process, hidden states crossing each boundary in the wire
//! dtype: sharding proven before networking, and the reference a cluster must reproduce.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::loader::ModelSource;
use crate::shard::{BatchInput, Logits, MicroBatch, Shard, ShardOutput};
use crate::{ModelError, Result};

/// Element type of hidden states between stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireDType {
    F32,
    F16,
    Bf16,
}

impl WireDType {
    pub fn dtype(self) -> DType {
        match self {
            WireDType::F32 => DType::F32,
            WireDType::F16 => DType::F16,
            WireDType::Bf16 => DType::BF16,
        }
    }

    /// Rounds hidden states as a trip over the wire would.
    pub fn round_trip(self, hidden: &Tensor) -> Result<Tensor> {
        Ok(match self {
            WireDType::F32 => hidden.clone(),
            other => hidden.to_dtype(other.dtype())?.to_dtype(DType::F32)?,
        })
    }
}

impl std::str::FromStr for WireDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(WireDType::F32),
            "f16" => Ok(WireDType::F16),
            "bf16" => Ok(WireDType::Bf16),
            other => Err(format!("unknown wire dtype `{other}` (expected f32, f16 or bf16)")),
        }
    }
}

/// Splits `n_layers` into `n` contiguous ranges whose sizes differ by at most one.
pub fn even_split(n_layers: usize, n: usize) -> Result<Vec<Range<usize>>> {
    if n == 0 || n > n_layers {
        return Err(ModelError::Config(format!(
            "cannot split {n_layers} layers into {n} shards"
        )));
    }
    let (base, extra) = (n_layers / n, n_layers % n);
    let mut start = 0;
    Ok((0..n)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect())
}

pub struct LocalPipeline {
    shards: Vec<Shard>,
    wire: WireDType,
}

impl LocalPipeline {
    /// Loads `source` as the given contiguous ranges, which must cover every layer in order.
    pub fn load(source: &ModelSource, ranges: &[Range<usize>], wire: WireDType, device: &Device) -> Result<Self> {
        let n_layers = source.config().n_layers;
        let mut expected = 0;
        for r in ranges {
            if r.start != expected {
                return Err(ModelError::LayerRange {
                    start: r.start,
                    end: r.end,
                    n_layers,
                });
            }
            expected = r.end;
        }
        if expected != n_layers {
            return Err(ModelError::Config(format!(
                "shards cover layers [0, {expected}) of {n_layers}"
            )));
        }
        let shards = ranges
            .iter()
            .map(|r| Shard::load(source, r.clone(), device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { shards, wire })
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    pub fn open_sequence(&mut self, seq_id: u64) -> Result<()> {
        for (i, s) in self.shards.iter_mut().enumerate() {
            if let Err(e) = s.open_sequence(seq_id) {
                for s in &mut self.shards[..i] {
                    s.close_sequence(seq_id)?;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn close_sequence(&mut self, seq_id: u64) -> Result<()> {
        let mut result = Ok(());
        for s in &mut self.shards {
            if let Err(e) = s.close_sequence(seq_id) {
                result = Err(e);
            }
        }
        result
    }

    /// Runs token ids through every shard; returns the last shard's logits.
    pub fn forward(&mut self, batch: &MicroBatch, logits: Logits) -> Result<Tensor> {
        let mut input = batch.input.clone();
        let n = self.shards.len();
        for (i, shard) in self.shards.iter_mut().enumerate() {
            let mb = MicroBatch {
                seqs: batch.seqs.clone(),
                input,
            };
            match shard.forward_with(&mb, logits)? {
                ShardOutput::Hidden(h) if i + 1 < n => input = BatchInput::Hidden(self.wire.round_trip(&h)?),
                ShardOutput::Logits(l) if i + 1 == n => return Ok(l),
                _ => unreachable!("only the last shard returns logits"),
            }
        }
        unreachable!("a pipeline has at least one shard")
    }

    pub fn kv_bytes(&self) -> u64 {
        self.shards.iter().map(Shard::kv_bytes).sum()
    }
}
