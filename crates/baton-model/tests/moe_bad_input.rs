//! Inconsistent MoE / MLA configurations are refused with an error naming the problem.

mod common;

use baton_model::loader::ModelSource;
use common::*;

/// A copy of fixture `name` whose config.json is edited by `edit`; returns the open error.
fn open_edited(name: &str, edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(fixture(name).join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    match ModelSource::open(dir.path()) {
        Ok(_) => panic!("{name}: the edited config opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_latent_rank_is_named() {
    let msg = open_edited("deepseek_v3", |c| {
        c.remove("kv_lora_rank");
    });
    assert!(msg.contains("kv_lora_rank"), "{msg}");
}

#[test]
fn more_experts_per_token_than_experts_is_refused() {
    let msg = open_edited("qwen3_moe", |c| {
        c.insert("num_experts_per_tok".into(), 7.into());
    });
    assert!(msg.contains("experts"), "{msg}");
}

#[test]
fn groups_that_cannot_supply_top_k_are_refused() {
    // 4 groups of 3 experts, 1 group kept: at most 3 experts, but 4 are asked for.
    let msg = open_edited("deepseek_v3", |c| {
        c.insert("topk_group".into(), 1.into());
    });
    assert!(msg.contains("groups"), "{msg}");
}
