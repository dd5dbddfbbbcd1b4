//! Where a model's tensors live, and reading only the ones a shard needs.
//!
//! GGUF (single file or a split `-0000N-of-0000M.gguf` set, indexed by every part's header) and
//! HF safetensors (one file or sharded through `model.safetensors.index.json`, memory-mapped).
//! Quantized GGUF tensors are returned as [`QTensor`]s and stay quantized.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::matmul::Matmul;
use crate::{ModelError, Result};

/// Storage facts about one tensor, from headers only.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    /// Lower-case storage type: `q4_k`, `q8_0`, `f32`, `bf16`, ...
    pub dtype: String,
    pub bytes: u64,
}

/// Tensors of one model, in whichever format they are stored.
pub enum TensorStore {
    Gguf(GgufSet),
    Safetensors(SafetensorsSet),
}

impl TensorStore {
    pub fn format(&self) -> &'static str {
        match self {
            TensorStore::Gguf(_) => "gguf",
            TensorStore::Safetensors(_) => "safetensors",
        }
    }

    pub fn meta(&self, name: &str) -> Option<TensorMeta> {
        match self {
            TensorStore::Gguf(g) => g.meta(name),
            TensorStore::Safetensors(s) => s.meta(name),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.meta(name).is_some()
    }

    /// Every tensor's metadata, by name.
    pub fn all_meta(&self) -> BTreeMap<String, TensorMeta> {
        match self {
            TensorStore::Gguf(g) => g
                .index
                .keys()
                .filter_map(|n| g.meta(n).map(|m| (n.clone(), m)))
                .collect(),
            TensorStore::Safetensors(s) => s
                .st
                .tensors()
                .into_iter()
                .map(|(n, v)| (n, safetensors_meta(&v)))
                .collect(),
        }
    }

    /// Path of the file holding `name`, for error messages.
    pub fn path_of(&self, name: &str) -> PathBuf {
        match self {
            TensorStore::Gguf(g) => g
                .index
                .get(name)
                .map(|&part| g.parts[part].path.clone())
                .unwrap_or_else(|| g.parts[0].path.clone()),
            TensorStore::Safetensors(s) => s.dir.clone(),
        }
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor {
            name: name.to_string(),
            path: self.path_of(name),
        }
    }

    fn check_shape(name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
        if actual != expected {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: actual.to_vec(),
            });
        }
        Ok(())
    }

    /// A weight matrix for `x @ W^T`, quantized where the file is. `shape` is `[out, in]`.
    pub fn matmul(&self, name: &str, shape: &[usize], device: &Device) -> Result<Matmul> {
        match self {
            TensorStore::Gguf(_) => Ok(Matmul::from_qtensor(self.qtensor(name, shape, device)?)?),
            TensorStore::Safetensors(_) => Ok(Matmul::dense(self.dense(name, shape, device)?)),
        }
    }

    /// The raw quantized tensor (GGUF only; safetensors tensors are wrapped as F32).
    pub fn qtensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Arc<QTensor>> {
        match self {
            TensorStore::Gguf(g) => {
                let (part, info) = g.info(name).ok_or_else(|| self.missing(name))?;
                Self::check_shape(name, info.shape.dims(), shape)?;
                let mut file = File::open(&part.path).map_err(|source| ModelError::Io {
                    path: part.path.clone(),
                    source,
                })?;
                let q = info
                    .read(&mut file, part.content.tensor_data_offset, device)
                    .map_err(|e| ModelError::Format {
                        path: part.path.clone(),
                        format: "GGUF",
                        reason: format!("tensor `{name}`: {e}"),
                    })?;
                Ok(Arc::new(q))
            }
            TensorStore::Safetensors(_) => {
                let t = self.dense(name, shape, device)?;
                Ok(Arc::new(QTensor::quantize(&t, GgmlDType::F32)?))
            }
        }
    }

    /// One weight matrix per slice of a stacked `[n, out, in]` tensor (llama.cpp's `*_exps`
    /// experts). From GGUF each slice's bytes are read from the file as stored, so quantized
    /// experts stay quantized and nothing outside the tensor is read.
    pub fn stacked_matmuls(&self, name: &str, shape: [usize; 3], device: &Device) -> Result<Vec<Matmul>> {
        let [n, out, inp] = shape;
        match self {
            TensorStore::Gguf(g) => {
                let (part, info) = g.info(name).ok_or_else(|| self.missing(name))?;
                Self::check_shape(name, info.shape.dims(), &shape)?;
                let dtype = info.ggml_dtype;
                let format_err = |reason: String| ModelError::Format {
                    path: part.path.clone(),
                    format: "GGUF",
                    reason: format!("tensor `{name}`: {reason}"),
                };
                if (out * inp) % dtype.block_size() != 0 {
                    return Err(format_err(format!(
                        "a {out}x{inp} slice is not a whole number of {dtype:?} blocks"
                    )));
                }
                let slice_bytes = out * inp / dtype.block_size() * dtype.type_size();
                let io = |source| ModelError::Io {
                    path: part.path.clone(),
                    source,
                };
                let mut file = File::open(&part.path).map_err(io)?;
                file.seek(SeekFrom::Start(part.content.tensor_data_offset + info.offset))
                    .map_err(io)?;
                let mut buf = vec![0u8; slice_bytes];
                (0..n)
                    .map(|_| {
                        file.read_exact(&mut buf).map_err(io)?;
                        let q = qtensor_from_ggml(dtype, &buf, vec![out, inp], device)
                            .map_err(|e| format_err(e.to_string()))?;
                        Ok(Matmul::from_qtensor(Arc::new(q))?)
                    })
                    .collect()
            }
            TensorStore::Safetensors(_) => {
                let t = self.dense(name, &shape, device)?;
                (0..n).map(|e| Ok(Matmul::dense(t.get(e)?))).collect()
            }
        }
    }

    /// A tensor as f32 (norm weights, biases, embeddings of unquantized files).
    pub fn dense(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        match self {
            TensorStore::Gguf(_) => Ok(self.qtensor(name, shape, device)?.dequantize(device)?),
            TensorStore::Safetensors(s) => {
                let view = s.st.get(name).map_err(|_| self.missing(name))?;
                Self::check_shape(name, view.shape(), shape)?;
                let t = s.st.load(name, device).map_err(|e| ModelError::Format {
                    path: s.dir.clone(),
                    format: "safetensors",
                    reason: format!("tensor `{name}`: {e}"),
                })?;
                Ok(t.to_dtype(DType::F32)?)
            }
        }
    }

    pub fn gguf(&self) -> Option<&GgufSet> {
        match self {
            TensorStore::Gguf(g) => Some(g),
            TensorStore::Safetensors(_) => None,
        }
    }
}

