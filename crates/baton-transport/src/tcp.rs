//! TCP links: NODELAY, keepalive, length-delimited records with a MAC (or AEAD) per record.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use crate::auth::{Handshake, Role, SessionKeys, HELLO_LEN, PROOF_LEN};
use crate::config::LinkConfig;
use crate::link::{Inner, Link, LinkError, StreamLink, TransportKind};
use crate::record::{protections, RecordReader, RecordWriter};

const SOCKET_BUFFER: usize = 4 << 20;

/// Socket options for a data link: no Nagle delay, big buffers for 16 MiB frames, and keepalive
/// plus a user timeout so that a vanished host is reported within seconds, not hours.
pub(crate) fn tune(stream: &TcpStream, cfg: &LinkConfig) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let s = SockRef::from(stream);
    s.set_send_buffer_size(SOCKET_BUFFER)?;
    s.set_recv_buffer_size(SOCKET_BUFFER)?;
    // Keepalive counts whole seconds.
    let probe = (cfg.dead_peer_timeout / 4).max(Duration::from_secs(1));
    s.set_tcp_keepalive(&TcpKeepalive::new().with_time(probe).with_interval(probe).with_retries(3))?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    s.set_tcp_user_timeout(Some(cfg.dead_peer_timeout))?;
    Ok(())
}

/// Runs the cluster-key handshake over any byte stream.
pub(crate) async fn authenticate<R, W>(
    r: &mut R,
    w: &mut W,
    role: Role,
    cfg: &LinkConfig,
    binding: &[u8],
    peer: SocketAddr,
) -> Result<SessionKeys, LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let run = async {
        let mut hs = Handshake::new(role, cfg.key.clone(), binding, cfg.encrypt_tcp);
        w.write_all(&hs.hello()).await?;
        w.flush().await?;
        let mut peer_hello = [0u8; HELLO_LEN];
        r.read_exact(&mut peer_hello).await?;
        let proof = hs.receive_hello(&peer_hello)?;
        w.write_all(&proof).await?;
        w.flush().await?;
        let mut peer_proof = [0u8; PROOF_LEN];
        r.read_exact(&mut peer_proof).await?;
        Ok::<_, LinkError>(hs.receive_proof(&peer_proof)?)
    };
    let res = match tokio::time::timeout(cfg.handshake_timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(LinkError::Timeout(format!("handshake not finished within {:?}", cfg.handshake_timeout))),
    };
    if let Err(e) = &res {
        tracing::warn!(%peer, ?role, "refused link: {e}");
    }
    res
}

pub(crate) async fn upgrade(mut stream: TcpStream, role: Role, cfg: &LinkConfig) -> Result<Link, LinkError> {
    let peer = stream.peer_addr()?;
    tune(&stream, cfg)?;
    let (mut r, mut w) = stream.split();
    let keys = authenticate(&mut r, &mut w, role, cfg, b"baton-tcp", peer).await?;
    let (r, w) = stream.into_split();
    let (ps, pr) = protections(Some(&keys));
    let inner = Inner::Stream(Box::new(StreamLink {
        reader: Mutex::new(RecordReader::new(Box::new(r), pr, &cfg.limits)),
        writer: Mutex::new(RecordWriter::new(Box::new(w), ps, cfg.limits)),
        quic: None,
    }));
    Ok(Link::new(inner, TransportKind::Tcp, false, peer, cfg.limits))
}

/// Dials `addr` and authenticates.
pub async fn connect(addr: SocketAddr, cfg: &LinkConfig) -> Result<Link, LinkError> {
    let stream = tokio::time::timeout(cfg.handshake_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| LinkError::Timeout(format!("connecting to {addr}")))??;
    upgrade(stream, Role::Client, cfg).await
}

/// Accepts one connection from `listener` and authenticates it.
pub async fn accept(listener: &TcpListener, cfg: &LinkConfig) -> Result<Link, LinkError> {
    let (stream, _) = listener.accept().await?;
    upgrade(stream, Role::Server, cfg).await
}
