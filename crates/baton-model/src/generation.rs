//! The generation loop: chunked prefill, then one token at a time until a stop token or the
//! token budget, sampling on the last shard's logits.

use std::time::{Duration, Instant};

use crate::pipeline::LocalPipeline;
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::shard::{BatchInput, Logits, MicroBatch, SeqChunk};
use crate::{ModelError, Result};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Prompt tokens per prefill forward.
    pub prefill_chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            prefill_chunk: 512,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// A stop token was sampled (not included in the output).
    Stop,
    /// The token budget ran out.
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Tokens after the first (which prefill produced), per second of decoding.
    pub fn decode_tok_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Generates from `prompt` as sequence `seq_id`; `on_token` sees each kept token as it comes.
pub fn generate(
    pipeline: &mut LocalPipeline,
    seq_id: u64,
    prompt: &[u32],
    stop_ids: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(&Sampled),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(ModelError::Batch("the prompt has no tokens".into()));
    }
    let mut sampler = Sampler::new(opts.sampling.clone(), prompt)?;
    pipeline.open_sequence(seq_id)?;
    let result = (|| -> Result<Generation> {
        let chunk = opts.prefill_chunk.max(1);
        let start = Instant::now();
        let mut logits = None;
        for (i, part) in prompt.chunks(chunk).enumerate() {
            let batch = MicroBatch {
                seqs: vec![SeqChunk {
                    seq_id,
                    start_pos: i * chunk,
                    n_tokens: part.len(),
                }],
                input: BatchInput::Tokens(part.to_vec()),
            };
            logits = Some(pipeline.forward(&batch, Logits::LastToken)?);
        }
        let prefill_time = start.elapsed();
        let mut logits = logits.expect("the prompt is not empty");
        let mut tokens = Vec::new();
        let mut finish = Finish::Length;
        let start = Instant::now();
        while tokens.len() < opts.max_tokens {
            let sampled = sampler.sample(&logits.squeeze(0)?)?;
            if stop_ids.contains(&sampled.token) {
                finish = Finish::Stop;
                break;
            }
            on_token(&sampled);
            tokens.push(sampled.token);
            if tokens.len() == opts.max_tokens {
                break;
            }
            let batch = MicroBatch {
                seqs: vec![SeqChunk {
                    seq_id,
                    start_pos: prompt.len() + tokens.len() - 1,
                    n_tokens: 1,
                }],
                input: BatchInput::Tokens(vec![sampled.token]),
            };
            logits = pipeline.forward(&batch, Logits::LastToken)?;
        }
        Ok(Generation {
            tokens,
            finish,
            prompt_tokens: prompt.len(),
            prefill_time,
            decode_time: start.elapsed(),
        })
    })();
    let closed = pipeline.close_sequence(seq_id);
    let generation = result?;
    closed?;
    Ok(generation)
}