struct GgufPart {
    path: PathBuf,
    content: Content,
}

/// A GGUF model: one file, or every part of a split set, indexed by tensor name.
pub struct GgufSet {
    parts: Vec<GgufPart>,
    index: HashMap<String, usize>,
}

impl GgufSet {
    /// Opens `path`; when it names one part of a split set, every part is indexed.
    pub fn open(path: &Path) -> Result<Self> {
        let paths = split_parts(path)?;
        let mut parts = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, p) in paths.into_iter().enumerate() {
            let content = read_gguf_header(&p)?;
            for name in content.tensor_infos.keys() {
                if index.insert(name.clone(), i).is_some() {
                    return Err(ModelError::Format {
                        path: p.clone(),
                        format: "GGUF",
                        reason: format!("tensor `{name}` appears in more than one part"),
                    });
                }
            }
            parts.push(GgufPart { path: p, content });
        }
        Ok(Self { parts, index })
    }

    /// The first part's metadata (llama.cpp writes the model's metadata there).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.parts[0].content.metadata
    }

    pub fn path(&self) -> &Path {
        &self.parts[0].path
    }

    pub fn part_paths(&self) -> Vec<PathBuf> {
        self.parts.iter().map(|p| p.path.clone()).collect()
    }

    fn info(&self, name: &str) -> Option<(&GgufPart, &TensorInfo)> {
        let part = &self.parts[*self.index.get(name)?];
        Some((part, part.content.tensor_infos.get(name)?))
    }

    fn meta(&self, name: &str) -> Option<TensorMeta> {
        let (_, info) = self.info(name)?;
        let elems = info.shape.elem_count() as u64;
        let dtype = info.ggml_dtype;
        Some(TensorMeta {
            shape: info.shape.dims().to_vec(),
            dtype: format!("{dtype:?}").to_lowercase(),
            bytes: elems / dtype.block_size() as u64 * dtype.type_size() as u64,
        })
    }
}

