//! Record layer shared by the TCP and QUIC links and the RDMA side channel.
//!
//! A record is `[u32 body_len][u8 kind][3 zero bytes] body [tag]`. On TCP every record carries a
//! tag: a keyed BLAKE3 MAC over (record number, header, body), or an AES-256-GCM tag when the link
//! is encrypted, so injected, dropped or reordered bytes are detected. On QUIC, TLS 1.3 already
//! protects the stream and records carry no tag.

use std::io::IoSlice;

use bytes::{BufMut, Bytes, BytesMut};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth::SessionKeys;
use crate::frame::{Frame, FrameLimits};
use crate::link::LinkError;

pub(crate) const RECORD_HEADER_LEN: usize = 8;
const MAC_LEN: usize = 32;
const AEAD_TAG_LEN: usize = 16;
/// Room for negotiation and side-channel messages beyond the largest frame.
const RECORD_SLACK: usize = 64 << 10;
/// Reads ask the kernel for at least this much so that small records coalesce into few syscalls.
const MIN_READ: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordKind {
    Frame = 0,
    Close = 1,
    Setup = 2,
}

impl RecordKind {
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => RecordKind::Frame,
            1 => RecordKind::Close,
            2 => RecordKind::Setup,
            _ => return None,
        })
    }
}

enum Protect {
    /// The channel below already authenticates and encrypts (QUIC/TLS 1.3).
    Plain,
    Mac([u8; 32]),
    Aead(Box<LessSafeKey>),
}

impl Protect {
    fn tag_len(&self) -> usize {
        match self {
            Protect::Plain => 0,
            Protect::Mac(_) => MAC_LEN,
            Protect::Aead(..) => AEAD_TAG_LEN,
        }
    }
}

/// Keys differ per direction, so the record number alone makes each nonce unique.
fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aead_key(k: &[u8; 32]) -> Box<LessSafeKey> {
    Box::new(LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, k).expect("32-byte AES-256 key")))
}

/// Which protection a record stream gets, per direction.
pub(crate) fn protections(keys: Option<&SessionKeys>) -> (ProtectSend, ProtectRecv) {
    match keys {
        None => (ProtectSend(Protect::Plain), ProtectRecv(Protect::Plain)),
        Some(k) if k.encrypt => {
            (ProtectSend(Protect::Aead(aead_key(&k.send_aead))), ProtectRecv(Protect::Aead(aead_key(&k.recv_aead))))
        }
        Some(k) => (ProtectSend(Protect::Mac(k.send_mac)), ProtectRecv(Protect::Mac(k.recv_mac))),
    }
}

pub(crate) struct ProtectSend(Protect);
pub(crate) struct ProtectRecv(Protect);

pub(crate) struct RecordWriter {
    io: Box<dyn AsyncWrite + Send + Unpin>,
    scratch: BytesMut,
    seq: u64,
    protect: Protect,
    limits: FrameLimits,
}

impl RecordWriter {
    pub(crate) fn new(io: Box<dyn AsyncWrite + Send + Unpin>, protect: ProtectSend, limits: FrameLimits) -> Self {
        RecordWriter { io, scratch: BytesMut::with_capacity(4096), seq: 0, protect: protect.0, limits }
    }

    pub(crate) async fn write_frame(&mut self, frame: &Frame) -> Result<(), LinkError> {
        self.scratch.clear();
        self.scratch.put_bytes(0, RECORD_HEADER_LEN);
        frame.encode_header(&mut self.scratch, &self.limits)?;
        self.finish(RecordKind::Frame, &frame.payload).await
    }

    pub(crate) async fn write_message(&mut self, kind: RecordKind, body: &[u8]) -> Result<(), LinkError> {
        self.scratch.clear();
        self.scratch.put_bytes(0, RECORD_HEADER_LEN);
        self.scratch.put_slice(body);
        self.finish(kind, &[]).await
    }

