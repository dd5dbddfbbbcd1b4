//! Bad model files and bad requests give errors that name what is wrong, never a panic.

mod common;

use baton_model::loader::ModelSource;
use baton_model::shard::{BatchInput, MicroBatch, SeqChunk, Shard};
use baton_model::ModelError;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;

fn open_err(path: &std::path::Path) -> String {
    match ModelSource::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.gguf");
    let msg = open_err(&path);
    assert!(msg.contains("absent.gguf"), "{msg}");
}

#[test]
fn truncated_gguf_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    let bytes = std::fs::read(fixture("llama").join("model-f32.gguf")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let msg = open_err(&path);
    assert!(msg.contains("cut.gguf") && msg.contains("truncated"), "{msg}");
}

#[test]
fn corrupt_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.gguf");
    std::fs::write(&path, b"this is not a GGUF file at all, just text").unwrap();
    let msg = open_err(&path);
    assert!(msg.contains("garbage.gguf") && msg.contains("GGUF"), "{msg}");

    // A valid magic followed by an absurd tensor count must not allocate or panic.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let msg = open_err(&path);
    assert!(msg.contains("garbage.gguf"), "{msg}");
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mamba.gguf");
    let t = QTensor::quantize(&Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let arch = Value::String("mamba".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("token_embd.weight", &t)]).unwrap();
    drop(f);
    let err = ModelSource::open(&path).err().expect("mamba is not supported");
    assert!(matches!(err, ModelError::UnsupportedArchitecture(ref a) if a == "mamba"), "{err}");
}

#[test]
fn tensor_of_the_wrong_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("qwen2")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let f = config["intermediate_size"].as_u64().unwrap();
    config["intermediate_size"] = (f + 8).into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let source = ModelSource::open(dir.path()).unwrap();
    let err = Shard::load(&source, 0..1, &Device::Cpu).err().expect("shape mismatch");
    let msg = err.to_string();
    assert!(msg.contains("model.layers.0.mlp.") && msg.contains("shape"), "{msg}");
}

#[test]
fn layer_range_outside_the_model_is_refused() {
    let source = open(&fixture("llama"));
    let n = source.config().n_layers;
    for range in [0..n + 1, 2..2, n..n + 2] {
        let err = Shard::load(&source, range.clone(), &Device::Cpu).err().expect("bad range");
        assert!(matches!(err, ModelError::LayerRange { .. }), "{range:?}: {err}");
        assert!(err.to_string().contains(&format!("{} layers", n)), "{err}");
    }
}

#[test]
fn bad_batches_are_refused_without_touching_caches() {
    let source = open(&fixture("llama"));
    let mut shard = full_shard(&source);
    shard.open_sequence(1).unwrap();
    let vocab = source.config().vocab_size as u32;
    let cases = [
        (vec![SeqChunk { seq_id: 2, start_pos: 0, n_tokens: 1 }], vec![1], "not open"),
        (vec![SeqChunk { seq_id: 1, start_pos: 3, n_tokens: 1 }], vec![1], "position"),
        (vec![SeqChunk { seq_id: 1, start_pos: 0, n_tokens: 2 }], vec![1], "input rows"),
        (vec![SeqChunk { seq_id: 1, start_pos: 0, n_tokens: 1 }], vec![vocab], "vocabulary"),
    ];
    for (seqs, ids, what) in cases {
        let err = shard.forward(&MicroBatch { seqs, input: BatchInput::Tokens(ids) }).err().expect(what);
        assert!(err.to_string().contains(what), "{what}: {err}");
        assert_eq!(shard.sequence_len(1), Some(0));
    }
    assert!(shard.open_sequence(1).is_err(), "a sequence cannot be opened twice");
}
