//! The mixture-of-experts feed-forward shared by Mixtral, Qwen2/3-MoE and DeepSeek-V3: a router
//! scores the experts for each token, the token runs through its top-k, and their outputs are
//! summed with the routing weights, plus any always-active shared expert.
//!
//! Expert compute is grouped by expert, not by token: the rows routed to expert `e` are gathered
//! into one matrix, go through one matmul per projection, are scaled by their weights, and every
//! expert's rows are scatter-added into the output at once.

use candle_core::{Device, Module, Tensor};

use crate::config::{ExpertScoring, Family, ModelConfig, MoeConfig};
use crate::layers::{Linear, Mlp, Names};
use crate::matmul::Matmul;
use crate::profile::{self, Phase};
use crate::weights::TensorStore;
use crate::Result;

#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// `[n_experts, hidden]` router, applied in f32.
    router: Linear,
    /// Selection-only bias (`e_score_correction_bias`).
    score_bias: Option<Vec<f32>>,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
    /// `[1, hidden]`: the shared expert's output is scaled by `sigmoid(x · w)` (Qwen2-MoE).
    shared_gate: Option<Linear>,
    cfg: MoeConfig,
}

impl MoeBlock {
    pub fn load(store: &TensorStore, names: Names, cfg: &ModelConfig, i: usize, device: &Device) -> Result<Self> {
        let moe = cfg
            .moe
            .clone()
            .ok_or_else(|| crate::ModelError::Config("expert layer without an MoE configuration".into()))?;
        let (h, n, f) = (cfg.hidden_size, moe.n_experts, moe.expert_ff);
        let gguf = names.is_gguf();
        // HF prefixes: Mixtral's `block_sparse_moe`, everyone else's `mlp`.
        let hf = match cfg.family {
            Family::Mixtral => format!("model.layers.{i}.block_sparse_moe."),
            _ => format!("model.layers.{i}.mlp."),
        };
        let name = |gguf_role: &str, hf_name: &str| {
            if gguf {
                format!("blk.{i}.{gguf_role}")
            } else {
                format!("{hf}{hf_name}")
            }
        };
        let lin = |n: String, out: usize, inp: usize| Linear::load(store, &n, None, (out, inp), device);

        let router = lin(name("ffn_gate_inp.weight", "gate.weight"), n, h)?;
        let score_bias = if moe.score_bias {
            let b = store.dense(&name("exp_probs_b.bias", "gate.e_score_correction_bias"), &[n], device)?;
            Some(b.to_vec1::<f32>()?)
        } else {
            None
        };

        let experts = if gguf {
            // llama.cpp stacks every expert in one tensor per projection; each expert's slice
            // is read as stored (quantized bytes stay quantized).
            let stacked = |role: &str, out: usize, inp: usize| {
                store.stacked_matmuls(&format!("blk.{i}.{role}.weight"), [n, out, inp], device)
            };
            let gate = stacked("ffn_gate_exps", f, h)?;
            let up = stacked("ffn_up_exps", f, h)?;
            let down = stacked("ffn_down_exps", h, f)?;
            gate.into_iter()
                .zip(up)
                .zip(down)
                .map(|((g, u), d)| expert(g, u, d))
                .collect()
        } else {
            let (g, u, d) = match cfg.family {
                Family::Mixtral => ("w1", "w3", "w2"),
                _ => ("gate_proj", "up_proj", "down_proj"),
            };
            let one = |e: usize, proj: &str, out: usize, inp: usize| {
                store.matmul(&format!("{hf}experts.{e}.{proj}.weight"), &[out, inp], device)
            };
            (0..n)
                .map(|e| Ok(expert(one(e, g, f, h)?, one(e, u, f, h)?, one(e, d, h, f)?)))
                .collect::<Result<Vec<_>>>()?
        };

        let shared = if moe.shared_ff > 0 {
            let sf = moe.shared_ff;
            let hf_shared = if cfg.family == Family::DeepseekV3 { "shared_experts" } else { "shared_expert" };
            let proj = |role: &str, hf_proj: &str, out: usize, inp: usize| {
                lin(name(&format!("{role}_shexp.weight"), &format!("{hf_shared}.{hf_proj}.weight")), out, inp)
            };
            Some(Mlp::new(proj("ffn_gate", "gate_proj", sf, h)?, proj("ffn_up", "up_proj", sf, h)?, proj("ffn_down", "down_proj", h, sf)?))
        } else {
            None
        };
        let shared_gate = if moe.shared_gate && shared.is_some() {
            Some(lin(name("ffn_gate_inp_shexp.weight", "shared_expert_gate.weight"), 1, h)?)
        } else {
            None
        };
        Ok(Self {
            router,
            score_bias,
            experts,
            shared,
            shared_gate,
            cfg: moe,
        })
    }

