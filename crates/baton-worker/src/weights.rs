//! Weights for a worker without the model file: the head cuts exactly one shard's tensors out of
//! a GGUF model ([`ShardWeights`]); the worker receives them into a content-addressed cache
//! ([`Incoming`]), as a GGUF file it then loads like any other.
//!
//! The cached file keeps the model's metadata verbatim and lists every tensor of the model, but
//! only the shard's carry data: the others are empty placeholders. The model code decides some
//! settings from which tensors exist (tied embeddings, attention biases, QK norms), so the file
//! must list them all to configure the model exactly as the original does; a placeholder is never
//! read, because a stage reads only its own tensors (and would fail on a shape mismatch if it
//! did). Only GGUF (v2/v3) is supported; a safetensors model must be present on every worker.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use baton_proto::pb;
use baton_proto::weights_stream::{self, Accepted, ChunkSpan, Receiver};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}", path = .path.display())]
    Format { path: PathBuf, reason: String },
    #[error("weight set: {0}")]
    Set(String),
    #[error(transparent)]
    Stream(#[from] weights_stream::StreamError),
}

type Result<T> = std::result::Result<T, WeightsError>;

/// File name of a complete cached shard inside its directory.
pub const SHARD_FILE: &str = "shard.gguf";
const PART_SUFFIX: &str = ".part";
const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One tensor's entry in a GGUF header, as the file has it (dimensions in GGUF order).
#[derive(Debug, Clone)]
struct RawTensor {
    name: String,
    dims: Vec<u64>,
    dtype: u32,
    /// Offset within the part's data section.
    offset: u64,
}

/// What a GGUF header holds that the cut-out needs: the metadata bytes verbatim, the tensors and
/// where data starts.
struct RawHeader {
    version: u32,
    n_kv: u64,
    kv_bytes: Vec<u8>,
    tensors: Vec<RawTensor>,
    data_offset: u64,
    alignment: u64,
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Size in bytes of one scalar of GGUF value type `t`; `None` for strings and arrays.
fn scalar_size(t: u32) -> Option<u64> {
    match t {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Skips one value of type `t`, returning it when it is a u32 or u64 (for `general.alignment`).
fn skip_value(r: &mut (impl Read + Seek), t: u32, depth: u32) -> std::io::Result<Option<u64>> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    match t {
        4 => Ok(Some(u64::from(read_u32(r)?))),
        10 => Ok(Some(read_u64(r)?)),
        8 => {
            let len = read_u64(r)?;
            r.seek(SeekFrom::Current(
                i64::try_from(len).map_err(|_| bad("string too long".into()))?,
            ))?;
            Ok(None)
        }
        9 if depth < 4 => {
            let inner = read_u32(r)?;
            let n = read_u64(r)?;
            match scalar_size(inner) {
                Some(size) => {
                    let bytes = n
                        .checked_mul(size)
                        .and_then(|b| i64::try_from(b).ok())
                        .ok_or_else(|| bad("array too long".into()))?;
                    r.seek(SeekFrom::Current(bytes))?;
                }
                None => {
                    for _ in 0..n {
                        skip_value(r, inner, depth + 1)?;
                    }
                }
            }
            Ok(None)
        }
        t => match scalar_size(t) {
            Some(size) => {
                r.seek(SeekFrom::Current(size as i64))?;
                Ok(None)
            }
            None => Err(bad(format!("unknown metadata value type {t}"))),
        },
    }
}

fn read_string(r: &mut impl Read) -> std::io::Result<String> {
    let len = read_u64(r)?;
    if len > 1 << 20 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a {len}-byte name"),
        ));
    }
    let mut b = vec![0u8; len as usize];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "a name that is not UTF-8")
    })
}

