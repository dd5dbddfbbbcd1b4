//! Pushing a shard's tensors from the head to a worker: chunking, per-chunk checksums, whole-tensor
//! digests and resume after a dropped connection. Pure logic over byte slices: it knows a tensor
//! only as a name, a size, a BLAKE3 digest and opaque metadata, never the model format, and does
//! no I/O (the caller reads tensors on the head and writes chunks on the worker).
//!
//! Protocol, in the terms of `proto/baton.proto`:
//! 1. The head builds a [`pb::WeightSet`] (one [`tensor_info`] per tensor) and asks the worker
//!    `ResumeWeights(set)`; the worker answers with [`Receiver::resume`] (zeros when new).
//! 2. The head sends `begin = set`, then the chunks of [`plan_chunks`] from those offsets, each made
//!    by [`make_chunk`].
//! 3. The worker feeds each chunk to [`Receiver::accept`] and writes `chunk.data` at
//!    `chunk.offset` of that tensor only when told [`Accepted::Fresh`] or
//!    [`Accepted::TensorComplete`]. A tensor whose digest turns out wrong is reset to zero bytes
//!    (the caller truncates what it wrote) and the error says which.
//! 4. After a drop, go back to step 1: the worker's `Receiver` (kept, or rebuilt with
//!    [`Receiver::absorb_existing`] from what it had written) tells where to restart.

use crate::pb;

/// Chunk size the head uses unless told otherwise.
pub const DEFAULT_CHUNK_BYTES: u32 = 4 * 1024 * 1024;
/// Largest chunk a receiver accepts; with framing it stays well under [`crate::MAX_MESSAGE_BYTES`].
pub const MAX_CHUNK_BYTES: u32 = 8 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("tensor `{name}`: digest must be 32 bytes, got {len}")]
    BadDigest { name: String, len: usize },
    #[error("weight set has {count} tensors; chunk names tensor {index}")]
    UnknownTensor { index: u32, count: usize },
    #[error("chunk size must be 1..={MAX_CHUNK_BYTES} bytes, got {0}")]
    ChunkSize(u64),
    #[error("tensor `{name}`: chunk at offset {offset} failed its CRC-32 check")]
    Checksum { name: String, offset: u64 },
    #[error("tensor `{name}`: expected the chunk at offset {expected}, got offset {got}")]
    OutOfOrder {
        name: String,
        expected: u64,
        got: u64,
    },
    #[error("tensor `{name}`: chunk ends at {end}, past the tensor's {size} bytes")]
    Overflow { name: String, end: u64, size: u64 },
    #[error("tensor `{name}`: content does not match its digest; its bytes were discarded")]
    DigestMismatch { name: String },
    #[error("resume offsets: {0}")]
    BadResume(String),
    #[error("weight set's tensors add up to more than {} bytes", u64::MAX)]
    TooLarge,
    #[error("tensor `{name}` started while tensor `{open}` is incomplete: tensors arrive one after another")]
    Interleaved { name: String, open: String },
}

/// A [`pb::TensorInfo`] for `bytes`, with its digest.
pub fn tensor_info(name: &str, bytes: &[u8], meta: Vec<u8>) -> pb::TensorInfo {
    pb::TensorInfo {
        name: name.to_string(),
        size: bytes.len() as u64,
        digest: blake3::hash(bytes).as_bytes().to_vec(),
        meta,
    }
}

/// One chunk to send: `len` bytes of `tensor` from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    pub tensor: u32,
    pub offset: u64,
    pub len: u32,
}

/// The chunks that deliver tensors of `sizes` to a receiver that already `have` a prefix of each,
/// in the order the receiver requires. Zero-byte tensors need no chunk.
pub fn plan_chunks(
    sizes: &[u64],
    have: &[u64],
    chunk_bytes: u32,
) -> Result<Vec<ChunkSpan>, StreamError> {
    if chunk_bytes == 0 || chunk_bytes > MAX_CHUNK_BYTES {
        return Err(StreamError::ChunkSize(chunk_bytes.into()));
    }
    if sizes.len() != have.len() {
        return Err(StreamError::BadResume(format!(
            "{} offsets for {} tensors",
            have.len(),
            sizes.len()
        )));
    }
    let mut spans = Vec::new();
    for (index, (&size, &start)) in sizes.iter().zip(have).enumerate() {
        if start > size {
            return Err(StreamError::BadResume(format!(
                "tensor {index}: have {start} of {size} bytes"
            )));
        }
        let tensor = u32::try_from(index)
            .map_err(|_| StreamError::BadResume(format!("{} tensors", sizes.len())))?;
        let mut offset = start;
        while offset < size {
            // Fits in u32: bounded by chunk_bytes.
            let len = (size - offset).min(u64::from(chunk_bytes)) as u32;
            spans.push(ChunkSpan {
                tensor,
                offset,
                len,
            });
            offset += u64::from(len);
        }
    }
    Ok(spans)
}

