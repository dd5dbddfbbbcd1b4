//! Manifests: the published DeepSeek-V3 671B Q4_K_M shape, and the tiny MoE fixtures' headers.

mod common;

use baton_model::manifest::Manifest;
use baton_model::manifests::{self, DEEPSEEK_V3};
use common::*;

#[test]
fn deepseek_v3_671b_q4_k_m_has_the_published_shape() {
    let m = manifests::deepseek_v3_671b_q4_k_m();
    assert_eq!((m.n_layers, m.hidden_size, m.vocab_size, m.context_length), (61, 7168, 129_280, 163_840));
    // The latent cache: (kv_lora 512 + rope 64) f16 values per token per layer.
    assert_eq!(m.kv_bytes_per_token, vec![(512 + 64) * 2; 61]);
    assert_eq!(m.kv_dtype, "f16");
    // Three dense layers, then 58 MoE layers an order of magnitude larger.
    assert!(m.layer_bytes[..3].iter().all(|&b| b < 400_000_000));
    assert!(m.layer_bytes[3..].iter().all(|&b| b > 6_000_000_000));
    let total = m.total_weight_bytes();
    eprintln!("DeepSeek-V3 Q4_K_M: {total} bytes, {:.2} bits/weight", total as f64 * 8.0 / 671.0e9);
    // Published DeepSeek-V3 Q4_K_M GGUFs are ~404 GB (4.8 bits/weight over 671B parameters,
    // of which the MTP layer's ~11.5B are not in the file).
    assert!((400e9..410e9).contains(&(total as f64)), "{total}");
    assert_eq!(m.bytes_by_dtype.values().sum::<u64>(), total);
    // 8k context × 4 sequences of KV for the whole model: 2.3 GB.
    assert_eq!(m.stage_kv_bytes(0, 61, 8192 * 4), 61 * 1152 * 32768);
    // Round-trips through the JSON the planner reads.
    let json = serde_json::to_string(&m).unwrap();
    assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
    assert_eq!(DEEPSEEK_V3.routed_experts, 256);
}

/// The planner's test data (computed independently in crates/baton-cluster) agrees byte for byte.
#[test]
fn agrees_with_the_planner_test_data() {
    let path = repo_root().join("crates/baton-cluster/tests/data/deepseek-v3-q4_k_m.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        panic!("{} is missing", path.display());
    };
    let theirs: Manifest = serde_json::from_str(&text).unwrap();
    let ours = manifests::deepseek_v3_671b_q4_k_m();
    assert_eq!(ours.layer_bytes, theirs.layer_bytes);
    assert_eq!(ours.embedding_bytes, theirs.embedding_bytes);
    assert_eq!(ours.head_bytes, theirs.head_bytes);
    assert_eq!(ours.kv_bytes_per_token, theirs.kv_bytes_per_token);
    assert_eq!(ours.bytes_by_dtype, theirs.bytes_by_dtype);
}

#[test]
fn published_manifests_by_name() {
    for name in manifests::NAMES {
        let m = manifests::by_name(name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(m.architecture, "deepseek_v3");
        assert_eq!(m.layer_bytes.len(), m.n_layers);
    }
    assert_eq!(manifests::by_name("DeepSeek-V3-671B-Q4_K_M"), Some(manifests::deepseek_v3_671b_q4_k_m()));
    assert!(manifests::by_name("gpt-5").is_none());
    // Kimi K2: 384 experts, ~1T parameters.
    let k2 = manifests::by_name("kimi-k2-q4_k_m").unwrap();
    assert!(k2.total_weight_bytes() > 550_000_000_000, "{}", k2.total_weight_bytes());
}

/// The fixtures' manifests from headers: MLA's latent KV figure, MoE layers heavier than dense.
#[test]
fn fixture_manifests() {
    for file in ["model.safetensors", "model-f32.gguf", "model-q8_0.gguf"] {
        let m = open(&fixture("deepseek_v3").join(file)).manifest();
        assert_eq!(m.architecture, "deepseek_v3");
        assert_eq!(m.kv_bytes_per_token, vec![(64 + 16) * 4; 3], "{file}");
        assert!(m.layer_bytes[1] > m.layer_bytes[0], "{file}: MoE layer 1 vs dense layer 0: {:?}", m.layer_bytes);
        let m = open(&fixture("qwen3_moe").join(file)).manifest();
        assert_eq!(m.architecture, "qwen3_moe");
        assert_eq!(m.kv_bytes_per_token, vec![2 * 2 * 32 * 4; 3]);
    }
    let st = open(&fixture("mixtral")).manifest();
    let gguf = open(&fixture("mixtral").join("model-f32.gguf")).manifest();
    assert_eq!(st.layer_bytes, gguf.layer_bytes, "the same F32 weights, stacked or per expert");
}