fn read_header(path: &Path) -> Result<RawHeader> {
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let format = |reason: String| WeightsError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::io::BufReader::new(File::open(path).map_err(io)?);
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic).map_err(io)?;
    if &magic != GGUF_MAGIC {
        return Err(format(
            "not a GGUF file: weights can be pushed for GGUF models only".into(),
        ));
    }
    let version = read_u32(&mut f).map_err(io)?;
    if !(2..=3).contains(&version) {
        return Err(format(format!(
            "GGUF version {version}: weights can be pushed for versions 2 and 3 only"
        )));
    }
    let n_tensors = read_u64(&mut f).map_err(io)?;
    let n_kv = read_u64(&mut f).map_err(io)?;
    let kv_start = f.stream_position().map_err(io)?;
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..n_kv {
        let key = read_string(&mut f).map_err(io)?;
        let t = read_u32(&mut f).map_err(io)?;
        let v = skip_value(&mut f, t, 0).map_err(io)?;
        if key == "general.alignment" {
            alignment = v
                .filter(|a| *a > 0)
                .ok_or_else(|| format("general.alignment is not a positive integer".into()))?;
        }
    }
    let kv_end = f.stream_position().map_err(io)?;
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = read_string(&mut f).map_err(io)?;
        let n_dims = read_u32(&mut f).map_err(io)?;
        if n_dims > 4 {
            return Err(format(format!("tensor `{name}` has {n_dims} dimensions")));
        }
        let dims = (0..n_dims)
            .map(|_| read_u64(&mut f))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(io)?;
        let dtype = read_u32(&mut f).map_err(io)?;
        let offset = read_u64(&mut f).map_err(io)?;
        tensors.push(RawTensor {
            name,
            dims,
            dtype,
            offset,
        });
    }
    let end = f.stream_position().map_err(io)?;
    let data_offset = end.div_ceil(alignment) * alignment;
    let mut kv_bytes = vec![0u8; (kv_end - kv_start) as usize];
    f.seek(SeekFrom::Start(kv_start)).map_err(io)?;
    f.read_exact(&mut kv_bytes).map_err(io)?;
    Ok(RawHeader {
        version,
        n_kv,
        kv_bytes,
        tensors,
        data_offset,
        alignment,
    })
}

/// Whether tensor `name` (llama.cpp GGUF naming) belongs to the stage of `range` of `n_layers`.
fn in_shard(name: &str, range: &Range<usize>, n_layers: usize, tied: bool) -> bool {
    if let Some(rest) = name.strip_prefix("blk.") {
        return rest
            .split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| range.contains(&i));
    }
    let (first, last) = (range.start == 0, range.end == n_layers);
    match name {
        "token_embd.weight" => first || (last && tied),
        "output_norm.weight" | "output.weight" => last,
        // A few floats every stage reads into its configuration.
        "rope_freqs.weight" => true,
        _ => false,
    }
}

/// Where one shard tensor's bytes are on the head.
#[derive(Debug, Clone)]
struct Source {
    path: PathBuf,
    at: u64,
}

/// The head's side: the shard's weight set (with the cache file's header) and where to read
/// each tensor.
pub struct ShardWeights {
    pub set: pb::WeightSet,
    sources: Vec<Source>,
}