/// The wire chunk for `span`, whose bytes the caller read into `data`.
pub fn make_chunk(span: ChunkSpan, data: Vec<u8>) -> pb::WeightChunk {
    pb::WeightChunk {
        tensor: span.tensor,
        offset: span.offset,
        crc32: crc32fast::hash(&data),
        data,
    }
}

/// What the receiver should do with a chunk it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// New bytes: write them.
    Fresh,
    /// New bytes that complete the tensor, whose digest matched: write them.
    TensorComplete,
    /// Bytes the receiver already holds (a resend after resume): ignore.
    Duplicate,
}

/// The worker's side of a push: which bytes of each tensor it holds, verified in order.
#[derive(Debug, Clone)]
pub struct Receiver {
    set: pb::WeightSet,
    have: Vec<u64>,
    /// The one tensor partly received and its digest so far. Tensors arrive one after another,
    /// so one hasher serves (one per declared tensor would let a set of tiny entries allocate
    /// ~50 times its own size).
    open: Option<(usize, blake3::Hasher)>,
}

impl Receiver {
    /// A receiver holding nothing yet.
    pub fn new(set: pb::WeightSet) -> Result<Self, StreamError> {
        for t in &set.tensors {
            if t.digest.len() != blake3::OUT_LEN {
                return Err(StreamError::BadDigest {
                    name: t.name.clone(),
                    len: t.digest.len(),
                });
            }
            if t.size == 0 && blake3::hash(&[]).as_bytes()[..] != t.digest[..] {
                return Err(StreamError::DigestMismatch {
                    name: t.name.clone(),
                });
            }
        }
        // Byte counts are summed over the set (progress, completeness), which must not overflow.
        if set
            .tensors
            .iter()
            .try_fold(0u64, |sum, t| sum.checked_add(t.size))
            .is_none()
        {
            return Err(StreamError::TooLarge);
        }
        let n = set.tensors.len();
        Ok(Receiver {
            set,
            have: vec![0; n],
            open: None,
        })
    }

    pub fn set(&self) -> &pb::WeightSet {
        &self.set
    }

    /// Re-reads bytes stored before a restart: `prefix` continues tensor `index` from what the
    /// receiver holds. A prefix that completes the tensor is checked against its digest.
    pub fn absorb_existing(&mut self, index: u32, prefix: &[u8]) -> Result<Accepted, StreamError> {
        let offset = self.have.get(index as usize).copied().unwrap_or(0);
        self.record(index, offset, prefix, None)
    }

    /// Checks a chunk and, when it brings new bytes, records them.
    pub fn accept(&mut self, chunk: &pb::WeightChunk) -> Result<Accepted, StreamError> {
        if chunk.data.is_empty() || chunk.data.len() as u64 > u64::from(MAX_CHUNK_BYTES) {
            return Err(StreamError::ChunkSize(chunk.data.len() as u64));
        }
        self.record(chunk.tensor, chunk.offset, &chunk.data, Some(chunk.crc32))
    }

    /// Records `data` at `offset` of tensor `tensor`, checking `crc32` when given (bytes read back
    /// from the receiver's own storage have none).
    fn record(
        &mut self,
        tensor: u32,
        offset: u64,
        data: &[u8],
        crc32: Option<u32>,
    ) -> Result<Accepted, StreamError> {
        let index = tensor as usize;
        let count = self.set.tensors.len();
        let info = self
            .set
            .tensors
            .get(index)
            .ok_or(StreamError::UnknownTensor {
                index: tensor,
                count,
            })?;
        let name = || info.name.clone();
        if crc32.is_some_and(|crc| crc != crc32fast::hash(data)) {
            return Err(StreamError::Checksum {
                name: name(),
                offset,
            });
        }
        let len = data.len() as u64;
        let end = offset.saturating_add(len);
        if end > info.size {
            return Err(StreamError::Overflow {
                name: name(),
                end,
                size: info.size,
            });
        }
        let have = self.have[index];
        if end <= have {
            return Ok(Accepted::Duplicate);
        }
        if offset != have {
            return Err(StreamError::OutOfOrder {
                name: name(),
                expected: have,
                got: offset,
            });
        }
        // Bytes held and not complete mean this tensor is the open one.
        let hasher = match &mut self.open {
            Some((open, h)) if *open == index => h,
            Some((open, _)) => {
                return Err(StreamError::Interleaved {
                    name: name(),
                    open: self.set.tensors[*open].name.clone(),
                })
            }
            None => &mut self.open.insert((index, blake3::Hasher::new())).1,
        };
        hasher.update(data);
        self.have[index] = end;
        if end < info.size {
            return Ok(Accepted::Fresh);
        }
        let (_, hasher) = self.open.take().expect("opened above");
        if hasher.finalize().as_bytes()[..] == info.digest[..] {
            Ok(Accepted::TensorComplete)
        } else {
            self.have[index] = 0;
            Err(StreamError::DigestMismatch { name: name() })
        }
    }

