//! Data-plane links between pipeline stages: the frame codec, TCP, QUIC and RDMA-verbs links,
//! cluster-key authentication, and link negotiation with fallback.
//!
//! Protocol cores (frame codec, handshake, RDMA slot protocol) do no I/O; thin async drivers
//! run them over sockets and verbs queue pairs.

pub mod auth;
pub mod config;
pub mod frame;
pub mod link;
pub mod negotiate;
pub mod quic;
pub mod rdma;
mod record;
pub mod tcp;
pub mod tls;

pub use auth::{ClusterKey, Role};
pub use config::LinkConfig;
pub use frame::{DType, Frame, FrameError, FrameKind, FrameLimits, SeqList, SeqSpan, Shape};
pub use link::{CloseReason, Link, LinkError, TransportKind};
pub use negotiate::{Acceptor, NegotiateOptions, Negotiated, NegotiationReport, Preference};
