//! Turning one row of logits into the next token, per sequence, deterministically.
//!
//! # Semantics
//!
//! A [`Sampler`] applies, in this order (the order of Hugging Face `generate` and vLLM):
//!
//! 1. **Repetition penalty** (HF / CTRL style) over every distinct token of prompt + generated
//!    tokens: a positive logit is divided by `repetition_penalty`, a negative one multiplied by it.
//!    `1.0` is off.
//! 2. **Presence and frequency penalties** (OpenAI style) over the generated tokens only:
//!    `logit -= frequency_penalty * count + presence_penalty * (count > 0)`. `0.0` is off.
//! 3. **Temperature**: `logit / temperature`. `temperature == 0` is greedy: the arg-max of the
//!    penalised logits (lowest id on ties), and steps 4-6 are skipped.
//! 4. **Top-k**: keep the `k` most probable tokens.
//! 5. **Top-p** (nucleus): of what is left, renormalised, keep the smallest most-probable prefix
//!    whose mass reaches `top_p`.
//! 6. **Min-p**: drop every token whose probability is below `min_p` times the most probable one's.
//!
//! At least one token always survives. Ties in probability are ordered by lower token id, so the
//! candidate set, and hence the draw, is a pure function of the logits. (llama.cpp applies the
//! temperature last; here, as in HF, top-p and min-p see the tempered distribution.)
//!
//! **Logprobs** are the log-softmax of the *raw* model logits, before penalties and temperature,
//! like OpenAI's: [`Sampled::logprob`] is the chosen token's, [`Sampled::top_logprobs`] the
//! `top_logprobs` most likely tokens', most likely first.
//!
//! # Determinism and resumption
//!
//! The randomness of step `n` (the `n`-th generated token, from 0) is the first 64-bit word of the
//! ChaCha20 stream number `n` keyed by the seed. It depends on nothing else, so the same seed and
//! the same logits give the same tokens, and [`Sampler::resume`] rebuilds a sampler after a node
//! loss from the prompt and the tokens already emitted, without replaying any draw.
//!
//! # Cost
//!
//! One call is O(vocab) (a few passes over the row; top-k uses a bounded heap; top-p and min-p
//! first discard, in logit space, tokens that cannot survive, and sort only the rest) and allocates
//! only the row itself plus candidate-sized scratch. candle's `LogitsProcessor` is not used: its
//! random state is a stream of past draws (not resumable from a step index), it has no min-p,
//! its top-p sorts the whole vocabulary, and after top-k it applies top-p without renormalising,
//! unlike HF. `apply_repeat_penalty` is not used either: it rebuilds a hash set over the whole
//! context every call, where the sampler keeps its penalty table incrementally.

use crate::{ModelError, Result};
use candle_core::{DType, Tensor};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;

/// The most `top_logprobs` a request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Per-sequence sampling settings, installed when a sequence opens.
///
/// Missing fields deserialise to the [`Default`], which is greedy decoding with no penalties.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SamplingParams {
    /// `0` is greedy; otherwise a finite value > 0.
    pub temperature: f32,
    /// Keep the `k` most probable tokens (`k >= 1`); `None` is off.
    pub top_k: Option<usize>,
    /// Nucleus mass in `(0, 1]`; `None` (or `1`) is off.
    pub top_p: Option<f32>,
    /// Relative probability floor in `[0, 1]`; `None` (or `0`) is off.
    pub min_p: Option<f32>,
    /// HF repetition penalty over prompt + generated tokens, `> 0`; `1` is off.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty over generated tokens, in `[-2, 2]`; `0` is off.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty over generated tokens, in `[-2, 2]`; `0` is off.
    pub frequency_penalty: f32,
    /// Keys the per-step random streams.
    pub seed: u64,
    /// How many most-likely alternatives to report per token, `0..=20`; `0` is none.
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            top_logprobs: 0,
        }
    }
}

/// A sampling parameter outside its domain: which field, and why. The HTTP API reports `field`
/// as the offending parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSamplingParam {
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for InvalidSamplingParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for InvalidSamplingParam {}