impl ShardWeights {
    /// Cuts layers `range` of the GGUF model whose parts are `parts` (first part first) out of it,
    /// reading and hashing the shard's tensors.
    pub fn prepare(
        parts: &[PathBuf],
        range: Range<usize>,
        n_layers: usize,
    ) -> Result<ShardWeights> {
        let first = parts
            .first()
            .ok_or_else(|| WeightsError::Set("no model files".into()))?;
        let headers: Vec<RawHeader> = parts
            .iter()
            .map(|p| read_header(p))
            .collect::<Result<_>>()?;
        let meta = &headers[0];
        let tied = !headers
            .iter()
            .any(|h| h.tensors.iter().any(|t| t.name == "output.weight"));
        // Every tensor, shard ones with their bytes' size and source.
        let mut all: Vec<(RawTensor, Option<(u64, Source)>)> = Vec::new();
        for (h, p) in headers.iter().zip(parts) {
            for t in &h.tensors {
                let chosen = in_shard(&t.name, &range, n_layers, tied);
                let size = if chosen {
                    Some(tensor_bytes(t).ok_or_else(|| WeightsError::Format {
                        path: p.clone(),
                        reason: format!("tensor `{}` has an unknown type {}", t.name, t.dtype),
                    })?)
                } else {
                    None
                };
                all.push((
                    t.clone(),
                    size.map(|s| {
                        (
                            s,
                            Source {
                                path: p.clone(),
                                at: h.data_offset + t.offset,
                            },
                        )
                    }),
                ));
            }
        }
        all.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        // The cache file: header, then the shard tensors, each aligned.
        let mut infos = Vec::new();
        let mut offset = 0u64;
        let mut placed = Vec::new();
        for (t, shard) in &all {
            let (dims, off) = match shard {
                Some((size, _)) => {
                    let at = offset;
                    offset = (offset + size).div_ceil(meta.alignment) * meta.alignment;
                    placed.push(at);
                    (t.dims.clone(), at)
                }
                None => (vec![0], 0),
            };
            write_string(&mut infos, &t.name);
            infos.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in &dims {
                infos.extend_from_slice(&d.to_le_bytes());
            }
            infos.extend_from_slice(&t.dtype.to_le_bytes());
            infos.extend_from_slice(&off.to_le_bytes());
        }
        let mut header = Vec::new();
        header.extend_from_slice(GGUF_MAGIC);
        header.extend_from_slice(&meta.version.max(2).to_le_bytes());
        header.extend_from_slice(&(all.len() as u64).to_le_bytes());
        header.extend_from_slice(&meta.n_kv.to_le_bytes());
        header.extend_from_slice(&meta.kv_bytes);
        header.extend_from_slice(&infos);
        let data_start = (header.len() as u64).div_ceil(meta.alignment) * meta.alignment;
        header.resize(data_start as usize, 0);

        let mut tensors = Vec::new();
        let mut sources = Vec::new();
        let mut key = blake3::Hasher::new();
        key.update(&header);
        for ((t, shard), at) in all.iter().filter(|(_, s)| s.is_some()).zip(&placed) {
            let (size, src) = shard.clone().expect("filtered");
            let bytes = read_at(&src.path, src.at, size)?;
            let info = weights_stream::tensor_info(
                &t.name,
                &bytes,
                (data_start + at).to_le_bytes().to_vec(),
            );
            key.update(&info.digest);
            tensors.push(info);
            sources.push(src);
        }
        if tensors.is_empty() {
            return Err(WeightsError::Format {
                path: first.clone(),
                reason: format!("no tensors for layers {}..{}", range.start, range.end),
            });
        }
        let shard_key = key.finalize().to_hex()[..32].to_string();
        Ok(ShardWeights {
            set: pb::WeightSet {
                shard_key,
                tensors,
                container: header,
            },
            sources,
        })
    }

    /// The bytes of `span`.
    pub fn read(&self, span: ChunkSpan) -> Result<Vec<u8>> {
        let src = self
            .sources
            .get(span.tensor as usize)
            .ok_or_else(|| WeightsError::Set(format!("no tensor {}", span.tensor)))?;
        read_at(&src.path, src.at + span.offset, u64::from(span.len))
    }