    /// `scratch` holds header placeholder + the first part of the body; `rest` is the remainder,
    /// written from where it lies (vectored) unless it must be encrypted.
    async fn finish(&mut self, kind: RecordKind, rest: &[u8]) -> Result<(), LinkError> {
        let body_len = self.scratch.len() - RECORD_HEADER_LEN + rest.len();
        let len = u32::try_from(body_len).map_err(|_| LinkError::Protocol("record larger than 4 GiB"))?;
        self.scratch[0..4].copy_from_slice(&len.to_le_bytes());
        self.scratch[4] = kind as u8;
        let seq = self.seq;
        self.seq += 1;
        match &self.protect {
            Protect::Plain => write_all_vectored(&mut self.io, &mut [IoSlice::new(&self.scratch), IoSlice::new(rest)]).await,
            Protect::Mac(key) => {
                let tag = blake3::Hasher::new_keyed(key)
                    .update(&seq.to_le_bytes())
                    .update(&self.scratch)
                    .update(rest)
                    .finalize();
                let mut parts = [IoSlice::new(&self.scratch), IoSlice::new(rest), IoSlice::new(tag.as_bytes())];
                write_all_vectored(&mut self.io, &mut parts).await
            }
            Protect::Aead(key) => {
                self.scratch.put_slice(rest);
                let header: [u8; RECORD_HEADER_LEN] = self.scratch[..RECORD_HEADER_LEN].try_into().expect("header");
                let tag = key
                    .seal_in_place_separate_tag(nonce(seq), Aad::from(header), &mut self.scratch[RECORD_HEADER_LEN..])
                    .map_err(|_| LinkError::Protocol("encryption failed"))?;
                let mut parts = [IoSlice::new(&self.scratch), IoSlice::new(tag.as_ref())];
                write_all_vectored(&mut self.io, &mut parts).await
            }
        }
    }

    pub(crate) async fn shutdown(&mut self) {
        let _ = self.io.shutdown().await;
    }
}

async fn write_all_vectored(io: &mut (dyn AsyncWrite + Send + Unpin), mut parts: &mut [IoSlice<'_>]) -> Result<(), LinkError> {
    IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        let n = io.write_vectored(parts).await?;
        if n == 0 {
            return Err(LinkError::ConnectionLost("peer stopped accepting data".into()));
        }
        IoSlice::advance_slices(&mut parts, n);
    }
    Ok(())
}

pub(crate) struct RecordReader {
    io: Box<dyn AsyncRead + Send + Unpin>,
    buf: BytesMut,
    seq: u64,
    protect: Protect,
    max_body: usize,
}

impl RecordReader {
    pub(crate) fn new(io: Box<dyn AsyncRead + Send + Unpin>, protect: ProtectRecv, limits: &FrameLimits) -> Self {
        RecordReader {
            io,
            buf: BytesMut::with_capacity(MIN_READ),
            seq: 0,
            protect: protect.0,
            max_body: limits.max_frame_bytes + RECORD_SLACK,
        }
    }

    async fn fill(&mut self, n: usize) -> Result<(), LinkError> {
        while self.buf.len() < n {
            self.buf.reserve((n - self.buf.len()).max(MIN_READ));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(if self.buf.is_empty() {
                    LinkError::ConnectionLost("peer went away without closing the link".into())
                } else {
                    LinkError::ConnectionLost("peer went away in the middle of a record".into())
                });
            }
        }
        Ok(())
    }

    /// Reads, authenticates and returns one record's body (sharing the read buffer).
    pub(crate) async fn read(&mut self) -> Result<(RecordKind, Bytes), LinkError> {
        self.fill(RECORD_HEADER_LEN).await?;
        let header: [u8; RECORD_HEADER_LEN] = self.buf[..RECORD_HEADER_LEN].try_into().expect("header");
        let body_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        if body_len > self.max_body {
            return Err(LinkError::Integrity(format!("record of {body_len} bytes exceeds the limit of {}", self.max_body)));
        }
        let kind = RecordKind::from_code(header[4]).filter(|_| header[5..8] == [0, 0, 0]);
        let tag_len = self.protect.tag_len();
        let total = RECORD_HEADER_LEN + body_len + tag_len;
        // An unprotected stream has no tag to check, so refuse garbage before waiting for it.
        if kind.is_none() && tag_len == 0 {
            return Err(LinkError::Integrity(format!("malformed record header {header:02x?}")));
        }
        self.fill(total).await?;
        let mut rec = self.buf.split_to(total);
        let seq = self.seq;
        self.seq += 1;
        match &self.protect {
            Protect::Plain => {}
            Protect::Mac(key) => {
                let tag = blake3::Hasher::new_keyed(key)
                    .update(&seq.to_le_bytes())
                    .update(&rec[..RECORD_HEADER_LEN + body_len])
                    .finalize();
                let got: [u8; MAC_LEN] = rec[RECORD_HEADER_LEN + body_len..].try_into().expect("tag");
                // blake3::Hash compares in constant time.
                if tag != blake3::Hash::from(got) {
                    return Err(LinkError::Integrity(format!("record {seq} failed its MAC (injected or altered bytes)")));
                }
            }
            Protect::Aead(key) => {
                key.open_in_place(nonce(seq), Aad::from(header), &mut rec[RECORD_HEADER_LEN..])
                    .map_err(|_| LinkError::Integrity(format!("record {seq} failed decryption (injected or altered bytes)")))?;
            }
        }
        let kind = kind.ok_or_else(|| LinkError::Integrity(format!("unknown record kind {}", header[4])))?;
        Ok((kind, rec.freeze().slice(RECORD_HEADER_LEN..RECORD_HEADER_LEN + body_len)))
    }
}
