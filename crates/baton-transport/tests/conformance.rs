//! One conformance suite, run against every link kind.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_transport::{DType, Frame, FrameKind, Link, LinkError, SeqSpan};
use bytes::Bytes;
use common::{exclusive, pair, pair_on, Kind};
use tokio::time::timeout;

const FRAMES: u64 = 10_000;
const MIB: usize = 1 << 20;

/// Random bytes from which every payload is sliced (so sender and checker agree for free).
fn pool() -> Bytes {
    let mut v = vec![0u8; 16 * MIB + 8192];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for c in v.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    Bytes::from(v)
}

/// Mostly small frames, some medium, a few at the 1 MiB and 16 MiB marks: 1 B to 16 MiB in all,
/// about 130 MiB per run, so the suite stays quick on a 2-core CI box.
fn size_of(i: u64) -> usize {
    match i {
        0 => 1,
        _ if i % 3_333 == 1 => 16 * MIB,
        _ if i % 500 == 7 => MIB,
        _ if i % 50 == 3 => 64 * 1024 + (i as usize % 977),
        _ if i % 10 == 5 => 14 * 1024,
        _ => 1 + (i.wrapping_mul(2_654_435_761) % 4096) as usize,
    }
}

fn frame(pool: &Bytes, i: u64) -> Frame {
    let size = size_of(i);
    let off = (i as usize * 7919) % 8192;
    let payload = pool.slice(off..off + size);
    if i.is_multiple_of(7) && size.is_multiple_of(2) {
        let span = SeqSpan { seq_id: i, start_pos: (i % 1000) as u32, n_tokens: 1 };
        Frame::hidden(i, &[span], DType::BF16, size as u64 / 2, payload).unwrap()
    } else {
        Frame::control(i, payload)
    }
}

async fn ordered_byte_identical(kind: Kind) {
    let (a, b) = pair(kind).await;
    let pool = pool();
    let p2 = pool.clone();
    let sender = tokio::spawn(async move {
        for i in 0..FRAMES {
            a.send(&frame(&p2, i)).await.unwrap();
        }
        a
    });
    for i in 0..FRAMES {
        let got = b.recv().await.unwrap();
        let want = frame(&pool, i);
        assert_eq!(got.micro_batch, i, "frame order");
        assert_eq!(got.kind, want.kind);
        assert_eq!(got.payload.len(), want.payload.len(), "frame {i} length");
        assert!(got.payload == want.payload, "frame {i} bytes differ");
        if want.kind == FrameKind::Hidden {
            assert_eq!(got.seqs, want.seqs);
            assert_eq!(got.shape, want.shape);
        }
    }
    let a = sender.await.unwrap();
    a.close("done").await;
}

async fn concurrent_use(kind: Kind) {
    let (a, b) = pair(kind).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    let pool = pool();
    const SENDERS: u64 = 4;
    const EACH: u64 = 200;
    let mut tasks = Vec::new();
    // Several tasks send on each end while both ends receive: full duplex, interleaved senders.
    for (from, _) in [(a.clone(), b.clone()), (b.clone(), a.clone())] {
        for t in 0..SENDERS {
            let (link, pool) = (from.clone(), pool.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0..EACH {
                    let size = 1 + ((t * 1_000 + n) as usize * 37) % 20_000;
                    let mb = (t << 32) | n;
                    link.send(&Frame::control(mb, pool.slice(n as usize..n as usize + size))).await.unwrap();
                }
            }));
        }
    }
    let recv_all = |link: Arc<Link>, pool: Bytes| async move {
        let mut next = [0u64; SENDERS as usize];
        for _ in 0..SENDERS * EACH {
            let f = link.recv().await.unwrap();
            let (t, n) = ((f.micro_batch >> 32) as usize, f.micro_batch & 0xffff_ffff);
            assert_eq!(n, next[t], "per-sender order");
            next[t] += 1;
            let size = 1 + ((t as u64 * 1_000 + n) as usize * 37) % 20_000;
            assert!(f.payload == pool.slice(n as usize..n as usize + size));
        }
    };
    let ra = tokio::spawn(recv_all(a.clone(), pool.clone()));
    let rb = tokio::spawn(recv_all(b.clone(), pool.clone()));
    for t in tasks {
        t.await.unwrap();
    }
    ra.await.unwrap();
    rb.await.unwrap();
}

