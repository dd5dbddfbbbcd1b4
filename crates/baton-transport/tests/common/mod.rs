//! Builds connected link pairs of every kind on loopback for the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::time::Duration;

use baton_transport::rdma::{self, RdmaConfig};
use baton_transport::{quic::QuicEndpoint, tcp, ClusterKey, Link, LinkConfig};
use tokio::net::TcpListener;
use tokio::runtime::Handle;

pub const LOOPBACK: &str = "127.0.0.1:0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    TcpEncrypted,
    Quic,
    /// RDMA through baton's emulated verbs provider, `drop_device` picks one with 1 % drops.
    RdmaEmulated { drops: bool },
}

/// Tests over the emulated RDMA devices take turns: a device has Apple's budget of 10 queue
/// pairs per process, and a link with both ends in this process takes 6, so two such links at
/// once fail the gate's budget step (which is right, and not what these tests are about).
pub fn exclusive(kind: Kind) -> Option<std::sync::MutexGuard<'static, ()>> {
    static RDMA: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed while holding the turn must not fail the others too.
    matches!(kind, Kind::RdmaEmulated { .. }).then(|| RDMA.lock().unwrap_or_else(|e| e.into_inner()))
}

pub fn key(b: u8) -> ClusterKey {
    ClusterKey::from_bytes(&[b; 32]).unwrap()
}

pub fn config(kind: Kind) -> LinkConfig {
    let mut c = LinkConfig::new(key(1));
    c.encrypt_tcp = kind == Kind::TcpEncrypted;
    c.dead_peer_timeout = Duration::from_secs(2);
    if let Kind::RdmaEmulated { drops } = kind {
        c.rdma = emulated_rdma(if drops { "rdma_emu_drop" } else { "rdma_emu0" });
    }
    c
}

/// RDMA settings that load the emulated provider through the normal dlopen path.
pub fn emulated_rdma(device: &str) -> RdmaConfig {
    RdmaConfig {
        library: Some(rdma::emulated_provider_path().expect("the emulated verbs provider was built").into()),
        device: Some(device.into()),
        ..RdmaConfig::default()
    }
}

/// A connected pair; the second end is dialed from `dial_rt` (so a test can kill that runtime).
pub async fn pair_on(kind: Kind, dial_rt: &Handle) -> (Link, Link) {
    let cfg = config(kind);
    match kind {
        Kind::Tcp | Kind::TcpEncrypted => {
            let l = TcpListener::bind(LOOPBACK).await.unwrap();
            let addr = l.local_addr().unwrap();
            let c2 = cfg.clone();
            let dial = dial_rt.spawn(async move { tcp::connect(addr, &c2).await });
            let a = tcp::accept(&l, &cfg).await.unwrap();
            (a, dial.await.unwrap().unwrap())
        }
        Kind::Quic => {
            let server = QuicEndpoint::bind(LOOPBACK.parse().unwrap(), &cfg).unwrap();
            let addr = server.local_addr().unwrap();
            let c2 = cfg.clone();
            let dial = dial_rt.spawn(async move {
                let ep = QuicEndpoint::bind(LOOPBACK.parse().unwrap(), &c2)?;
                ep.connect(addr).await
            });
            let a = server.accept().await.unwrap();
            (a, dial.await.unwrap().unwrap())
        }
        Kind::RdmaEmulated { .. } => {
            let l = TcpListener::bind(LOOPBACK).await.unwrap();
            let addr: SocketAddr = l.local_addr().unwrap();
            let c2 = cfg.clone();
            let dial = dial_rt.spawn(async move { rdma::connect(addr, &c2).await });
            let a = rdma::accept(&l, &cfg).await.unwrap();
            (a, dial.await.unwrap().unwrap())
        }
    }
}

pub async fn pair(kind: Kind) -> (Link, Link) {
    pair_on(kind, &Handle::current()).await
}