fn read_gguf_header(path: &Path) -> Result<Content> {
    let mut file = File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let content = Content::read(&mut file).map_err(|e| ModelError::Format {
        path: path.to_path_buf(),
        format: "GGUF",
        reason: e.to_string(),
    })?;
    // Every tensor must lie inside the file: a truncated download fails here, at open, rather
    // than when the shard reaches that tensor.
    let len = file
        .metadata()
        .map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    for (name, info) in &content.tensor_infos {
        let dtype = info.ggml_dtype;
        let elems = info.shape.elem_count() as u64;
        let bytes = elems / dtype.block_size() as u64 * dtype.type_size() as u64;
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|o| o.checked_add(bytes));
        if end.is_none_or(|end| end > len) {
            return Err(ModelError::Format {
                path: path.to_path_buf(),
                format: "GGUF",
                reason: format!(
                    "tensor `{name}` ends past the end of the file ({len} bytes): truncated?"
                ),
            });
        }
    }
    Ok(content)
}

/// `model-00002-of-00005.gguf` → every part's path, in order; any other name → itself.
fn split_parts(path: &Path) -> Result<Vec<PathBuf>> {
    let io_err = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::metadata(path).map_err(io_err)?;
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let Some(stem) = file_name.strip_suffix(".gguf") else {
        return Ok(vec![path.to_path_buf()]);
    };
    // The suffix is `-NNNNN-of-MMMMM` (llama.cpp's gguf-split naming).
    let parsed = stem.rsplit_once("-of-").and_then(|(head, total)| {
        let (base, _) = head.rsplit_once('-')?;
        let part_len = head.len() - base.len() - 1;
        let total_n: usize = total.parse().ok()?;
        (total.len() == 5 && part_len == 5).then_some((base.to_string(), total_n))
    });
    let Some((base, total)) = parsed else {
        return Ok(vec![path.to_path_buf()]);
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    (1..=total)
        .map(|i| {
            let p = dir.join(format!("{base}-{i:05}-of-{total:05}.gguf"));
            if p.exists() {
                Ok(p)
            } else {
                Err(ModelError::Io {
                    path: p,
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("part {i} of the {total}-part split GGUF is missing"),
                    ),
                })
            }
        })
        .collect()
}

/// An HF safetensors model directory, memory-mapped.
pub struct SafetensorsSet {
    dir: PathBuf,
    st: MmapedSafetensors,
}

impl SafetensorsSet {
    /// Opens `model.safetensors`, or every file named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io {
                path: index_path.clone(),
                source,
            })?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let index: Index = serde_json::from_str(&text).map_err(|e| ModelError::Format {
                path: index_path.clone(),
                format: "safetensors index",
                reason: e.to_string(),
            })?;
            let mut files: Vec<String> = index.weight_map.into_values().collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        for f in &files {
            std::fs::metadata(f).map_err(|source| ModelError::Io {
                path: f.clone(),
                source,
            })?;
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on them not
        // being truncated while the process runs.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| ModelError::Format {
            path: dir.to_path_buf(),
            format: "safetensors",
            reason: e.to_string(),
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            st,
        })
    }

    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.st.get(name).ok().map(|v| safetensors_meta(&v))
    }
}

fn safetensors_meta(v: &safetensors::tensor::TensorView<'_>) -> TensorMeta {
    TensorMeta {
        shape: v.shape().to_vec(),
        dtype: format!("{:?}", v.dtype()).to_lowercase(),
        bytes: v.data().len() as u64,
    }
}