    /// Bytes held per tensor, indexed like the weight set.
    pub fn have(&self) -> &[u64] {
        &self.have
    }

    /// The answer to `ResumeWeights`.
    pub fn resume(&self) -> pb::WeightsResume {
        pb::WeightsResume {
            have: self.have.clone(),
        }
    }

    pub fn bytes_done(&self) -> u64 {
        self.have.iter().sum()
    }

    /// Fits in u64: [`Receiver::new`] refuses larger sets.
    pub fn bytes_total(&self) -> u64 {
        self.set.tensors.iter().map(|t| t.size).sum()
    }

    pub fn is_complete(&self) -> bool {
        self.bytes_done() == self.bytes_total()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set_of(tensors: &[Vec<u8>]) -> pb::WeightSet {
        pb::WeightSet {
            shard_key: "model@0..2".into(),
            tensors: tensors
                .iter()
                .enumerate()
                .map(|(i, t)| tensor_info(&format!("t{i}"), t, vec![i as u8]))
                .collect(),
            container: vec![],
        }
    }

    /// Sends every planned chunk, writing accepted bytes into `out`; stops after `limit` chunks.
    fn deliver(
        tensors: &[Vec<u8>],
        rx: &mut Receiver,
        out: &mut [Vec<u8>],
        chunk: u32,
        limit: usize,
    ) -> usize {
        let sizes: Vec<u64> = tensors.iter().map(|t| t.len() as u64).collect();
        let spans = plan_chunks(&sizes, rx.have(), chunk).unwrap();
        let mut sent = 0;
        for span in spans.into_iter().take(limit) {
            let t = &tensors[span.tensor as usize];
            let lo = span.offset as usize;
            let c = make_chunk(span, t[lo..lo + span.len as usize].to_vec());
            match rx.accept(&c).unwrap() {
                Accepted::Fresh | Accepted::TensorComplete => {
                    let o = &mut out[span.tensor as usize];
                    assert_eq!(o.len(), lo);
                    o.extend_from_slice(&c.data);
                }
                Accepted::Duplicate => {}
            }
            sent += 1;
        }
        sent
    }

    proptest! {
        #[test]
        fn interrupted_push_resumes_to_identical_bytes(
            tensors in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..6),
            chunk in 1u32..64,
            cut in 0usize..40,
        ) {
            let set = set_of(&tensors);
            let mut rx = Receiver::new(set.clone()).unwrap();
            let mut out = vec![Vec::new(); tensors.len()];
            deliver(&tensors, &mut rx, &mut out, chunk, cut);
            // The worker restarts: it rebuilds its receiver from the bytes it had written.
            let mut rx = Receiver::new(set).unwrap();
            for (i, o) in out.iter().enumerate() {
                if !o.is_empty() {
                    rx.absorb_existing(i as u32, o).unwrap();
                }
            }
            prop_assert_eq!(rx.resume().have, out.iter().map(|o| o.len() as u64).collect::<Vec<_>>());
            deliver(&tensors, &mut rx, &mut out, chunk + 7, usize::MAX);
            prop_assert!(rx.is_complete());
            prop_assert_eq!(&out, &tensors);
        }
    }

    #[test]
    fn corrupted_chunk_is_rejected_and_not_recorded() {
        let tensors = vec![vec![7u8; 100]];
        let mut rx = Receiver::new(set_of(&tensors)).unwrap();
        let mut c = make_chunk(
            ChunkSpan {
                tensor: 0,
                offset: 0,
                len: 10,
            },
            vec![7; 10],
        );
        c.data[3] ^= 1;
        assert_eq!(
            rx.accept(&c).unwrap_err(),
            StreamError::Checksum {
                name: "t0".into(),
                offset: 0
            }
        );
        assert_eq!(rx.have(), &[0]);
    }

    #[test]
    fn wrong_content_with_valid_crcs_fails_the_digest_and_resets() {
        let tensors = vec![vec![1u8; 20]];
        let mut rx = Receiver::new(set_of(&tensors)).unwrap();
        let first = make_chunk(
            ChunkSpan {
                tensor: 0,
                offset: 0,
                len: 10,
            },
            vec![1; 10],
        );
        assert_eq!(rx.accept(&first).unwrap(), Accepted::Fresh);
        let bad = make_chunk(
            ChunkSpan {
                tensor: 0,
                offset: 10,
                len: 10,
            },
            vec![2; 10],
        );
        assert_eq!(
            rx.accept(&bad).unwrap_err(),
            StreamError::DigestMismatch { name: "t0".into() }
        );
        assert_eq!(rx.have(), &[0]);
    }

