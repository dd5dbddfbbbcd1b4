//! Manifests of real models too large for any machine here (DeepSeek-V3/R1 671B, Kimi K2), built
//! from their published `config.json` and llama.cpp's Q4_K_M type rules instead of a file's
//! headers, so placement can be planned and tested without the weights.
//!
//! Tensors are counted as llama.cpp's converter names and shapes them for `deepseek2` (the
//! multi-token-prediction layer is not counted: llama.cpp does not load it). Q4_K_M types follow
//! llama.cpp's `llama_tensor_get_type` for `LLAMA_FTYPE_MOSTLY_Q4_K_M`:
//! - default Q4_K: 144 bytes per 256 weights (4.5 bits/weight);
//! - `output.weight` Q6_K: 210 bytes per 256 weights (6.5625 bits/weight);
//! - `ffn_down`, `ffn_down_exps`, `ffn_down_shexp`: Q6_K in the layers where `use_more_bits`
//!   holds (the first and last eighth of the layers, and every third layer in between), else
//!   Q4_K (simplified to the layer index; llama.cpp counts `ffn_down` tensors);
//! - attention (`attn_q_a`, `attn_q_b`, `attn_kv_a_mqa`, fused `attn_kv_b`, `attn_output`) Q4_K:
//!   MLA has no `attn_v`, which is where Q4_K_M would spend more bits;
//! - `token_embd` Q4_K; norms, the router `ffn_gate_inp` and `exp_probs_b` F32.
//!
//! `attn_kv_b` is counted fused (`[kv_lora, heads · (nope + v)]`), as in the published Q4_K_M
//! files; newer converters split it into `attn_k_b`/`attn_v_b` (the same weights, the k half
//! falling back to Q5_0 because its 128-wide rows are not whole Q4_K blocks), which the loader
//! also reads. The result, ~404 GB for DeepSeek-V3, matches the published Q4_K_M files.
//!
//! The KV figure is the latent cache: `(kv_lora_rank + qk_rope_head_dim) × 2` bytes per token per
//! layer at f16, what llama.cpp and a GPU deployment cache. (The CPU engine caches f32, twice
//! that: 61 × 2304 bytes per token, still only 4.6 GB for 8k context × 4 sequences.)

use std::collections::BTreeMap;

use crate::manifest::Manifest;

/// The published shape of a DeepSeek-V3-style model (MLA attention, routed + shared experts,
/// leading dense layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaMoeShape {
    pub architecture: &'static str,
    pub name: &'static str,
    pub n_layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub context: usize,
    pub heads: usize,
    pub q_lora_rank: usize,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// `first_k_dense_replace` and the dense layers' `intermediate_size`.
    pub dense_layers: usize,
    pub dense_ff: usize,
    pub routed_experts: usize,
    pub shared_experts: usize,
    pub moe_ff: usize,
}

/// DeepSeek-V3 (and R1, same weights' shape): `deepseek-ai/DeepSeek-V3` config.json.
pub const DEEPSEEK_V3: MlaMoeShape = MlaMoeShape {
    architecture: "deepseek_v3",
    name: "DeepSeek-V3 671B Q4_K_M (published config)",
    n_layers: 61,
    hidden: 7168,
    vocab: 129_280,
    context: 163_840,
    heads: 128,
    q_lora_rank: 1536,
    kv_lora_rank: 512,
    qk_nope_head_dim: 128,
    qk_rope_head_dim: 64,
    v_head_dim: 128,
    dense_layers: 3,
    dense_ff: 18_432,
    routed_experts: 256,
    shared_experts: 1,
    moe_ff: 2048,
};

/// Kimi K2 (`moonshotai/Kimi-K2-Instruct` config.json): the V3 graph with 384 experts, 64 heads,
/// one dense layer.
pub const KIMI_K2: MlaMoeShape = MlaMoeShape {
    architecture: "deepseek_v3",
    name: "Kimi K2 1T Q4_K_M (published config)",
    n_layers: 61,
    hidden: 7168,
    vocab: 163_840,
    context: 131_072,
    heads: 64,
    q_lora_rank: 1536,
    kv_lora_rank: 512,
    qk_nope_head_dim: 128,
    qk_rope_head_dim: 64,
    v_head_dim: 128,
    dense_layers: 1,
    dense_ff: 18_432,
    routed_experts: 384,
    shared_experts: 1,
    moe_ff: 2048,
};

/// Names accepted by [`by_name`], for a CLI's `--model published:<name>`.
pub const NAMES: [&str; 3] = ["deepseek-v3-671b-q4_k_m", "deepseek-r1-671b-q4_k_m", "kimi-k2-q4_k_m"];