impl From<InvalidSamplingParam> for ModelError {
    fn from(e: InvalidSamplingParam) -> Self {
        ModelError::Sampling(e.to_string())
    }
}

impl SamplingParams {
    /// Greedy decoding, the default.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether decoding takes the arg-max (no randomness involved).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field's domain, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(ModelError::from)
    }

    /// [`validate`](Self::validate) with the offending field as data.
    pub fn check(&self) -> std::result::Result<(), InvalidSamplingParam> {
        let bad = |field, message: String| Err(InvalidSamplingParam { field, message });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            );
        }
        if self.top_k == Some(0) {
            return bad("top_k", "must be >= 1 (leave it unset to disable)".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("top_p", format!("must be in (0, 1], got {p}"));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return bad("min_p", format!("must be in [0, 1], got {p}"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!(
                    "must be a finite number > 0, got {}",
                    self.repetition_penalty
                ),
            );
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(field, format!("must be in [-2, 2], got {v}"));
            }
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad(
                "top_logprobs",
                format!(
                    "must be at most {MAX_TOP_LOGPROBS}, got {}",
                    self.top_logprobs
                ),
            );
        }
        Ok(())
    }

    fn penalises(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// One sampled token with its logprob (raw log-softmax) and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first, `params.top_logprobs` long (or the vocabulary size
    /// if smaller).
    pub top_logprobs: Vec<(u32, f32)>,
}