    #[test]
    fn gaps_overflow_and_unknown_tensors_are_errors_resends_are_not() {
        let tensors = vec![vec![0u8; 10], vec![5u8; 4]];
        let mut rx = Receiver::new(set_of(&tensors)).unwrap();
        let gap = make_chunk(
            ChunkSpan {
                tensor: 0,
                offset: 4,
                len: 2,
            },
            vec![0; 2],
        );
        assert!(matches!(
            rx.accept(&gap),
            Err(StreamError::OutOfOrder {
                expected: 0,
                got: 4,
                ..
            })
        ));
        let c = make_chunk(
            ChunkSpan {
                tensor: 0,
                offset: 0,
                len: 4,
            },
            vec![0; 4],
        );
        assert_eq!(rx.accept(&c).unwrap(), Accepted::Fresh);
        assert_eq!(rx.accept(&c).unwrap(), Accepted::Duplicate);
        let over = make_chunk(
            ChunkSpan {
                tensor: 1,
                offset: 0,
                len: 5,
            },
            vec![5; 5],
        );
        assert!(matches!(
            rx.accept(&over),
            Err(StreamError::Overflow {
                end: 5,
                size: 4,
                ..
            })
        ));
        let unknown = make_chunk(
            ChunkSpan {
                tensor: 2,
                offset: 0,
                len: 1,
            },
            vec![0],
        );
        assert_eq!(
            rx.accept(&unknown).unwrap_err(),
            StreamError::UnknownTensor { index: 2, count: 2 }
        );
        let empty = make_chunk(
            ChunkSpan {
                tensor: 0,
                offset: 4,
                len: 0,
            },
            vec![],
        );
        assert_eq!(rx.accept(&empty).unwrap_err(), StreamError::ChunkSize(0));
    }

    /// Two tensors of 2^63 bytes made `bytes_total` overflow: a panic (overflow checks on) in the
    /// worker's `PushWeights` handler, reproduced through the `control_messages` fuzz target.
    #[test]
    fn tensors_arrive_one_after_another() {
        let tensors = vec![vec![1u8; 10], vec![2u8; 10]];
        let mut rx = Receiver::new(set_of(&tensors)).unwrap();
        let chunk = |tensor: u32, offset: u64, data: &[u8]| make_chunk(ChunkSpan { tensor, offset, len: data.len() as u32 }, data.to_vec());
        assert_eq!(rx.accept(&chunk(0, 0, &[1; 4])), Ok(Accepted::Fresh));
        assert!(matches!(rx.accept(&chunk(1, 0, &[2; 4])), Err(StreamError::Interleaved { .. })));
        assert_eq!(rx.have(), [4, 0]);
        assert_eq!(rx.accept(&chunk(0, 4, &[1; 6])), Ok(Accepted::TensorComplete));
        assert_eq!(rx.accept(&chunk(1, 0, &[2; 10])), Ok(Accepted::TensorComplete));
        assert!(rx.is_complete());
    }

    #[test]
    fn a_set_larger_than_u64_bytes_is_refused() {
        let mut set = set_of(&[vec![1], vec![2]]);
        for t in &mut set.tensors {
            t.size = 1 << 63;
        }
        assert_eq!(
            Receiver::new(set.clone()).map(|rx| rx.bytes_total()).unwrap_err(),
            StreamError::TooLarge
        );
        set.tensors[1].size -= 1;
        assert_eq!(Receiver::new(set).unwrap().bytes_total(), u64::MAX);
    }

    #[test]
    fn bad_sets_and_resume_points_are_refused() {
        let mut set = set_of(&[vec![1, 2, 3]]);
        set.tensors[0].digest.truncate(4);
        assert!(matches!(
            Receiver::new(set),
            Err(StreamError::BadDigest { len: 4, .. })
        ));
        assert!(matches!(
            plan_chunks(&[3], &[4], 2),
            Err(StreamError::BadResume(_))
        ));
        assert!(matches!(
            plan_chunks(&[3], &[], 2),
            Err(StreamError::BadResume(_))
        ));
        assert_eq!(
            plan_chunks(&[3], &[0], 0).unwrap_err(),
            StreamError::ChunkSize(0)
        );
        assert_eq!(
            plan_chunks(&[5, 0, 3], &[1, 0, 0], 3).unwrap(),
            vec![
                ChunkSpan {
                    tensor: 0,
                    offset: 1,
                    len: 3
                },
                ChunkSpan {
                    tensor: 0,
                    offset: 4,
                    len: 1
                },
                ChunkSpan {
                    tensor: 2,
                    offset: 0,
                    len: 3
                },
            ]
        );
    }
}
