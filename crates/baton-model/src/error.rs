use std::path::PathBuf;

/// Everything that can go wrong opening or running a model, each naming what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model file {path} is not a valid {format} file: {reason}")]
    Format {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("unsupported architecture `{0}` (supported: llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, deepseek_v3 / deepseek2, kimi_k2)")]
    UnsupportedArchitecture(String),
    #[error("missing metadata `{key}` in {path}")]
    MissingMetadata { path: PathBuf, key: String },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("tensor `{name}` not found in {path}")]
    MissingTensor { name: String, path: PathBuf },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("layer range [{start}, {end}) is outside the model's {n_layers} layers")]
    LayerRange {
        start: usize,
        end: usize,
        n_layers: usize,
    },
    #[error("sequence {0} is not open on this shard")]
    UnknownSequence(u64),
    #[error("sequence {0} is already open on this shard")]
    SequenceExists(u64),
    #[error("bad micro-batch: {0}")]
    Batch(String),
    #[error("context length exceeded for sequence {seq}: {needed} tokens > {max}")]
    ContextLength { seq: u64, needed: usize, max: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("sampling: {0}")]
    Sampling(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
