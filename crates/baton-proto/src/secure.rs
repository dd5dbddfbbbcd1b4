//! The control plane's channel security: TLS 1.3 for encryption, and the cluster-key handshake of
//! `baton_transport::auth` run inside it for authentication, exactly as QUIC data links do.
//!
//! TLS certificates are throwaway self-signed ones and are not checked against any authority:
//! what proves a peer is a member is its HMAC proof of the cluster key, and the proof is bound to
//! this TLS session by the TLS exporter, so a man in the middle (two TLS sessions) cannot relay
//! it. Both ends prove the key, so a head without it cannot drive a worker and a worker without
//! it cannot pose as one. Only after both proofs check does gRPC (HTTP/2) start on the stream.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use baton_transport::auth::{AuthError, Handshake, Role, HELLO_LEN, PROOF_LEN};
use baton_transport::tls::{self, CERT_NAME};
use baton_transport::ClusterKey;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::pb::worker_client::WorkerClient;

const EXPORTER_LABEL: &[u8] = b"EXPORTER-baton-control-auth";
const ALPN: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error("cluster key: {0}")]
    Key(AuthError),
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The peer answered but proved a different cluster key (or none).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0} not finished within {1:?}")]
    Timeout(&'static str, Duration),
}

impl From<SecureError> for io::Error {
    fn from(e: SecureError) -> Self {
        match e {
            SecureError::Io(e) => e,
            // Kept whole, so that `connect` can find the refusal inside tonic's error.
            e @ SecureError::Refused(_) => io::Error::new(io::ErrorKind::PermissionDenied, e),
            e => io::Error::other(e.to_string()),
        }
    }
}

/// What a node needs to open and accept control connections: the key and both TLS configs.
#[derive(Clone)]
pub struct ControlSecurity {
    key: ClusterKey,
    server: TlsAcceptor,
    client: TlsConnector,
    /// TLS plus the key handshake must finish within this.
    pub handshake_timeout: Duration,
    /// Handshakes [`Self::incoming`] runs at once; further connections wait in the kernel's
    /// backlog, so strangers cannot make a node hold more sockets than this.
    pub max_pending_handshakes: usize,
}

/// The default of [`ControlSecurity::max_pending_handshakes`].
pub const MAX_PENDING_HANDSHAKES: usize = 64;

impl std::fmt::Debug for ControlSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlSecurity({:?})", self.key)
    }
}

fn tls_err(e: impl std::fmt::Display) -> SecureError {
    SecureError::Tls(e.to_string())
}

impl ControlSecurity {
    /// From the cluster key file's bytes.
    pub fn new(key_material: &[u8]) -> Result<Self, SecureError> {
        let key = ClusterKey::from_bytes(key_material).map_err(SecureError::Key)?;
        let server = tls::server_config(ALPN).map_err(tls_err)?;
        let client = tls::client_config(ALPN).map_err(tls_err)?;
        Ok(ControlSecurity {
            key,
            server: TlsAcceptor::from(Arc::new(server)),
            client: TlsConnector::from(Arc::new(client)),
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: MAX_PENDING_HANDSHAKES,
        })
    }