    pub fn total_bytes(&self) -> u64 {
        self.set.tensors.iter().map(|t| t.size).sum()
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn read_at(path: &Path, at: u64, len: u64) -> Result<Vec<u8>> {
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    f.seek(SeekFrom::Start(at)).map_err(io)?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).map_err(io)?;
    Ok(buf)
}

/// Bytes of a tensor of GGML type `t.dtype` (block size and bytes per block of each type).
fn tensor_bytes(t: &RawTensor) -> Option<u64> {
    let (block, size): (u64, u64) = match t.dtype {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        30 => (1, 2),     // BF16
        _ => return None,
    };
    let elems: u64 = t.dims.iter().product();
    Some(elems / block * size)
}

/// A shard arriving on the worker, written in place into `<cache>/<shard key>/shard.gguf.part`
/// and renamed to `shard.gguf` once every tensor's digest checked.
pub struct Incoming {
    receiver: Receiver,
    file: File,
    part: PathBuf,
    done: PathBuf,
    /// Where each tensor starts in the file.
    starts: Vec<u64>,
}

/// Longest shard key accepted: the head makes 32 hex digits.
const MAX_SHARD_KEY_LEN: usize = 64;

/// A shard key names a directory of the cache, so it must be a plain hex digest: anything else
/// (`..`, `/`, an absolute path) would reach outside the cache.
fn check_shard_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key.len() > MAX_SHARD_KEY_LEN
        || !key.chars().all(|c| c.is_ascii_hexdigit())
    {
        return Err(WeightsError::Set(format!(
            "shard key {:?} is not a hex digest of at most {MAX_SHARD_KEY_LEN} digits",
            key.chars().take(MAX_SHARD_KEY_LEN + 1).collect::<String>()
        )));
    }
    Ok(())
}

/// The cached file of `set`, when a complete one is there.
pub fn cached(cache: &Path, set: &pb::WeightSet) -> Option<PathBuf> {
    check_shard_key(&set.shard_key).ok()?;
    let p = cache.join(&set.shard_key).join(SHARD_FILE);
    p.exists().then_some(p)
}