/// The sampler of one sequence: its parameters, the tokens it generated, and the penalty table.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    generated: Vec<u32>,
    /// Every distinct token of prompt + generated, with how often it was generated. Kept only when
    /// a penalty is on; each call touches just these entries.
    occurrences: HashMap<u32, u32>,
    /// `(id, raw logit)` of the entries a penalty changed in the current call.
    saved: Vec<(u32, f32)>,
    /// Candidate tokens of the current call: `(logit, id)`.
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler for a sequence whose prompt is `prompt`.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Result<Self> {
        params.validate()?;
        let mut occurrences = HashMap::new();
        if params.repetition_penalty != 1.0 {
            for &t in prompt {
                occurrences.entry(t).or_insert(0);
            }
        }
        Ok(Self {
            params,
            generated: Vec::new(),
            occurrences,
            saved: Vec::new(),
            candidates: Vec::new(),
        })
    }

    /// The sampler as it would be after sampling `generated`: its next draw equals what the
    /// undisturbed sampler would have drawn from the same logits.
    pub fn resume(params: SamplingParams, prompt: &[u32], generated: &[u32]) -> Result<Self> {
        let mut s = Self::new(params, prompt)?;
        s.generated.reserve(generated.len());
        for &t in generated {
            s.record(t);
        }
        Ok(s)
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The tokens this sampler has produced (or was resumed with), in order.
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Samples the next token from `logits` (shape `[vocab]`, or `[1, vocab]`; any float dtype)
    /// and records it as generated.
    pub fn sample(&mut self, logits: &Tensor) -> Result<Sampled> {
        let mut row = logits_row(logits)?;
        let lse = log_sum_exp(&row)?;
        let top_logprobs = if self.params.top_logprobs > 0 {
            top_n(&row, self.params.top_logprobs, &mut self.candidates);
            self.candidates
                .iter()
                .map(|&(l, id)| (id, l - lse))
                .collect()
        } else {
            Vec::new()
        };
        self.apply_penalties(&mut row);
        let token = if self.params.is_greedy() {
            argmax(&row)
        } else {
            let u = uniform(self.params.seed, self.generated.len() as u64);
            self.draw(&row, u)?
        };
        // Penalties overwrote a few entries of `row`; the logprob is defined on the raw logit.
        let raw = match self.saved.iter().find(|&&(id, _)| id == token) {
            Some(&(_, l)) => l,
            None => row[token as usize],
        };
        self.record(token);
        Ok(Sampled {
            token,
            logprob: raw - lse,
            top_logprobs,
        })
    }

    fn record(&mut self, token: u32) {
        self.generated.push(token);
        if self.params.penalises() {
            *self.occurrences.entry(token).or_insert(0) += 1;
        }
    }

    fn apply_penalties(&mut self, row: &mut [f32]) {
        self.saved.clear();
        let SamplingParams {
            repetition_penalty: rep,
            presence_penalty: presence,
            frequency_penalty: frequency,
            ..
        } = self.params;
        for (&id, &count) in &self.occurrences {
            let Some(l) = row.get_mut(id as usize) else {
                continue; // an id past this model's vocabulary cannot be sampled again
            };
            self.saved.push((id, *l));
            if rep != 1.0 {
                *l = if *l < 0.0 { *l * rep } else { *l / rep };
            }
            if count > 0 {
                *l -= frequency * count as f32 + presence;
            }
        }
    }

    /// Steps 3-6 of the module doc, then the inverse-CDF draw at `u` in `[0, 1)`.
    fn draw(&mut self, row: &[f32], u: f64) -> Result<u32> {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(ModelError::Sampling(
                "every token has probability 0 after the penalties".into(),
            ));
        }
        // Unnormalised probability relative to the most probable token (which weighs 1).
        let weight = |l: f32| f64::from(((l - max) * inv_t).exp());
        let vocab = row.len();
        let top_k = p.top_k.filter(|&k| k < vocab);
        let top_p = p.top_p.filter(|&q| q < 1.0).map(f64::from);
        let min_p = p.min_p.filter(|&q| q > 0.0).map(f64::from);

        if top_k.is_none() && top_p.is_none() && min_p.is_none() {
            let total: f64 = row.iter().map(|&l| weight(l)).sum();
            return Ok(pick(
                row.iter().enumerate().map(|(i, &l)| (i as u32, weight(l))),
                u * total,
            ));
        }

        // Candidates, then the normaliser top-p uses: the top-k mass, or the whole vocabulary's.
        let candidates = &mut self.candidates;
        let mut top_p_norm = None;
        if let Some(k) = top_k {
            top_n(row, k, candidates);
        } else {
            let total: f64 = if top_p.is_some() {
                row.iter().map(|&l| weight(l)).sum()
            } else {
                1.0
            };
            top_p_norm = Some(total);
            // Top-p never keeps a token of normalised probability below (1 - p) / vocab (all such
            // tokens together weigh less than 1 - p, and they rank last); min-p never keeps one
            // below min_p. Halving the floor absorbs rounding: this only has to be conservative.
            let mut floor = 0.0f64;
            if let Some(q) = top_p {
                floor = floor.max(0.5 * (1.0 - q) / vocab as f64 * total);
            }
            if let Some(q) = min_p {
                floor = floor.max(0.5 * q);
            }
            let threshold = max as f64 + floor.ln() / inv_t as f64;
            candidates.clear();
            candidates.extend(
                row.iter()
                    .enumerate()
                    .filter(|&(_, &l)| l as f64 >= threshold)
                    .map(|(i, &l)| (l, i as u32)),
            );
            candidates.sort_unstable_by(|a, b| rank(*a, *b));
        }

        let mut keep = candidates.len();
        if let Some(q) = top_p {
            let norm = match top_p_norm {
                Some(total) => total,
                None => candidates.iter().map(|&(l, _)| weight(l)).sum(),
            };
            let mut before = 0.0;
            for (i, &(l, _)) in candidates.iter().enumerate() {
                if before >= q * norm {
                    keep = keep.min(i);
                    break;
                }
                before += weight(l);
            }
        }
        if let Some(q) = min_p {
            if let Some(i) = candidates.iter().position(|&(l, _)| weight(l) < q) {
                keep = keep.min(i);
            }
        }
        let kept = &candidates[..keep.max(1)];
        let total: f64 = kept.iter().map(|&(l, _)| weight(l)).sum();
        Ok(pick(kept.iter().map(|&(l, id)| (id, weight(l))), u * total))
    }
}