/// The manifest of a published model by name (see [`NAMES`]), case-insensitive.
pub fn by_name(name: &str) -> Option<Manifest> {
    match name.to_ascii_lowercase().as_str() {
        "deepseek-v3-671b-q4_k_m" => Some(deepseek_v3_671b_q4_k_m()),
        "deepseek-r1-671b-q4_k_m" => Some(Manifest {
            name: Some("DeepSeek-R1 671B Q4_K_M (published config)".into()),
            ..deepseek_v3_671b_q4_k_m()
        }),
        "kimi-k2-q4_k_m" => Some(q4_k_m(&KIMI_K2)),
        _ => None,
    }
}

/// DeepSeek-V3 671B at Q4_K_M: 61 layers (3 dense), ~404 GB, 1152 KV bytes per token per layer.
pub fn deepseek_v3_671b_q4_k_m() -> Manifest {
    q4_k_m(&DEEPSEEK_V3)
}

#[derive(Clone, Copy)]
enum Ty {
    F32,
    Q4K,
    Q6K,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::F32 => "f32",
            Ty::Q4K => "q4_k",
            Ty::Q6K => "q6_k",
        }
    }

    /// Stored bytes of `n` weights; K-quant rows are whole 256-weight blocks in these shapes.
    fn bytes(self, n: usize) -> u64 {
        let n = n as u64;
        match self {
            Ty::F32 => 4 * n,
            Ty::Q4K => n / 256 * 144,
            Ty::Q6K => n / 256 * 210,
        }
    }
}

/// llama.cpp's `use_more_bits`: the layers whose `ffn_down` Q4_K_M stores as Q6_K.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The Q4_K_M manifest of an MLA + MoE model from its published shape.
pub fn q4_k_m(s: &MlaMoeShape) -> Manifest {
    let mut by_dtype: BTreeMap<String, u64> = BTreeMap::new();
    let mut add = |ty: Ty, n: usize| {
        let b = ty.bytes(n);
        *by_dtype.entry(ty.name().into()).or_default() += b;
        b
    };
    let h = s.hidden;
    let layer_bytes = (0..s.n_layers)
        .map(|i| {
            let down = if use_more_bits(i, s.n_layers) { Ty::Q6K } else { Ty::Q4K };
            let mut b = 0;
            // attn_norm, ffn_norm, attn_q_a_norm, attn_kv_a_norm
            b += add(Ty::F32, 2 * h + s.q_lora_rank + s.kv_lora_rank);
            b += add(Ty::Q4K, h * s.q_lora_rank); // attn_q_a
            b += add(Ty::Q4K, s.q_lora_rank * s.heads * (s.qk_nope_head_dim + s.qk_rope_head_dim)); // attn_q_b
            b += add(Ty::Q4K, h * (s.kv_lora_rank + s.qk_rope_head_dim)); // attn_kv_a_mqa
            b += add(Ty::Q4K, s.kv_lora_rank * s.heads * (s.qk_nope_head_dim + s.v_head_dim)); // attn_kv_b
            b += add(Ty::Q4K, s.heads * s.v_head_dim * h); // attn_output
            if i < s.dense_layers {
                b += add(Ty::Q4K, 2 * h * s.dense_ff); // ffn_gate, ffn_up
                b += add(down, s.dense_ff * h); // ffn_down
            } else {
                b += add(Ty::F32, h * s.routed_experts + s.routed_experts); // ffn_gate_inp, exp_probs_b
                b += add(Ty::Q4K, 2 * s.routed_experts * h * s.moe_ff); // ffn_{gate,up}_exps
                b += add(down, s.routed_experts * s.moe_ff * h); // ffn_down_exps
                let shared_ff = s.shared_experts * s.moe_ff;
                b += add(Ty::Q4K, 2 * h * shared_ff); // ffn_{gate,up}_shexp
                b += add(down, shared_ff * h); // ffn_down_shexp
            }
            b
        })
        .collect();
    let embedding_bytes = add(Ty::Q4K, s.vocab * h);
    let head_bytes = add(Ty::F32, h) + add(Ty::Q6K, h * s.vocab);
    let kv_per_token = ((s.kv_lora_rank + s.qk_rope_head_dim) * 2) as u64;
    Manifest {
        architecture: s.architecture.into(),
        name: Some(s.name.into()),
        format: "gguf".into(),
        n_layers: s.n_layers,
        hidden_size: h,
        vocab_size: s.vocab,
        context_length: s.context,
        layer_bytes,
        embedding_bytes,
        head_bytes,
        kv_bytes_per_token: vec![kv_per_token; s.n_layers],
        kv_dtype: "f16".into(),
        activation_bytes_per_token: (h * 4) as u64,
        bytes_by_dtype: by_dtype,
    }
}
