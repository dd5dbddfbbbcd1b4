//! The mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) and DeepSeek-V3 (latent
//! attention + grouped sigmoid routing) against transformers' reference logits, from safetensors
//! and GGUF; splits, batching, and the size of the latent cache.

mod common;

use baton_model::kv_cache::GROW_TOKENS;
use baton_model::pipeline::{even_split, LocalPipeline, WireDType};
use baton_model::shard::{BatchInput, Logits, MicroBatch, SeqChunk, Shard, ShardOutput};
use candle_core::{Device, Tensor};
use common::*;

const MOE: [&str; 4] = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"];

fn reference_tensors(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn hidden_of(shard: &mut Shard, ids: &[u32]) -> Tensor {
    shard.open_sequence(1).unwrap();
    let batch = MicroBatch {
        seqs: vec![SeqChunk { seq_id: 1, start_pos: 0, n_tokens: ids.len() }],
        input: BatchInput::Tokens(ids.to_vec()),
    };
    let out = shard.forward_with(&batch, Logits::AllTokens).unwrap();
    shard.close_sequence(1).unwrap();
    match out {
        ShardOutput::Hidden(h) => h,
        ShardOutput::Logits(_) => panic!("a shard before the last returns hidden states"),
    }
}

/// The residual stream after every layer, so a wrong layer is named rather than only the logits.
#[test]
fn residual_after_each_layer_matches_transformers() {
    for name in MOE {
        let source = open(&fixture(name));
        let n = source.config().n_layers;
        let refs = reference_tensors(name);
        for end in 1..n {
            let mut shard = Shard::load(&source, 0..end, &Device::Cpu).unwrap();
            for (p, (ids, _)) in reference(name).iter().enumerate() {
                let ours = hidden_of(&mut shard, ids);
                let want = &refs[&format!("hidden.{p}.{}", end - 1)];
                let err = rel_err(&ours, want);
                assert!(err < 1e-4, "{name} prompt {p}: residual after layer {} off by {err}", end - 1);
            }
        }
    }
}

#[test]
fn safetensors_match_transformers() {
    for name in MOE {
        let source = open(&fixture(name));
        let mut shard = full_shard(&source);
        for (i, (ids, reference)) in reference(name).iter().enumerate() {
            let ours = all_logits(&mut shard, i as u64, ids);
            let err = rel_err(&ours, reference);
            assert!(err < 1e-4, "{name} prompt {i}: relative error {err} vs transformers");
        }
    }
}

/// llama.cpp's own logits for the Q8_0 file.
fn llama_cpp_q8(name: &str) -> Vec<Tensor> {
    let t = candle_core::safetensors::load(fixture(name).join("llama_cpp_q8_0.safetensors"), &Device::Cpu).unwrap();
    (0..).map_while(|i| t.get(&format!("logits.{i}")).cloned()).collect()
}

#[test]
fn gguf_f32_matches_transformers_and_q8_0_is_close() {
    for name in MOE {
        let st = open(&fixture(name));
        let f32 = open(&fixture(name).join("model-f32.gguf"));
        let q8 = open(&fixture(name).join("model-q8_0.gguf"));
        assert_eq!(f32.config().moe, st.config().moe, "{name}: GGUF and config.json describe different experts");
        assert_eq!(f32.config().mla, st.config().mla, "{name}: GGUF and config.json describe different attention");
        let (mut st, mut f32, mut q8) = (full_shard(&st), full_shard(&f32), full_shard(&q8));
        let cpp = llama_cpp_q8(name);
        let (mut ours_total, mut cpp_total) = (0.0, 0.0);
        for (i, (ids, reference)) in reference(name).iter().enumerate() {
            let a = all_logits(&mut st, 0, ids);
            let b = all_logits(&mut f32, 0, ids);
            let c = all_logits(&mut q8, 0, ids);
            let err = rel_err(&b, reference);
            assert!(err < 1e-4, "{name} prompt {i}: GGUF-F32 relative error {err} vs transformers");
            let err = rel_err(&b, &a);
            assert!(err < 1e-5, "{name} prompt {i}: GGUF-F32 differs from safetensors by {err}");
            // Q8_0 rounds the weights; on the CPU our activations stay f32 (baton_model::matmul)
            // while llama.cpp rounds them to Q8 blocks too, so the two differ by about that
            // rounding (measured 1.0-7.0 %), and rounding noise can flip an expert choice, which
            // moves a MoE model's logits far from the float reference for both.
            let vs_cpp = rel_err(&c, &cpp[i]);
            let vs_ref = rel_err(&c, reference);
            let cpp_vs_ref = rel_err(&cpp[i], reference);
            eprintln!("{name} prompt {i}: Q8_0 vs llama.cpp Q8_0 {vs_cpp:.2e}, vs float reference {vs_ref:.2e}, llama.cpp vs float reference {cpp_vs_ref:.2e}");
            ours_total += vs_ref;
            cpp_total += cpp_vs_ref;
            assert!(vs_cpp < 0.1, "{name} prompt {i}: GGUF-Q8_0 relative error {vs_cpp} vs llama.cpp Q8_0");
            assert!(vs_ref < 0.25, "{name} prompt {i}: GGUF-Q8_0 relative error {vs_ref} vs transformers");
        }
        // Over the prompts, at least as close to the float model as llama.cpp on the same file.
        assert!(ours_total <= cpp_total, "{name}: Q8_0 error {ours_total} in total exceeds llama.cpp's {cpp_total}");
    }
}

fn splits(n: usize, parts: usize) -> Vec<Vec<std::ops::Range<usize>>> {
    let mut out = Vec::new();
    match parts {
        2 => (1..n).for_each(|a| out.push(vec![0..a, a..n])),
        3 => (1..n).for_each(|a| (a + 1..n).for_each(|b| out.push(vec![0..a, a..b, b..n]))),
        _ => unreachable!("2 or 3 parts"),
    }
    out
}

fn pipeline_logits(p: &mut LocalPipeline, ids: &[u32]) -> Tensor {
    p.open_sequence(7).unwrap();
    let batch = MicroBatch {
        seqs: vec![SeqChunk { seq_id: 7, start_pos: 0, n_tokens: ids.len() }],
        input: BatchInput::Tokens(ids.to_vec()),
    };
    let l = p.forward(&batch, Logits::AllTokens).unwrap();
    p.close_sequence(7).unwrap();
    l
}

#[test]
fn every_split_is_bit_identical_with_f32_wire() {
    for name in MOE {
        for file in [None, Some("model-q8_0.gguf")] {
            let path = file.map_or_else(|| fixture(name), |f| fixture(name).join(f));
            let source = open(&path);
            let n = source.config().n_layers;
            let mut whole = LocalPipeline::load(&source, &even_split(n, 1).unwrap(), WireDType::F32, &Device::Cpu).unwrap();
            let prompts = reference(name);
            let refs: Vec<Tensor> = prompts.iter().map(|(ids, _)| pipeline_logits(&mut whole, ids)).collect();
            let all: Vec<_> = splits(n, 2).into_iter().chain(splits(n, 3)).collect();
            assert!(!all.is_empty());
            for ranges in all {
                let mut p = LocalPipeline::load(&source, &ranges, WireDType::F32, &Device::Cpu).unwrap();
                for ((ids, _), r) in prompts.iter().zip(&refs) {
                    let l = pipeline_logits(&mut p, ids);
                    let diff = (&l - r).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                    assert_eq!(diff, 0.0, "{name} {path:?} split {ranges:?}: f32 wire not bit-identical");
                }
            }
        }
    }
}

#[test]
fn batched_sequences_equal_each_alone() {
    for name in MOE {
        let source = open(&fixture(name));
        let mut shard = full_shard(&source);
        let prompts: Vec<Vec<u32>> = reference(name).into_iter().map(|(ids, _)| ids).collect();
        let alone: Vec<Tensor> = prompts.iter().enumerate().map(|(i, ids)| all_logits(&mut shard, 100 + i as u64, ids)).collect();

        // Prefill all three in one micro-batch, then decode one token of each in another.
        let split = |ids: &Vec<u32>| ids.len() - 1;
        let mut seqs = Vec::new();
        let mut tokens = Vec::new();
        for (i, ids) in prompts.iter().enumerate() {
            shard.open_sequence(i as u64).unwrap();
            seqs.push(SeqChunk { seq_id: i as u64, start_pos: 0, n_tokens: split(ids) });
            tokens.extend_from_slice(&ids[..split(ids)]);
        }
        let ShardOutput::Logits(prefill) = shard.forward_with(&MicroBatch { seqs, input: BatchInput::Tokens(tokens) }, Logits::AllTokens).unwrap() else { panic!() };
        let mut seqs = Vec::new();
        let mut tokens = Vec::new();
        for (i, ids) in prompts.iter().enumerate() {
            seqs.push(SeqChunk { seq_id: i as u64, start_pos: split(ids), n_tokens: 1 });
            tokens.push(ids[split(ids)]);
        }
        let ShardOutput::Logits(decode) = shard.forward(&MicroBatch { seqs, input: BatchInput::Tokens(tokens) }).unwrap() else { panic!() };

        let mut offset = 0;
        for (i, ids) in prompts.iter().enumerate() {
            let n = split(ids);
            let got = prefill.narrow(0, offset, n).unwrap();
            offset += n;
            let err = rel_err(&got, &alone[i].narrow(0, 0, n).unwrap());
            assert!(err < 1e-5, "{name} seq {i}: batched prefill differs from alone by {err}");
            let err = rel_err(&decode.get(i).unwrap(), &alone[i].get(n).unwrap());
            assert!(err < 1e-5, "{name} seq {i}: batched decode differs from alone by {err}");
            shard.close_sequence(i as u64).unwrap();
        }
        assert_eq!(shard.kv_bytes(), 0, "closing every sequence frees its cache");
    }
}

/// Decoding token by token through the cache equals one full-sequence forward.
#[test]
fn incremental_decode_equals_full_forward() {
    for name in MOE {
        let source = open(&fixture(name));
        let mut shard = full_shard(&source);
        for (ids, reference) in reference(name) {
            shard.open_sequence(5).unwrap();
            for (pos, &id) in ids.iter().enumerate() {
                let batch = MicroBatch {
                    seqs: vec![SeqChunk { seq_id: 5, start_pos: pos, n_tokens: 1 }],
                    input: BatchInput::Tokens(vec![id]),
                };
                let ShardOutput::Logits(l) = shard.forward(&batch).unwrap() else { panic!() };
                let err = rel_err(&l.get(0).unwrap(), &reference.get(pos).unwrap());
                assert!(err < 1e-4, "{name} position {pos}: decode relative error {err}");
            }
            shard.close_sequence(5).unwrap();
        }
    }
}

/// The MLA cache holds `kv_lora_rank + qk_rope_head_dim` f32 values per token per layer,
/// measured from what the shard allocates (growth chunks of `GROW_TOKENS` tokens).
#[test]
fn mla_cache_bytes_per_token_per_layer() {
    for file in [None, Some("model-q8_0.gguf")] {
        let path = file.map_or_else(|| fixture("deepseek_v3"), |f| fixture("deepseek_v3").join(f));
        let source = open(&path);
        let cfg = source.config().clone();
        let mla = cfg.mla.clone().unwrap();
        let expected = ((mla.kv_lora_rank + mla.qk_rope_head_dim) * 4) as u64;
        assert_eq!(expected, 320);
        assert_eq!(source.manifest().kv_bytes_per_token, vec![expected; cfg.n_layers]);
        for range in [0..cfg.n_layers, 1..cfg.n_layers] {
            let mut shard = Shard::load(&source, range.clone(), &Device::Cpu).unwrap();
            let layers = range.len() as u64;
            shard.open_sequence(3).unwrap();
            assert_eq!(shard.kv_bytes(), 0, "an open sequence without tokens holds nothing");
            let tokens = 13;
            let input = if shard.is_first() {
                BatchInput::Tokens((0..tokens as u32).collect())
            } else {
                BatchInput::Hidden(Tensor::zeros((tokens, cfg.hidden_size), candle_core::DType::F32, &Device::Cpu).unwrap())
            };
            shard.forward(&MicroBatch { seqs: vec![SeqChunk { seq_id: 3, start_pos: 0, n_tokens: tokens }], input }).unwrap();
            let allocated_tokens = tokens.div_ceil(GROW_TOKENS) * GROW_TOKENS;
            let per_token_layer = shard.kv_bytes() / (layers * allocated_tokens as u64);
            assert_eq!(shard.kv_bytes() % (layers * allocated_tokens as u64), 0);
            eprintln!("{path:?} layers {range:?}: {} bytes cached for {tokens} tokens ({allocated_tokens} allocated) = {per_token_layer} bytes/token/layer", shard.kv_bytes());
            assert_eq!(per_token_layer, expected);
            // A full per-head K/V cache would need 2 · heads · (qk_head_dim | v_head_dim) values.
            let full = (cfg.n_heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim) * 4) as u64;
            assert!(per_token_layer * 2 < full, "latent cache {per_token_layer} vs full {full}");
        }
    }
}