/// The row of logits as f32, checking its shape.
fn logits_row(logits: &Tensor) -> Result<Vec<f32>> {
    let dims = logits.dims();
    let ok = match dims {
        [v] => *v > 0,
        [1, v] => *v > 0,
        _ => false,
    };
    if !ok {
        return Err(ModelError::Sampling(format!(
            "expected logits of shape [vocab] or [1, vocab], got {dims:?}"
        )));
    }
    Ok(logits
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

/// `log(sum(exp(row)))`, rejecting rows no distribution can come from.
fn log_sum_exp(row: &[f32]) -> Result<f32> {
    let mut max = f32::NEG_INFINITY;
    for (i, &l) in row.iter().enumerate() {
        if l.is_nan() || l == f32::INFINITY {
            return Err(ModelError::Sampling(format!("logit of token {i} is {l}")));
        }
        max = max.max(l);
    }
    if max == f32::NEG_INFINITY {
        return Err(ModelError::Sampling("every logit is -inf".into()));
    }
    let sum: f64 = row.iter().map(|&l| f64::from((l - max).exp())).sum();
    Ok((max as f64 + sum.ln()) as f32)
}

/// Order of candidates: more probable first, then lower id.
fn rank(a: (f32, u32), b: (f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Heap entry whose maximum is the *worst* candidate, so the heap can evict it.
#[derive(PartialEq)]
struct Worst((f32, u32));

impl Eq for Worst {}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        rank(self.0, other.0)
    }
}

/// The `n` best `(logit, id)` of `row` into `out`, best first, in O(vocab log n).
fn top_n(row: &[f32], n: usize, out: &mut Vec<(f32, u32)>) {
    let n = n.min(row.len());
    let mut heap: BinaryHeap<Worst> = BinaryHeap::with_capacity(n + 1);
    for (i, &l) in row.iter().enumerate() {
        let c = (l, i as u32);
        if heap.len() < n {
            heap.push(Worst(c));
        } else if let Some(worst) = heap.peek() {
            if rank(c, worst.0) == Ordering::Less {
                heap.pop();
                heap.push(Worst(c));
            }
        }
    }
    out.clear();
    out.extend(heap.into_sorted_vec().into_iter().map(|Worst(c)| c));
}

/// Index of the largest value, lowest index on ties (as `torch.argmax`).
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in row.iter().enumerate() {
        if l > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The first token whose cumulative weight exceeds `target`; the last weighted one if rounding
/// leaves `target` past the end.
fn pick(weights: impl Iterator<Item = (u32, f64)>, target: f64) -> u32 {
    let mut acc = 0.0;
    let mut last = None;
    for (id, w) in weights {
        if w > 0.0 {
            acc += w;
            last = Some(id);
            if acc > target {
                return id;
            }
        }
    }
    // The most probable token weighs 1, so some token has weight and `last` is set.
    last.unwrap_or_default()
}

/// The uniform draw in `[0, 1)` of step `step`: ChaCha20 keyed by the seed, stream `step`.
fn uniform(seed: u64, step: u64) -> f64 {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let mut rng = ChaCha20Rng::from_seed(key);
    rng.set_stream(step);
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_depends_on_seed_and_step_only() {
        assert_eq!(uniform(7, 3), uniform(7, 3));
        assert_ne!(uniform(7, 3), uniform(7, 4));
        assert_ne!(uniform(7, 3), uniform(8, 3));
        for s in 0..1000 {
            let u = uniform(1, s);
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn top_n_orders_by_logit_then_id() {
        let row = [1.0, 3.0, 3.0, f32::NEG_INFINITY, 2.0];
        let mut out = Vec::new();
        top_n(&row, 3, &mut out);
        assert_eq!(out, vec![(3.0, 1), (3.0, 2), (2.0, 4)]);
        top_n(&row, 10, &mut out);
        assert_eq!(out.len(), 5);
        assert_eq!(out[4], (f32::NEG_INFINITY, 3));
    }

    #[test]
    fn pick_skips_zero_weights() {
        let w = [(0, 0.0), (1, 1.0), (2, 0.0), (3, 1.0)];
        assert_eq!(pick(w.into_iter(), 0.0), 1);
        assert_eq!(pick(w.into_iter(), 1.5), 3);
        assert_eq!(pick(w.into_iter(), 2.0), 3);
    }

    #[test]
    fn argmax_takes_lowest_id_on_ties() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
    }
}
