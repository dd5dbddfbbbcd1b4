//! QUIC links (quinn + rustls, TLS 1.3 only).
//!
//! TLS encrypts; the cluster key authenticates: each end proves the key with the same handshake
//! as TCP, bound to the TLS exporter of this connection, so a man in the middle who terminates
//! TLS on both sides sees two different exporters and both proofs fail. Certificates are
//! therefore throwaway self-signed ones; the verifier still checks the handshake signature.
//!
//! One bidirectional stream carries every frame of the link, which keeps frames ordered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{congestion, Endpoint, EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::Mutex;

use crate::auth::Role;
use crate::config::LinkConfig;
use crate::link::{Inner, Link, LinkError, StreamLink, TransportKind};
use crate::record::{protections, RecordReader, RecordWriter};
use crate::tcp::authenticate;
use crate::tls;

const ALPN: &[u8] = b"baton/1";
const EXPORTER_LABEL: &[u8] = b"EXPORTER-baton-link-auth";
const UDP_BUFFER: usize = 8 << 20;

/// The transport settings, chosen for small messages on a LAN with a few large ones:
/// - `initial_rtt` 1 ms instead of 333 ms: the first loss timer fires on LAN time scales.
/// - stream and connection windows of 64/128 MiB: a 16 MiB frame never waits for flow-control
///   credit, and several can be in flight.
/// - one bidirectional stream, no unidirectional streams and no datagrams: nothing else to keep.
/// - Cubic with a 4 MiB initial window: no slow start for the first large frames.
/// - MTU discovery up to 8,972 bytes (jumbo frames where the path has them, e.g. Thunderbolt
///   bridges and loopback), falling back to 1,200.
/// - keep-alive at a quarter of the idle timeout, so a dead peer is seen within the timeout and a
///   quiet link is never closed.
pub fn transport_config(cfg: &LinkConfig) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.initial_rtt(Duration::from_millis(1))
        .stream_receive_window(VarInt::from_u32(64 << 20))
        .receive_window(VarInt::from_u32(128 << 20))
        .send_window(128 << 20)
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None)
        .keep_alive_interval(Some(cfg.dead_peer_timeout / 4))
        .max_idle_timeout(IdleTimeout::try_from(cfg.dead_peer_timeout).ok());
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(8972);
    t.mtu_discovery_config(Some(mtu));
    let mut cubic = congestion::CubicConfig::default();
    cubic.initial_window(4 << 20);
    t.congestion_controller_factory(Arc::new(cubic));
    t
}

fn tls_err(e: impl std::fmt::Display) -> LinkError {
    LinkError::Quic(format!("tls setup: {e}"))
}

fn server_config(cfg: &LinkConfig) -> Result<quinn::ServerConfig, LinkError> {
    let tls = tls::server_config(ALPN).map_err(tls_err)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).map_err(tls_err)?));
    sc.transport_config(Arc::new(transport_config(cfg)));
    Ok(sc)
}

fn client_config(cfg: &LinkConfig) -> Result<quinn::ClientConfig, LinkError> {
    let tls = tls::client_config(ALPN).map_err(tls_err)?;
    let mut cc = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).map_err(tls_err)?));
    cc.transport_config(Arc::new(transport_config(cfg)));
    Ok(cc)
}

/// What a QUIC link keeps alive, and how it closes.
pub(crate) struct QuicHold {
    pub(crate) conn: quinn::Connection,
    _endpoint: Endpoint,
}

impl QuicHold {
    /// After the close record is sent and the stream finished, give the peer a moment to read it
    /// (it closes the connection when it does) before closing, which would discard unsent data.
    pub(crate) async fn finish(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.conn.closed()).await;
        self.conn.close(0u32.into(), b"closed");
    }
}

/// A UDP endpoint that dials and accepts QUIC links.
pub struct QuicEndpoint {
    endpoint: Endpoint,
    cfg: LinkConfig,
}

impl QuicEndpoint {
    pub fn bind(addr: SocketAddr, cfg: &LinkConfig) -> Result<Self, LinkError> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        // Larger buffers than the default 208 KiB keep bursts of a 16 MiB frame from being dropped.
        let _ = socket.set_recv_buffer_size(UDP_BUFFER);
        let _ = socket.set_send_buffer_size(UDP_BUFFER);
        socket.bind(&addr.into())?;
        let runtime = quinn::default_runtime().ok_or_else(|| LinkError::Quic("no async runtime".into()))?;
        let mut endpoint = Endpoint::new(EndpointConfig::default(), Some(server_config(cfg)?), socket.into(), runtime)?;
        endpoint.set_default_client_config(client_config(cfg)?);
        Ok(QuicEndpoint { endpoint, cfg: cfg.clone() })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        Ok(self.endpoint.local_addr()?)
    }

    pub async fn connect(&self, addr: SocketAddr) -> Result<Link, LinkError> {
        let t = self.cfg.handshake_timeout;
        let setup = async {
            let conn = self
                .endpoint
                .connect(addr, "baton")
                .map_err(|e| LinkError::Quic(e.to_string()))?
                .await
                .map_err(|e| LinkError::Quic(e.to_string()))?;
            let (send, recv) = conn.open_bi().await.map_err(|e| LinkError::Quic(e.to_string()))?;
            self.finish_link(conn, send, recv, Role::Client).await
        };
        tokio::time::timeout(t, setup).await.map_err(|_| LinkError::Timeout(format!("QUIC link to {addr}")))?
    }

    /// Accepts the next authenticated link; connections that fail the handshake are dropped.
    pub async fn accept(&self) -> Result<Link, LinkError> {
        let incoming = self.endpoint.accept().await.ok_or_else(|| LinkError::Quic("endpoint closed".into()))?;
        let t = self.cfg.handshake_timeout;
        let setup = async {
            let conn = incoming.await.map_err(|e| LinkError::Quic(e.to_string()))?;
            let (send, recv) = conn.accept_bi().await.map_err(|e| LinkError::Quic(e.to_string()))?;
            self.finish_link(conn, send, recv, Role::Server).await
        };
        tokio::time::timeout(t, setup).await.map_err(|_| LinkError::Timeout("QUIC link setup".into()))?
    }

    async fn finish_link(
        &self,
        conn: quinn::Connection,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        role: Role,
    ) -> Result<Link, LinkError> {
        let peer = conn.remote_address();
        let mut binding = [0u8; 32];
        conn.export_keying_material(&mut binding, EXPORTER_LABEL, b"")
            .map_err(|_| LinkError::Quic("TLS exporter unavailable".into()))?;
        if let Err(e) = authenticate(&mut recv, &mut send, role, &self.cfg, &binding, peer).await {
            conn.close(1u32.into(), b"authentication failed");
            return Err(e);
        }
        let (ps, pr) = protections(None);
        let inner = Inner::Stream(Box::new(StreamLink {
            reader: Mutex::new(RecordReader::new(Box::new(recv), pr, &self.cfg.limits)),
            writer: Mutex::new(RecordWriter::new(Box::new(send), ps, self.cfg.limits)),
            quic: Some(QuicHold { conn, _endpoint: self.endpoint.clone() }),
        }));
        Ok(Link::new(inner, TransportKind::Quic, false, peer, self.cfg.limits))
    }
}