async fn close_is_seen(kind: Kind, closer_is_acceptor: bool) {
    let (a, b) = pair(kind).await;
    let (closer, other) = if closer_is_acceptor { (a, b) } else { (b, a) };
    closer.send(&Frame::control(1, Bytes::from_static(b"last"))).await.unwrap();
    closer.close("stage drained").await;
    assert_eq!(other.recv().await.unwrap().payload, Bytes::from_static(b"last"));
    match other.recv().await {
        Err(LinkError::Closed(r)) => {
            assert!(r.by_peer);
            assert_eq!(r.message, "stage drained");
        }
        x => panic!("expected Closed, got {x:?}"),
    }
    assert!(matches!(other.send(&Frame::control(2, Bytes::new())).await, Err(LinkError::Closed(_))));
    assert!(matches!(closer.recv().await, Err(LinkError::Closed(r)) if !r.by_peer));
}

/// The dialing end lives on its own runtime, which is torn down without closing anything: the
/// process-kill case. The survivor must see an error within the deadline.
async fn peer_killed(kind: Kind) {
    let peer_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (ours, theirs) = pair_on(kind, peer_rt.handle()).await;
    let theirs = Arc::new(theirs);
    let t2 = theirs.clone();
    peer_rt.spawn(async move {
        let pool = Bytes::from(vec![7u8; 64 * 1024]);
        let mut i = 0;
        while t2.send(&Frame::control(i, pool.clone())).await.is_ok() {
            i += 1;
        }
    });
    for _ in 0..10 {
        ours.recv().await.unwrap();
    }
    drop(theirs);
    let killed = Instant::now();
    peer_rt.shutdown_background();
    let deadline = Duration::from_secs(8);
    let outcome = timeout(deadline, async {
        loop {
            if let Err(e) = ours.recv().await {
                return e;
            }
        }
    })
    .await
    .expect("a killed peer must surface as an error, not a hang");
    assert!(!matches!(outcome, LinkError::Closed(ref r) if !r.by_peer), "{outcome}");
    assert!(killed.elapsed() < deadline);
    // Sending now fails promptly too.
    let send = timeout(deadline, ours.send(&Frame::control(0, Bytes::from_static(b"x")))).await;
    assert!(matches!(send, Ok(Err(_))), "send after peer death: {send:?}");
}

macro_rules! suite {
    ($m:ident, $kind:expr, $big_secs:expr) => {
        mod $m {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ten_thousand_frames_in_order_byte_identical() {
                let _turn = exclusive($kind);
                timeout(Duration::from_secs($big_secs), ordered_byte_identical($kind)).await.expect("deadline");
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_senders_and_full_duplex() {
                let _turn = exclusive($kind);
                timeout(Duration::from_secs(60), concurrent_use($kind)).await.expect("deadline");
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn close_by_acceptor_is_seen() {
                let _turn = exclusive($kind);
                timeout(Duration::from_secs(20), close_is_seen($kind, true)).await.expect("deadline");
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn close_by_dialer_is_seen() {
                let _turn = exclusive($kind);
                timeout(Duration::from_secs(20), close_is_seen($kind, false)).await.expect("deadline");
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn killed_peer_is_an_error_not_a_hang() {
                let _turn = exclusive($kind);
                timeout(Duration::from_secs(30), peer_killed($kind)).await.expect("deadline");
            }
        }
    };
}

suite!(tcp, Kind::Tcp, 180);
suite!(tcp_encrypted, Kind::TcpEncrypted, 180);
suite!(quic, Kind::Quic, 300);
suite!(rdma_emulated, Kind::RdmaEmulated { drops: false }, 300);
suite!(rdma_emulated_1pct_drops, Kind::RdmaEmulated { drops: true }, 300);
