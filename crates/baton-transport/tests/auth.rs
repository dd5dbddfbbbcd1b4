//! Authentication: wrong keys, replayed handshakes and injected bytes are refused and logged.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_transport::auth::AuthError;
use baton_transport::{quic::QuicEndpoint, tcp, Frame, LinkConfig, LinkError};
use bytes::Bytes;
use common::{key, LOOPBACK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Captures this thread's log output (tests run on a current-thread runtime, so tasks log here).
fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    let c = Captured::default();
    let c2 = c.clone();
    let sub = tracing_subscriber::fmt().with_writer(move || c2.clone()).with_ansi(false).finish();
    (c, tracing::subscriber::set_default(sub))
}

fn cfg(k: u8, encrypt: bool) -> LinkConfig {
    let mut c = LinkConfig::new(key(k));
    c.encrypt_tcp = encrypt;
    c.handshake_timeout = Duration::from_secs(3);
    c
}

#[tokio::test]
async fn tcp_wrong_key_is_refused_and_logged() {
    let (logs, _g) = capture_logs();
    let l = TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (c1, c2) = (cfg(1, false), cfg(2, false));
    let (a, d) = timeout(Duration::from_secs(10), async { tokio::join!(tcp::accept(&l, &c1), tcp::connect(addr, &c2)) })
    .await
    .unwrap();
    assert!(matches!(a, Err(LinkError::Auth(AuthError::WrongCluster { .. }))), "{a:?}");
    assert!(matches!(d, Err(LinkError::Auth(AuthError::WrongCluster { .. }))), "{d:?}");
    assert!(logs.text().contains("refused link"), "{}", logs.text());
}

#[tokio::test]
async fn quic_wrong_key_is_refused() {
    let (logs, _g) = capture_logs();
    let server = QuicEndpoint::bind(LOOPBACK.parse().unwrap(), &cfg(1, false)).unwrap();
    let addr = server.local_addr().unwrap();
    let client = QuicEndpoint::bind(LOOPBACK.parse().unwrap(), &cfg(2, false)).unwrap();
    let (a, d) = timeout(Duration::from_secs(10), async { tokio::join!(server.accept(), client.connect(addr)) }).await.unwrap();
    assert!(matches!(a, Err(LinkError::Auth(_))), "{a:?}");
    assert!(d.is_err());
    assert!(logs.text().contains("refused link"));
}

/// Forwards client→server bytes through `edit` (offset, bytes) and records them.
async fn proxy(target: SocketAddr, edit: fn(usize, Vec<u8>) -> Vec<u8>) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = l.local_addr().unwrap();
    let rec = Arc::new(Mutex::new(Vec::new()));
    let rec2 = rec.clone();
    tokio::spawn(async move {
        let (c, _) = l.accept().await.unwrap();
        let s = TcpStream::connect(target).await.unwrap();
        let (mut cr, mut cw) = c.into_split();
        let (mut sr, mut sw) = s.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
        });
        let mut off = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            rec2.lock().unwrap().extend_from_slice(&buf[..n]);
            let out = edit(off, buf[..n].to_vec());
            off += n;
            if sw.write_all(&out).await.is_err() {
                break;
            }
        }
    });
    (addr, rec)
}

const HANDSHAKE: usize = 48 + 32;

async fn tamper_case(encrypt: bool, edit: fn(usize, Vec<u8>) -> Vec<u8>) {
    let (logs, _g) = capture_logs();
    let l = TcpListener::bind(LOOPBACK).await.unwrap();
    let (paddr, _) = proxy(l.local_addr().unwrap(), edit).await;
    let c = cfg(1, encrypt);
    let (server, client) = tokio::join!(tcp::accept(&l, &c), tcp::connect(paddr, &c));
    let (server, client) = (server.unwrap(), client.unwrap());
    client.send(&Frame::control(1, Bytes::from(vec![1u8; 1000]))).await.unwrap();
    let got = timeout(Duration::from_secs(10), server.recv()).await.unwrap();
    assert!(matches!(got, Err(LinkError::Integrity(_))), "{got:?}");
    // The link stays refused.
    assert!(server.recv().await.is_err());
    assert!(logs.text().contains("refused and dropped link"), "{}", logs.text());
}

fn flip_after_handshake(off: usize, mut b: Vec<u8>) -> Vec<u8> {
    let target = HANDSHAKE + 200;
    if (off..off + b.len()).contains(&target) {
        b[target - off] ^= 0x40;
    }
    b
}

fn inject_after_handshake(off: usize, b: Vec<u8>) -> Vec<u8> {
    if (off..off + b.len()).contains(&HANDSHAKE) {
        let i = HANDSHAKE - off;
        let mut out = b[..i].to_vec();
        // A well-formed unprotected record carrying a frame, as an injector would send.
        let frame = Frame::control(9, Bytes::from_static(b"evil")).encode_to_vec(&Default::default()).unwrap();
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&frame);
        out.extend_from_slice(&b[i..]);
        return out;
    }
    b
}

#[tokio::test]
async fn altered_bytes_are_refused_mac() {
    tamper_case(false, flip_after_handshake).await;
}

#[tokio::test]
async fn altered_bytes_are_refused_encrypted() {
    tamper_case(true, flip_after_handshake).await;
}

#[tokio::test]
async fn injected_record_is_refused_mac() {
    tamper_case(false, inject_after_handshake).await;
}

#[tokio::test]
async fn injected_record_is_refused_encrypted() {
    tamper_case(true, inject_after_handshake).await;
}

#[tokio::test]
async fn replayed_handshake_is_refused() {
    let (logs, _g) = capture_logs();
    let l = TcpListener::bind(LOOPBACK).await.unwrap();
    let (paddr, recorded) = proxy(l.local_addr().unwrap(), |_, b| b).await;
    let c = cfg(1, false);
    let (server, client) = tokio::join!(tcp::accept(&l, &c), tcp::connect(paddr, &c));
    let (server, client) = (server.unwrap(), client.unwrap());
    client.send(&Frame::control(1, Bytes::from_static(b"genuine"))).await.unwrap();
    server.recv().await.unwrap();
    let bytes = recorded.lock().unwrap().clone();
    // Replay everything the genuine client sent, on a fresh connection.
    let replay = async {
        let mut s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        s
    };
    let (accepted, _s) = timeout(Duration::from_secs(10), async { tokio::join!(tcp::accept(&l, &c), replay) }).await.unwrap();
    assert!(matches!(accepted, Err(LinkError::Auth(AuthError::BadProof))), "{accepted:?}");
    assert!(logs.text().contains("refused link"));
}

#[tokio::test]
async fn unauthenticated_sender_is_refused() {
    let l = TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = l.local_addr().unwrap();
    let frame = Frame::control(1, Bytes::from(vec![0u8; 100])).encode_to_vec(&Default::default()).unwrap();
    let send = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut rec = (frame.len() as u32).to_le_bytes().to_vec();
        rec.extend_from_slice(&[0; 4]);
        rec.extend_from_slice(&frame);
        s.write_all(&rec).await.unwrap();
        s
    };
    let c = cfg(1, false);
    let (accepted, _s) = timeout(Duration::from_secs(10), async { tokio::join!(tcp::accept(&l, &c), send) }).await.unwrap();
    assert!(matches!(accepted, Err(LinkError::Auth(AuthError::BadMagic(_)))), "{accepted:?}");
}