impl Incoming {
    /// Starts receiving `set` into the cache (from nothing: bytes of an earlier process are not
    /// trusted without their digests, which only a complete file has had checked).
    pub fn start(cache: &Path, set: pb::WeightSet) -> Result<Incoming> {
        check_shard_key(&set.shard_key)?;
        let dir = cache.join(&set.shard_key);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WeightsError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let done = dir.join(SHARD_FILE);
        let part = dir.join(format!("{SHARD_FILE}{PART_SUFFIX}"));
        let header_len = set.container.len() as u64;
        let mut starts = Vec::with_capacity(set.tensors.len());
        let mut end = header_len;
        for t in &set.tensors {
            let at = <[u8; 8]>::try_from(t.meta.as_slice())
                .map(u64::from_le_bytes)
                .map_err(|_| WeightsError::Set(format!("tensor `{}`: no file offset", t.name)))?;
            if at < header_len {
                return Err(WeightsError::Set(format!(
                    "tensor `{}` would overwrite the header",
                    t.name
                )));
            }
            end =
                end.max(at.checked_add(t.size).ok_or_else(|| {
                    WeightsError::Set(format!("tensor `{}` is too large", t.name))
                })?);
            starts.push(at);
        }
        // Each tensor's digest is checked as its bytes arrive, so tensors that shared bytes of the
        // file would let a later one overwrite an earlier, already verified one.
        let mut ranges: Vec<(u64, u64, &str)> = set
            .tensors
            .iter()
            .zip(&starts)
            .filter(|(t, _)| t.size > 0)
            .map(|(t, &at)| (at, at + t.size, t.name.as_str()))
            .collect();
        ranges.sort_unstable();
        if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(WeightsError::Set(format!(
                "tensors `{}` and `{}` overlap in the file",
                w[0].2, w[1].2
            )));
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&part)
            .map_err(io(&part))?;
        file.write_all(&set.container).map_err(io(&part))?;
        file.set_len(end).map_err(io(&part))?;
        Ok(Incoming {
            receiver: Receiver::new(set)?,
            file,
            part,
            done,
            starts,
        })
    }

    pub fn set(&self) -> &pb::WeightSet {
        self.receiver.set()
    }

    pub fn receiver(&self) -> &Receiver {
        &self.receiver
    }

    /// Checks and stores one chunk.
    pub fn write(&mut self, chunk: &pb::WeightChunk) -> Result<Accepted> {
        let accepted = self.receiver.accept(chunk)?;
        if accepted != Accepted::Duplicate {
            let at = self.starts[chunk.tensor as usize] + chunk.offset;
            let io = |source| WeightsError::Io {
                path: self.part.clone(),
                source,
            };
            self.file.seek(SeekFrom::Start(at)).map_err(io)?;
            self.file.write_all(&chunk.data).map_err(io)?;
        }
        Ok(accepted)
    }

    /// Once complete: flushes and moves the file to its final name, returning it.
    pub fn finish(self) -> Result<PathBuf> {
        if !self.receiver.is_complete() {
            return Err(WeightsError::Set(format!(
                "{} of {} bytes received",
                self.receiver.bytes_done(),
                self.receiver.bytes_total()
            )));
        }
        self.file.sync_all().map_err(|source| WeightsError::Io {
            path: self.part.clone(),
            source,
        })?;
        std::fs::rename(&self.part, &self.done).map_err(|source| WeightsError::Io {
            path: self.done.clone(),
            source,
        })?;
        Ok(self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_proto::weights_stream::{make_chunk, tensor_info};

    /// A fresh directory under the system's temporary one, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let dir = std::env::temp_dir().join(format!(
                "baton-weights-{name}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A set whose tensors `(name, bytes, file offset)` follow an 8-byte container.
    fn set(key: &str, tensors: &[(&str, &[u8], u64)]) -> pb::WeightSet {
        pb::WeightSet {
            shard_key: key.into(),
            tensors: tensors
                .iter()
                .map(|(n, b, at)| tensor_info(n, b, at.to_le_bytes().to_vec()))
                .collect(),
            container: vec![0; 8],
        }
    }

    #[test]
    fn shard_keys_that_are_not_plain_digests_never_name_a_path() {
        let scratch = Scratch::new("keys");
        let cache = scratch.0.join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        // A complete "shard" outside the cache, where `..` would lead.
        std::fs::create_dir_all(scratch.0.join("outside")).unwrap();
        std::fs::write(scratch.0.join("outside").join(SHARD_FILE), b"GGUF").unwrap();
        for key in [
            "../outside",
            "/etc",
            "",
            "ab/cd",
            &"a".repeat(MAX_SHARD_KEY_LEN + 1),
        ] {
            let s = set(key, &[("t", b"abcd", 8)]);
            assert_eq!(cached(&cache, &s), None, "{key:?}");
            assert!(
                matches!(Incoming::start(&cache, s), Err(WeightsError::Set(_))),
                "{key:?}"
            );
        }
        assert!(
            std::fs::read_dir(&cache).unwrap().next().is_none(),
            "a directory was made"
        );
        assert!(Incoming::start(&cache, set("0123abcd", &[("t", b"abcd", 8)])).is_ok());
    }

    #[test]
    fn overlapping_tensors_are_refused_before_any_byte_is_written() {
        let scratch = Scratch::new("overlap");
        // `b` would start inside `a`: its bytes would overwrite `a`'s after `a` was verified.
        let bad = set("00ff", &[("a", b"aaaaaaaa", 8), ("b", b"bbbb", 12)]);
        match Incoming::start(&scratch.0, bad) {
            Err(WeightsError::Set(m)) => assert!(m.contains("`a` and `b` overlap"), "{m}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("overlapping tensors were accepted"),
        }
        // Adjacent tensors, and an empty one anywhere, are fine; the pushed bytes land in place.
        let good = set(
            "00fe",
            &[("a", b"aaaaaaaa", 8), ("b", b"bbbb", 16), ("e", b"", 10)],
        );
        let mut incoming = Incoming::start(&scratch.0, good).unwrap();
        for (i, (bytes, at)) in [(&b"aaaaaaaa"[..], 0u64), (&b"bbbb"[..], 0)]
            .into_iter()
            .enumerate()
        {
            let span = weights_stream::ChunkSpan {
                tensor: i as u32,
                offset: at,
                len: bytes.len() as u32,
            };
            incoming.write(&make_chunk(span, bytes.to_vec())).unwrap();
        }
        let path = incoming.finish().unwrap();
        assert_eq!(std::fs::read(path).unwrap()[8..], b"aaaaaaaabbbb"[..]);
    }
}
