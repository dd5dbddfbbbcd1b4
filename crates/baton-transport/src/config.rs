//! Settings shared by every link kind.

use std::time::Duration;

use crate::auth::ClusterKey;
use crate::frame::FrameLimits;
use crate::rdma::RdmaConfig;

#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub key: ClusterKey,
    /// Encrypt TCP links (AES-256-GCM) instead of only authenticating each record.
    pub encrypt_tcp: bool,
    pub limits: FrameLimits,
    /// Connecting plus the cluster-key handshake must finish within this.
    pub handshake_timeout: Duration,
    /// A peer that stops answering (host gone, cable pulled) is reported within about this long.
    pub dead_peer_timeout: Duration,
    pub rdma: RdmaConfig,
}

impl LinkConfig {
    pub fn new(key: ClusterKey) -> Self {
        LinkConfig {
            key,
            encrypt_tcp: false,
            limits: FrameLimits::default(),
            handshake_timeout: Duration::from_secs(5),
            dead_peer_timeout: Duration::from_secs(10),
            rdma: RdmaConfig::default(),
        }
    }
}
