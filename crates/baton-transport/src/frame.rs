//! Frame codec, free of I/O.
//!
//! A frame is one micro-batch on the wire. Layout (little-endian, every section a multiple of 8
//! bytes so the payload starts 8-aligned relative to the frame start):
//!
//! ```text
//!  0  magic        b"BTNF"
//!  4  version      u8  (1)
//!  5  kind         u8  (0 hidden, 1 tokens, 2 control)
//!  6  dtype        u8  (0 bf16, 1 f16, 2 f32, 3 u32, 4 u8)
//!  7  ndim         u8  (0..=4)
//!  8  micro_batch  u64
//! 16  n_seqs       u32
//! 20  reserved     u32 (0)
//! 24  payload_len  u64
//! 32  dims         ndim x u64
//!  .  seqs         n_seqs x (seq_id u64, start_pos u32, n_tokens u32)
//!  .  payload      payload_len bytes
//! ```
//!
//! Decoding never copies the payload or the sequence list: both are slices of the input `Bytes`.
//! Every length is checked against the configured limits before anything is sized from it.

use bytes::{BufMut, Bytes, BytesMut};

pub const MAGIC: [u8; 4] = *b"BTNF";
pub const VERSION: u8 = 1;
pub const FIXED_HEADER_LEN: usize = 32;
pub const MAX_DIMS: usize = 4;
const SEQ_ENTRY_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Hidden states `[total_tokens, hidden]` between stages.
    Hidden,
    /// Token ids: input tokens to stage 0, or sampled tokens back to the head.
    Tokens,
    /// Opaque control bytes (link probes, stage-loop signals).
    Control,
}

impl FrameKind {
    fn code(self) -> u8 {
        match self {
            FrameKind::Hidden => 0,
            FrameKind::Tokens => 1,
            FrameKind::Control => 2,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => FrameKind::Hidden,
            1 => FrameKind::Tokens,
            2 => FrameKind::Control,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    BF16,
    F16,
    F32,
    U32,
    U8,
}

impl DType {
    pub fn size(self) -> u64 {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::U32 => 4,
            DType::U8 => 1,
        }
    }
    fn code(self) -> u8 {
        match self {
            DType::BF16 => 0,
            DType::F16 => 1,
            DType::F32 => 2,
            DType::U32 => 3,
            DType::U8 => 4,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => DType::BF16,
            1 => DType::F16,
            2 => DType::F32,
            3 => DType::U32,
            4 => DType::U8,
            _ => return None,
        })
    }
    fn is_float(self) -> bool {
        matches!(self, DType::BF16 | DType::F16 | DType::F32)
    }
}

/// A tensor shape of at most [`MAX_DIMS`] dimensions, stored inline (no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [u64; MAX_DIMS],
    ndim: u8,
}

impl Shape {
    pub fn new(dims: &[u64]) -> Result<Self, FrameError> {
        if dims.len() > MAX_DIMS {
            return Err(FrameError::TooManyDims(dims.len()));
        }
        let mut d = [0u64; MAX_DIMS];
        d[..dims.len()].copy_from_slice(dims);
        Ok(Shape { dims: d, ndim: dims.len() as u8 })
    }
    pub fn dims(&self) -> &[u64] {
        &self.dims[..self.ndim as usize]
    }
    /// Element count, or `None` on overflow.
    pub fn elements(&self) -> Option<u64> {
        self.dims().iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

/// One sequence's share of a micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqSpan {
    pub seq_id: u64,
    pub start_pos: u32,
    pub n_tokens: u32,
}

/// The micro-batch's sequence list, kept in its wire encoding so decoding does not allocate.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SeqList(Bytes);

impl SeqList {
    pub fn new(spans: &[SeqSpan]) -> Self {
        let mut b = BytesMut::with_capacity(spans.len() * SEQ_ENTRY_LEN);
        for s in spans {
            b.put_u64_le(s.seq_id);
            b.put_u32_le(s.start_pos);
            b.put_u32_le(s.n_tokens);
        }
        SeqList(b.freeze())
    }
    pub fn len(&self) -> usize {
        self.0.len() / SEQ_ENTRY_LEN
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = SeqSpan> + '_ {
        self.0.chunks_exact(SEQ_ENTRY_LEN).map(|c| SeqSpan {
            seq_id: u64::from_le_bytes(c[0..8].try_into().expect("chunk of 16")),
            start_pos: u32::from_le_bytes(c[8..12].try_into().expect("chunk of 16")),
            n_tokens: u32::from_le_bytes(c[12..16].try_into().expect("chunk of 16")),
        })
    }
    fn total_tokens(&self) -> u64 {
        self.iter().map(|s| u64::from(s.n_tokens)).sum()
    }
}

impl std::fmt::Debug for SeqList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub micro_batch: u64,
    pub seqs: SeqList,
    pub dtype: DType,
    pub shape: Shape,
    pub payload: Bytes,
}

