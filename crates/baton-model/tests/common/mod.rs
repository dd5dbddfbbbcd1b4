//! Shared helpers for tests against the committed fixtures and the fetched real models.
#![allow(dead_code)]

use std::path::PathBuf;

use baton_model::loader::ModelSource;
use baton_model::shard::{BatchInput, Logits, MicroBatch, SeqChunk, Shard, ShardOutput};
use candle_core::{Device, Tensor};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// A real model fetched by `scripts/fetch-models.sh`; missing is a failure, not a skip.
pub fn real_model(file: &str) -> PathBuf {
    let dir = std::env::var_os("BATON_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/baton/models"));
    let path = dir.join(file);
    assert!(path.exists(), "{} is missing: run scripts/fetch-models.sh --all", path.display());
    path
}

/// The reference prompts and transformers' logits for every position.
pub fn reference(name: &str) -> Vec<(Vec<u32>, Tensor)> {
    reference_file(name, "reference.safetensors")
}

/// Prompts and logits from one of a fixture's reference files.
pub fn reference_file(name: &str, file: &str) -> Vec<(Vec<u32>, Tensor)> {
    let path = fixture(name).join(file);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (0..)
        .map_while(|i| {
            let ids = tensors.get(&format!("ids.{i}"))?;
            let logits = tensors.get(&format!("logits.{i}"))?;
            let ids: Vec<u32> = ids.to_dtype(candle_core::DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect();
            Some((ids, logits.clone()))
        })
        .collect()
}

/// max |a - b| / max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(1e-12)
}

pub fn open(path: &std::path::Path) -> ModelSource {
    ModelSource::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

pub fn full_shard(source: &ModelSource) -> Shard {
    Shard::load(source, 0..source.config().n_layers, &Device::Cpu).unwrap()
}

/// Every position's logits for `ids` run as one fresh sequence through `shard`.
pub fn all_logits(shard: &mut Shard, seq_id: u64, ids: &[u32]) -> Tensor {
    shard.open_sequence(seq_id).unwrap();
    let batch = MicroBatch {
        seqs: vec![SeqChunk { seq_id, start_pos: 0, n_tokens: ids.len() }],
        input: BatchInput::Tokens(ids.to_vec()),
    };
    let out = shard.forward_with(&batch, Logits::AllTokens).unwrap();
    shard.close_sequence(seq_id).unwrap();
    match out {
        ShardOutput::Logits(l) => l,
        ShardOutput::Hidden(_) => panic!("a full shard returns logits"),
    }
}
