//! The `Link`: ordered, reliable frame delivery between two stages, whatever carries it.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::Mutex;

use crate::auth::AuthError;
use crate::frame::{Frame, FrameError, FrameLimits};
use crate::rdma::{RdmaError, RdmaLink};
use crate::record::{RecordKind, RecordReader, RecordWriter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Rdma,
    Quic,
    Tcp,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Rdma => "rdma",
            TransportKind::Quic => "quic",
            TransportKind::Tcp => "tcp",
        })
    }
}

/// Why a link stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// True when the other end closed the link, false when this end did.
    pub by_peer: bool,
    pub message: String,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = if self.by_peer { "peer" } else { "this end" };
        write!(f, "closed by {who}: {}", self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link {0}")]
    Closed(CloseReason),
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    #[error("refused: {0}")]
    Integrity(String),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("quic: {0}")]
    Quic(String),
    #[error("rdma: {0}")]
    Rdma(#[from] RdmaError),
    #[error("negotiation: {0}")]
    Negotiation(String),
}

impl LinkError {
    /// Errors that mean the link is gone for good (as opposed to a refused frame on send).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, LinkError::Frame(_))
    }
}

/// Stream transports (TCP, QUIC) share the record layer.
pub(crate) struct StreamLink {
    pub(crate) reader: Mutex<RecordReader>,
    pub(crate) writer: Mutex<RecordWriter>,
    /// Keeps the QUIC connection and endpoint alive for as long as the link.
    pub(crate) quic: Option<crate::quic::QuicHold>,
}

pub(crate) enum Inner {
    Stream(Box<StreamLink>),
    Rdma(RdmaLink),
}

/// One end of a data-plane link. Methods take `&self`, so one task may send while another
/// receives; concurrent senders are serialised (each frame is written whole). `send` is not
/// cancel-safe: dropping its future mid-frame leaves the link unusable.
pub struct Link {
    pub(crate) inner: Inner,
    kind: TransportKind,
    emulated: bool,
    peer: SocketAddr,
    limits: FrameLimits,
    closed: Arc<OnceLock<CloseReason>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("transport", &self.transport_name()).field("peer", &self.peer).finish()
    }
}

impl Link {
    pub(crate) fn new(inner: Inner, kind: TransportKind, emulated: bool, peer: SocketAddr, limits: FrameLimits) -> Self {
        Link { inner, kind, emulated, peer, limits, closed: Arc::new(OnceLock::new()) }
    }

    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    /// `rdma-emulated` when the verbs library is baton's emulated provider.
    pub fn transport_name(&self) -> &'static str {
        match (self.kind, self.emulated) {
            (TransportKind::Rdma, true) => "rdma-emulated",
            (TransportKind::Rdma, false) => "rdma",
            (TransportKind::Quic, _) => "quic",
            (TransportKind::Tcp, _) => "tcp",
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn limits(&self) -> &FrameLimits {
        &self.limits
    }

    /// The close reason once the link is closed, by either end.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.closed.get().cloned()
    }

    fn closed_err(&self) -> Option<LinkError> {
        self.closed.get().map(|r| LinkError::Closed(r.clone()))
    }

    fn mark_closed(&self, by_peer: bool, message: String) -> LinkError {
        let _ = self.closed.set(CloseReason { by_peer, message });
        self.closed_err().expect("just set")
    }

    pub async fn send(&self, frame: &Frame) -> Result<(), LinkError> {
        if let Some(e) = self.closed_err() {
            return Err(e);
        }
        let r = match &self.inner {
            Inner::Stream(s) => s.writer.lock().await.write_frame(frame).await,
            Inner::Rdma(r) => r.send(frame).await,
        };
        r.map_err(|e| self.after_error(e))
    }

    pub async fn recv(&self) -> Result<Frame, LinkError> {
        if let Some(e) = self.closed_err() {
            return Err(e);
        }
        let r = match &self.inner {
            Inner::Stream(s) => self.recv_stream(s).await,
            Inner::Rdma(r) => r.recv().await.and_then(|b| Ok(Frame::decode(b, &self.limits)?)),
        };
        r.map_err(|e| self.after_error(e))
    }

    async fn recv_stream(&self, s: &StreamLink) -> Result<Frame, LinkError> {
        let (kind, body) = s.reader.lock().await.read().await?;
        match kind {
            RecordKind::Frame => Ok(Frame::decode(body, &self.limits)?),
            RecordKind::Close => {
                let msg = String::from_utf8_lossy(&body).into_owned();
                if let Some(q) = &s.quic {
                    q.conn.close(0u32.into(), b"peer closed");
                }
                Err(self.mark_closed(true, msg))
            }
            RecordKind::Setup => Err(LinkError::Protocol("setup message on an open link")),
        }
    }

    /// Logs refusals and makes fatal errors stick, so later calls fail fast with the first cause.
    fn after_error(&self, e: LinkError) -> LinkError {
        match &e {
            LinkError::Closed(_) | LinkError::Frame(_) => e,
            LinkError::Integrity(why) => {
                tracing::warn!(peer = %self.peer, transport = self.transport_name(), "refused and dropped link: {why}");
                self.mark_closed(false, format!("refused: {why}"));
                e
            }
            _ => {
                let _ = self.closed.set(CloseReason { by_peer: true, message: e.to_string() });
                e
            }
        }
    }

    /// Closes the link; the other end's `recv` returns [`LinkError::Closed`] with `message`.
    pub async fn close(&self, message: &str) {
        if self.closed.set(CloseReason { by_peer: false, message: message.to_owned() }).is_err() {
            return;
        }
        match &self.inner {
            Inner::Stream(s) => {
                let mut w = s.writer.lock().await;
                let _ = w.write_message(RecordKind::Close, message.as_bytes()).await;
                w.shutdown().await;
                if let Some(q) = &s.quic {
                    q.finish().await;
                }
            }
            Inner::Rdma(r) => r.close(message).await,
        }
    }

    pub(crate) async fn send_setup(&self, body: &[u8]) -> Result<(), LinkError> {
        match &self.inner {
            Inner::Stream(s) => s.writer.lock().await.write_message(RecordKind::Setup, body).await,
            Inner::Rdma(_) => Err(LinkError::Protocol("setup messages travel on the side channel")),
        }
    }

    pub(crate) async fn recv_setup(&self) -> Result<Bytes, LinkError> {
        match &self.inner {
            Inner::Stream(s) => match s.reader.lock().await.read().await? {
                (RecordKind::Setup, b) => Ok(b),
                (RecordKind::Close, b) => Err(self.mark_closed(true, String::from_utf8_lossy(&b).into_owned())),
                (RecordKind::Frame, _) => Err(LinkError::Protocol("frame before link setup finished")),
            },
            Inner::Rdma(_) => Err(LinkError::Protocol("setup messages travel on the side channel")),
        }
    }
}