/// Bounds applied when decoding (and encoding, so a sender cannot build what its peer refuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest encoded frame (header + sequence list + payload) accepted.
    pub max_frame_bytes: usize,
    /// Largest sequence list accepted.
    pub max_seqs: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits { max_frame_bytes: 64 << 20, max_seqs: 1 << 16 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unsupported frame version {0}")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("unknown dtype {0}")]
    BadDType(u8),
    #[error("{0} dimensions, at most {MAX_DIMS} allowed")]
    TooManyDims(usize),
    #[error("reserved header field is {0}, must be 0")]
    Reserved(u32),
    #[error("{got} sequences exceed the limit of {limit}")]
    TooManySeqs { got: u64, limit: u32 },
    #[error("frame of {got} bytes exceeds the limit of {limit}")]
    TooLarge { got: u64, limit: usize },
    #[error("frame length {got} does not match header + payload = {expected}")]
    LengthMismatch { got: usize, expected: u64 },
    #[error("shape {shape:?} of {dtype:?} needs {expected:?} bytes, payload has {payload}")]
    ShapeMismatch { shape: Vec<u64>, dtype: DType, expected: Option<u64>, payload: u64 },
    #[error("{kind:?} frame cannot carry {dtype:?}")]
    DTypeForKind { kind: FrameKind, dtype: DType },
    #[error("hidden frame shape {shape:?} must be [total_tokens={tokens}, hidden]")]
    TokensMismatch { shape: Vec<u64>, tokens: u64 },
}

impl Frame {
    /// A control frame carrying opaque bytes (dtype u8, shape `[len]`).
    pub fn control(micro_batch: u64, payload: Bytes) -> Self {
        Frame {
            kind: FrameKind::Control,
            micro_batch,
            seqs: SeqList::default(),
            dtype: DType::U8,
            shape: Shape { dims: [payload.len() as u64, 0, 0, 0], ndim: 1 },
            payload,
        }
    }

    /// A hidden-state frame `[total_tokens, hidden]`, checked like a decoded one.
    pub fn hidden(
        micro_batch: u64,
        seqs: &[SeqSpan],
        dtype: DType,
        hidden: u64,
        payload: Bytes,
    ) -> Result<Self, FrameError> {
        let seqs = SeqList::new(seqs);
        let shape = Shape::new(&[seqs.total_tokens(), hidden])?;
        let f = Frame { kind: FrameKind::Hidden, micro_batch, seqs, dtype, shape, payload };
        f.validate()?;
        Ok(f)
    }

    /// Token ids, shape `[n]`.
    pub fn tokens(micro_batch: u64, seqs: &[SeqSpan], payload: Bytes) -> Result<Self, FrameError> {
        let n = payload.len() as u64 / 4;
        let f = Frame {
            kind: FrameKind::Tokens,
            micro_batch,
            seqs: SeqList::new(seqs),
            dtype: DType::U32,
            shape: Shape::new(&[n])?,
            payload,
        };
        f.validate()?;
        Ok(f)
    }

    /// Bytes of header and sequence list, i.e. everything before the payload.
    pub fn header_len(&self) -> usize {
        FIXED_HEADER_LEN + 8 * self.shape.ndim as usize + self.seqs.0.len()
    }

    pub fn encoded_len(&self) -> usize {
        self.header_len() + self.payload.len()
    }

    /// Semantic checks shared by encoder and decoder.
    fn validate(&self) -> Result<(), FrameError> {
        let payload = self.payload.len() as u64;
        let expected = self.shape.elements().and_then(|e| e.checked_mul(self.dtype.size()));
        if expected != Some(payload) {
            return Err(FrameError::ShapeMismatch {
                shape: self.shape.dims().to_vec(),
                dtype: self.dtype,
                expected,
                payload,
            });
        }
        let dtype_ok = match self.kind {
            FrameKind::Hidden => self.dtype.is_float(),
            FrameKind::Tokens => self.dtype == DType::U32,
            FrameKind::Control => true,
        };
        if !dtype_ok {
            return Err(FrameError::DTypeForKind { kind: self.kind, dtype: self.dtype });
        }
        if self.kind == FrameKind::Hidden {
            let tokens = self.seqs.total_tokens();
            if self.shape.ndim != 2 || self.shape.dims[0] != tokens {
                return Err(FrameError::TokensMismatch { shape: self.shape.dims().to_vec(), tokens });
            }
        }
        Ok(())
    }

