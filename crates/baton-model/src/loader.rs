//! Opening a model path of any supported format: a `.gguf` file (or one part of a split set),
//! or an HF directory with `config.json` and safetensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::Device;

use crate::config::ModelConfig;
use crate::layers::Names;
use crate::manifest::Manifest;
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufSet, SafetensorsSet, TensorStore};
use crate::{ModelError, Result};

/// A model's configuration and tensor index, opened from headers; weights are read per shard.
pub struct ModelSource {
    path: PathBuf,
    config: ModelConfig,
    store: TensorStore,
    name: Option<String>,
}

impl ModelSource {
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            return Self::open_hf_dir(path);
        }
        if path.file_name().is_some_and(|n| n == "config.json" || n.to_string_lossy().ends_with(".safetensors")) {
            return Self::open_hf_dir(path.parent().unwrap_or(Path::new(".")));
        }
        Self::open_gguf(path)
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let set = GgufSet::open(path)?;
        let store = TensorStore::Gguf(set);
        let rope_freqs = match store.meta("rope_freqs.weight") {
            Some(m) => Some(
                store
                    .dense("rope_freqs.weight", &m.shape, &Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            None => None,
        };
        let g = store.gguf().expect("just built from GGUF");
        let config = ModelConfig::from_gguf(path, g.metadata(), &|n| store.contains(n), rope_freqs)?;
        let name = match g.metadata().get("general.name") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Ok(Self {
            path: path.to_path_buf(),
            config,
            store,
            name,
        })
    }

    fn open_hf_dir(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_hf_json(&dir.join("config.json"))?;
        let store = TensorStore::Safetensors(SafetensorsSet::open(dir)?);
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        Ok(Self {
            path: dir.to_path_buf(),
            config,
            store,
            name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn store(&self) -> &TensorStore {
        &self.store
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The tokenizer: `tokenizer.json` beside an HF model or the GGUF's embedded vocabulary.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.store {
            TensorStore::Gguf(g) => {
                let dir = self.path.parent().unwrap_or(Path::new("."));
                if dir.join("tokenizer.json").exists() && g.metadata().get("tokenizer.ggml.tokens").is_none() {
                    Tokenizer::from_hf_dir(dir)
                } else {
                    Tokenizer::from_gguf(g.metadata())
                }
            }
            TensorStore::Safetensors(_) => Tokenizer::from_hf_dir(&self.path),
        }
    }

    /// Per-layer costs from the headers: no weight is read.
    pub fn manifest(&self) -> Manifest {
        let cfg = &self.config;
        let names = Names::for_store(&self.store);
        let all = self.store.all_meta();
        let mut layer_bytes = vec![0u64; cfg.n_layers];
        let mut embedding_bytes = 0;
        let mut head_bytes = 0;
        let mut bytes_by_dtype: BTreeMap<String, u64> = BTreeMap::new();
        let prefixes: Vec<String> = (0..cfg.n_layers).map(|i| names.layer_prefix(i)).collect();
        for (name, m) in &all {
            *bytes_by_dtype.entry(m.dtype.clone()).or_default() += m.bytes;
            if name == names.embedding() {
                embedding_bytes += m.bytes;
                if cfg.tie_word_embeddings {
                    head_bytes += m.bytes;
                }
            } else if name == names.output() || name == names.output_norm() {
                head_bytes += m.bytes;
            } else if let Some(i) = prefixes.iter().position(|p| name.starts_with(p.as_str())) {
                layer_bytes[i] += m.bytes;
            } else if name == "rope_freqs.weight" {
                // A few floats every stage reads into its config; they belong to no layer.
                embedding_bytes += m.bytes;
            }
        }
        let kv_dtype_size = 4;
        Manifest {
            architecture: cfg.family.as_str().to_string(),
            name: self.name.clone(),
            format: self.store.format().to_string(),
            n_layers: cfg.n_layers,
            hidden_size: cfg.hidden_size,
            vocab_size: cfg.vocab_size,
            context_length: cfg.context_length,
            layer_bytes,
            embedding_bytes,
            head_bytes,
            kv_bytes_per_token: vec![cfg.kv_bytes_per_token_layer(kv_dtype_size); cfg.n_layers],
            kv_dtype: "f32".into(),
            activation_bytes_per_token: (cfg.hidden_size * 4) as u64,
            bytes_by_dtype,
        }
    }

    /// Every file of the model (all parts of a split GGUF; the HF directory's weight files).
    pub fn files(&self) -> Vec<PathBuf> {
        match &self.store {
            TensorStore::Gguf(g) => g.part_paths(),
            TensorStore::Safetensors(_) => vec![self.path.clone()],
        }
    }
}

/// The manifest of the model at `path`, from headers alone.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    Ok(ModelSource::open(path)?.manifest())
}