    /// Dials `addr`, sets up TLS and proves the key both ways.
    pub async fn connect(&self, addr: SocketAddr) -> Result<ControlStream, SecureError> {
        let run = async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(CERT_NAME).map_err(tls_err)?;
            let mut tls = self.client.connect(name, tcp).await?;
            let binding = exporter(tls.get_ref().1)?;
            prove(&mut tls, Role::Client, &self.key, &binding).await?;
            Ok(ControlStream {
                inner: Tls::Client(Box::new(tls)),
                peer: addr,
            })
        };
        tokio::time::timeout(self.handshake_timeout, run)
            .await
            .map_err(|_| {
                SecureError::Timeout(
                    "connecting with TLS and the cluster-key handshake",
                    self.handshake_timeout,
                )
            })?
    }

    /// Accepts one TCP connection's TLS and key handshake.
    pub async fn accept(&self, tcp: TcpStream) -> Result<ControlStream, SecureError> {
        let peer = tcp.peer_addr()?;
        let run = async {
            tcp.set_nodelay(true)?;
            let mut tls = self.server.accept(tcp).await?;
            let binding = exporter(tls.get_ref().1)?;
            prove(&mut tls, Role::Server, &self.key, &binding).await?;
            Ok(ControlStream {
                inner: Tls::Server(Box::new(tls)),
                peer,
            })
        };
        tokio::time::timeout(self.handshake_timeout, run)
            .await
            .map_err(|_| {
                SecureError::Timeout("TLS and the cluster-key handshake", self.handshake_timeout)
            })?
    }

    /// The authenticated connections arriving on `listener`, for `tonic`'s
    /// `serve_with_incoming`. Each handshake runs in its own task, so a peer that stalls delays no
    /// other, and at most [`Self::max_pending_handshakes`] run at once; a connection that fails
    /// its handshake is logged and dropped, never handed on. Accepting stops when the stream is
    /// dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<io::Result<ControlStream>> {
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        let slots = Arc::new(Semaphore::new(self.max_pending_handshakes.max(1)));
        tokio::spawn(async move {
            loop {
                let slot = tokio::select! {
                    _ = tx.closed() => return,
                    s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
                };
                let (tcp, peer) = tokio::select! {
                    _ = tx.closed() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of descriptors and the like: pause rather than spin.
                            tracing::warn!("control listener: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let (this, tx) = (this.clone(), tx.clone());
                tokio::spawn(async move {
                    let authenticated = this.accept(tcp).await;
                    drop(slot);
                    match authenticated {
                        Ok(s) => {
                            let _ = tx.send(Ok(s)).await;
                        }
                        Err(e) => tracing::warn!(%peer, "refused control connection: {e}"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

fn exporter<D>(conn: &rustls::ConnectionCommon<D>) -> Result<[u8; 32], SecureError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, None)
        .map_err(tls_err)?;
    Ok(out)
}

/// The cluster-key handshake of `baton_transport::auth` over the TLS stream.
async fn prove<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    role: Role,
    key: &ClusterKey,
    binding: &[u8],
) -> Result<(), SecureError> {
    let mut hs = Handshake::new(role, key.clone(), binding, false);
    s.write_all(&hs.hello()).await?;
    s.flush().await?;
    let mut peer_hello = [0u8; HELLO_LEN];
    s.read_exact(&mut peer_hello).await?;
    let proof = hs
        .receive_hello(&peer_hello)
        .map_err(|e| SecureError::Refused(e.to_string()))?;
    s.write_all(&proof).await?;
    s.flush().await?;
    let mut peer_proof = [0u8; PROOF_LEN];
    s.read_exact(&mut peer_proof).await?;
    hs.receive_proof(&peer_proof)
        .map_err(|e| SecureError::Refused(e.to_string()))?;
    Ok(())
}

enum Tls {
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An encrypted control connection whose peer proved the cluster key.
pub struct ControlStream {
    inner: Tls,
    peer: SocketAddr,
}

impl ControlStream {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

impl AsyncRead for ControlStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Tls::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Tls::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ControlStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            Tls::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Tls::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Tls::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Tls::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Tls::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Tls::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for ControlStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let local = match &self.inner {
            Tls::Client(s) => s.get_ref().0.local_addr().ok(),
            Tls::Server(s) => s.get_ref().0.local_addr().ok(),
        };
        tonic::transport::server::TcpConnectInfo {
            local_addr: local,
            remote_addr: Some(self.peer),
        }
    }
}

/// Every cause in an error's chain, joined, skipping repeats (tonic wraps the connector's error).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// A channel to `addr` over the secure connection. Reconnects that the channel makes later go
/// through the same handshake.
pub async fn channel(
    addr: SocketAddr,
    security: &ControlSecurity,
    timeout: Duration,
) -> Result<tonic::transport::Channel, SecureError> {
    let sec = security.clone();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let sec = sec.clone();
        async move {
            sec.connect(addr)
                .await
                .map(hyper_util::rt::TokioIo::new)
                .map_err(io::Error::from)
        }
    });
    // The scheme is http because TLS is the connector's job; tonic then speaks HTTP/2 inside it.
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| SecureError::Tls(e.to_string()))?
        .connect_timeout(timeout)
        .connect_with_connector(connector)
        .await
        .map_err(|e| match first_refusal(&e) {
            Some(why) => SecureError::Refused(why),
            None => SecureError::Io(io::Error::other(error_chain(&e))),
        })
}

/// A worker client over [`channel`], with the message bounds of [`crate::worker_client`].
pub async fn connect(
    addr: SocketAddr,
    security: &ControlSecurity,
    timeout: Duration,
) -> Result<WorkerClient<tonic::transport::Channel>, SecureError> {
    Ok(crate::worker_client(
        channel(addr, security, timeout).await?,
    ))
}

/// The key-handshake refusal inside a connect error, if that is what it was.
fn first_refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(SecureError::Refused(why)) = err.downcast_ref::<SecureError>() {
            return Some(why.clone());
        }
        let inner = err.downcast_ref::<io::Error>().and_then(|io| io.get_ref());
        if let Some(SecureError::Refused(why)) = inner.and_then(|i| i.downcast_ref::<SecureError>())
        {
            return Some(why.clone());
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio_stream::StreamExt;

    /// Reads until the peer hangs up; the time it did, or `None` past `limit`.
    async fn hang_up_time(mut s: TcpStream, started: Instant, limit: Duration) -> Option<Duration> {
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout(limit, s.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_strangers_hold_at_most_the_pending_handshakes() {
        let mut sec = ControlSecurity::new(&[5; 32]).unwrap();
        sec.handshake_timeout = Duration::from_millis(500);
        sec.max_pending_handshakes = 2;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = sec.incoming(listener);

        let started = Instant::now();
        let mut flood = Vec::new();
        for _ in 0..6 {
            let s = TcpStream::connect(addr).await.unwrap();
            flood.push(tokio::spawn(hang_up_time(
                s,
                started,
                Duration::from_secs(20),
            )));
        }
        let mut closed = Vec::new();
        for f in flood {
            closed.push(
                f.await
                    .unwrap()
                    .expect("a stalled stranger was never dropped"),
            );
        }
        // Two at a time, each dropped after its timeout: without the bound all six would go at
        // about 0.5 s.
        let early = closed
            .iter()
            .filter(|t| **t < Duration::from_millis(900))
            .count();
        assert!(
            early <= 2,
            "{early} handshakes ran at once, the bound is 2: {closed:?}"
        );

        // A member still gets through once the strangers are gone.
        let member = tokio::time::timeout(Duration::from_secs(10), sec.connect(addr));
        let (dialed, served) = tokio::join!(member, incoming.next());
        dialed
            .expect("the member's connect timed out")
            .expect("the member's connect");
        served
            .expect("the incoming stream ended")
            .expect("the member's connection");
    }
}