    /// `x`: `[T, hidden]` → `[T, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let timer = profile::start();
        let logits = self.router.forward(x)?.to_vec2::<f32>()?;
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.cfg.n_experts];
        let mut weights: Vec<Vec<f32>> = vec![Vec::new(); self.cfg.n_experts];
        for (t, row) in logits.iter().enumerate() {
            for (e, w) in self.route(row) {
                rows[e].push(t as u32);
                weights[e].push(w);
            }
        }
        profile::record(Phase::Routing, timer);

        let timer = profile::start();
        let device = x.device();
        let mut index = Vec::new();
        let mut outputs = Vec::new();
        for (e, (rows, w)) in rows.into_iter().zip(weights).enumerate() {
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let idx = Tensor::from_vec(rows, n, device)?;
            let y = self.experts[e].forward(&x.index_select(&idx, 0)?)?;
            outputs.push(y.broadcast_mul(&Tensor::from_vec(w, (n, 1), device)?)?);
            index.push(idx);
        }
        // One scatter-add for every expert: each token's sum runs in expert order, as in
        // transformers' loop over experts.
        let mut out = x.zeros_like()?.index_add(&Tensor::cat(&index, 0)?, &Tensor::cat(&outputs, 0)?, 0)?;
        if let Some(shared) = &self.shared {
            let mut s = shared.forward(x)?;
            if let Some(gate) = &self.shared_gate {
                s = s.broadcast_mul(&candle_nn::ops::sigmoid(&gate.forward(x)?)?)?;
            }
            out = (out + s)?;
        }
        profile::record(Phase::Experts, timer);
        Ok(out)
    }

    /// One token's chosen experts and their weights, from its router logits.
    fn route(&self, logits: &[f32]) -> Vec<(usize, f32)> {
        let cfg = &self.cfg;
        let scores: Vec<f32> = match cfg.scoring {
            ExpertScoring::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
            ExpertScoring::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
                let sum: f32 = exp.iter().sum();
                exp.iter().map(|&e| e / sum).collect()
            }
        };
        // Selection may use biased scores; the weights are always the unbiased ones.
        let mut choice: Vec<f32> = match &self.score_bias {
            Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
            None => scores.clone(),
        };
        if cfg.n_group > 1 {
            // A group ranks by the sum of its two best scores; experts outside the best
            // `topk_group` groups cannot be chosen.
            let size = cfg.n_experts / cfg.n_group;
            let group_score: Vec<f32> = choice
                .chunks(size)
                .map(|g| top_k(g, 2.min(size)).iter().map(|&i| g[i]).sum())
                .collect();
            let keep = top_k(&group_score, cfg.topk_group);
            for (g, chunk) in choice.chunks_mut(size).enumerate() {
                if !keep.contains(&g) {
                    chunk.fill(f32::NEG_INFINITY);
                }
            }
        }
        let chosen = top_k(&choice, cfg.n_experts_used);
        let mut weights: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
        if cfg.norm_topk_prob {
            let sum: f32 = weights.iter().sum();
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        chosen
            .into_iter()
            .zip(weights)
            .map(|(e, w)| (e, w * cfg.routed_scaling as f32))
            .collect()
    }
}

fn expert(gate: Matmul, up: Matmul, down: Matmul) -> Mlp {
    Mlp::new(Linear::from_parts(gate, None), Linear::from_parts(up, None), Linear::from_parts(down, None))
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    idx.truncate(k);
    idx
}
