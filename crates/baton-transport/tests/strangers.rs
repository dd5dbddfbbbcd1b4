//! Strangers on a data port: connections that never prove the cluster key neither end an
//! `Acceptor`'s wait for the member it expects nor delay it, and a flood of them holds no more
//! sockets than `MAX_PENDING_HANDSHAKES` at a time.

mod common;

use std::time::{Duration, Instant};

use baton_transport::negotiate::{
    dial, Acceptor, NegotiateOptions, Preference, MAX_PENDING_HANDSHAKES,
};
use baton_transport::{Frame, LinkConfig, LinkError};
use bytes::Bytes;
use common::{key, LOOPBACK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

fn cfg(k: u8, handshake: Duration) -> LinkConfig {
    let mut c = LinkConfig::new(key(k));
    c.handshake_timeout = handshake;
    c
}

fn tcp_only() -> NegotiateOptions {
    NegotiateOptions {
        preference: Preference::Tcp,
        enable_quic: false,
        enable_rdma: false,
        probe_iterations: 2,
    }
}

/// Reads until the peer hangs up (or `limit` passes); true when it hung up.
async fn hung_up(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let until = Instant::now() + limit;
    loop {
        match timeout(
            until.saturating_duration_since(Instant::now()),
            s.read(&mut buf),
        )
        .await
        {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_neither_end_nor_delay_the_wait_for_a_member() {
    // Long enough that waiting out the stalled stranger first would show in the time taken.
    let handshake = Duration::from_secs(10);
    let member = cfg(1, handshake);
    let acceptor = Acceptor::bind(LOOPBACK.parse().unwrap(), &member, &tcp_only())
        .await
        .unwrap();
    let addr = acceptor.local_addr().unwrap();
    let accepting = tokio::spawn(async move { acceptor.accept().await });

    // One hangs up at once, one stalls, one sends garbage, one holds another key.
    drop(TcpStream::connect(addr).await.unwrap());
    let _stalled = TcpStream::connect(addr).await.unwrap();
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage.write_all(&[0x5a; 64]).await.unwrap();
    let stranger = timeout(
        Duration::from_secs(30),
        dial(addr, &cfg(2, handshake), &tcp_only()),
    )
    .await
    .unwrap();
    assert!(
        matches!(stranger, Err(LinkError::Auth(_))),
        "the stranger was not refused: {:?}",
        stranger.err()
    );
    assert!(
        hung_up(&mut garbage, Duration::from_secs(10)).await,
        "the acceptor kept talking to garbage"
    );
    assert!(
        !accepting.is_finished(),
        "a stranger ended the acceptor's wait: {:?}",
        accepting.await.map(|r| r.err())
    );

    let started = Instant::now();
    let dialed = timeout(Duration::from_secs(30), dial(addr, &member, &tcp_only()))
        .await
        .unwrap()
        .expect("the member's link");
    let accepted = timeout(Duration::from_secs(30), accepting)
        .await
        .unwrap()
        .unwrap()
        .expect("the acceptor's link");
    assert!(
        started.elapsed() < handshake / 2,
        "the member waited {:?} behind a stalled stranger (handshake timeout {handshake:?})",
        started.elapsed()
    );
    dialed
        .link
        .send(&Frame::control(7, Bytes::from_static(b"member")))
        .await
        .unwrap();
    let got = timeout(Duration::from_secs(10), accepted.link.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.micro_batch, &got.payload[..]), (7, &b"member"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_stalled_connections_holds_at_most_the_cap() {
    let handshake = Duration::from_secs(1);
    let acceptor = Acceptor::bind(LOOPBACK.parse().unwrap(), &cfg(1, handshake), &tcp_only())
        .await
        .unwrap();
    let addr = acceptor.local_addr().unwrap();
    let accepting = tokio::spawn(async move { acceptor.accept().await });

    let extra = 8;
    let started = Instant::now();
    let mut flood = Vec::new();
    for _ in 0..MAX_PENDING_HANDSHAKES + extra {
        flood.push(TcpStream::connect(addr).await.unwrap());
    }
    // Every stranger is dropped once its handshake times out: the first MAX_PENDING_HANDSHAKES
    // after about one timeout, the rest (queued in the backlog meanwhile) after about two.
    let closed_at: Vec<Duration> = futures_all(flood.into_iter().map(|mut s| async move {
        assert!(
            hung_up(&mut s, Duration::from_secs(30)).await,
            "a stalled stranger was never dropped"
        );
        started.elapsed()
    }))
    .await;
    let early = closed_at.iter().filter(|t| **t < handshake * 9 / 5).count();
    assert!(
        early <= MAX_PENDING_HANDSHAKES,
        "{early} stalled connections were handled at once, more than the cap of {MAX_PENDING_HANDSHAKES}: {closed_at:?}"
    );
    assert!(
        !accepting.is_finished(),
        "the flood ended the acceptor's wait"
    );
    accepting.abort();
}

/// Runs every future at once and collects their outputs.
async fn futures_all<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