    /// Writes header and sequence list into `dst`; the payload is sent separately (vectored I/O)
    /// so it is never copied by the codec.
    pub fn encode_header(&self, dst: &mut BytesMut, limits: &FrameLimits) -> Result<(), FrameError> {
        self.validate()?;
        if self.seqs.len() as u64 > u64::from(limits.max_seqs) {
            return Err(FrameError::TooManySeqs { got: self.seqs.len() as u64, limit: limits.max_seqs });
        }
        if self.encoded_len() > limits.max_frame_bytes {
            return Err(FrameError::TooLarge { got: self.encoded_len() as u64, limit: limits.max_frame_bytes });
        }
        dst.reserve(self.header_len());
        dst.put_slice(&MAGIC);
        dst.put_u8(VERSION);
        dst.put_u8(self.kind.code());
        dst.put_u8(self.dtype.code());
        dst.put_u8(self.shape.ndim);
        dst.put_u64_le(self.micro_batch);
        dst.put_u32_le(self.seqs.len() as u32);
        dst.put_u32_le(0);
        dst.put_u64_le(self.payload.len() as u64);
        for d in self.shape.dims() {
            dst.put_u64_le(*d);
        }
        dst.put_slice(&self.seqs.0);
        Ok(())
    }

    /// Encodes the whole frame into one buffer (copies the payload; for tests and tools).
    pub fn encode_to_vec(&self, limits: &FrameLimits) -> Result<Vec<u8>, FrameError> {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        self.encode_header(&mut b, limits)?;
        b.put_slice(&self.payload);
        Ok(b.to_vec())
    }

    /// Decodes one complete frame. `buf` must hold exactly one frame; the payload and sequence
    /// list of the result share `buf`'s storage.
    pub fn decode(buf: Bytes, limits: &FrameLimits) -> Result<Frame, FrameError> {
        let have = buf.len();
        if have > limits.max_frame_bytes {
            return Err(FrameError::TooLarge { got: have as u64, limit: limits.max_frame_bytes });
        }
        if have < FIXED_HEADER_LEN {
            return Err(FrameError::Truncated { need: FIXED_HEADER_LEN, have });
        }
        let h = &buf[..FIXED_HEADER_LEN];
        let magic: [u8; 4] = h[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if h[4] != VERSION {
            return Err(FrameError::BadVersion(h[4]));
        }
        let kind = FrameKind::from_code(h[5]).ok_or(FrameError::BadKind(h[5]))?;
        let dtype = DType::from_code(h[6]).ok_or(FrameError::BadDType(h[6]))?;
        let ndim = h[7] as usize;
        if ndim > MAX_DIMS {
            return Err(FrameError::TooManyDims(ndim));
        }
        let micro_batch = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let n_seqs = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
        let reserved = u32::from_le_bytes(h[20..24].try_into().expect("4 bytes"));
        if reserved != 0 {
            return Err(FrameError::Reserved(reserved));
        }
        if n_seqs > limits.max_seqs {
            return Err(FrameError::TooManySeqs { got: u64::from(n_seqs), limit: limits.max_seqs });
        }
        let payload_len = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
        // All terms are bounded (ndim <= 4, n_seqs <= u32::MAX), so only the payload can overflow.
        let header_len = FIXED_HEADER_LEN + 8 * ndim + SEQ_ENTRY_LEN * n_seqs as usize;
        let expected = (header_len as u64).checked_add(payload_len);
        if expected != Some(have as u64) {
            return Err(FrameError::LengthMismatch { got: have, expected: expected.unwrap_or(u64::MAX) });
        }
        let mut dims = [0u64; MAX_DIMS];
        for (i, d) in dims.iter_mut().take(ndim).enumerate() {
            let o = FIXED_HEADER_LEN + 8 * i;
            *d = u64::from_le_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
        }
        let seq_start = FIXED_HEADER_LEN + 8 * ndim;
        let frame = Frame {
            kind,
            micro_batch,
            seqs: SeqList(buf.slice(seq_start..header_len)),
            dtype,
            shape: Shape { dims, ndim: ndim as u8 },
            payload: buf.slice(header_len..),
        };
        frame.validate()?;
        Ok(frame)
    }
}
