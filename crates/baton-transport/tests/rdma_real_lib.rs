//! RDMA layer (c): the real libibverbs.so.1 on a machine without RDMA devices: the gate fails
//! cleanly at the device step, and negotiation falls back, saying why.

use std::time::Duration;

use baton_transport::negotiate::{local_pair, NegotiateOptions, Preference};
use baton_transport::rdma::{self, GateStep, RdmaConfig};
use baton_transport::{ClusterKey, LinkConfig, TransportKind};

fn real() -> RdmaConfig {
    RdmaConfig { library: Some("libibverbs.so.1".into()), ..RdmaConfig::default() }
}

fn cfg() -> LinkConfig {
    let mut c = LinkConfig::new(ClusterKey::from_bytes(&[4; 32]).unwrap());
    c.rdma = real();
    c
}

#[test]
fn gate_fails_cleanly_without_devices() {
    let e = rdma::local_gate(&real(), None).unwrap_err();
    assert_eq!(e.gate_step(), Some(GateStep::Device), "{e}");
}

#[test]
fn missing_library_fails_at_the_library_step() {
    let rc = RdmaConfig { library: Some("/nonexistent/libibverbs.so.1".into()), ..RdmaConfig::default() };
    assert_eq!(rdma::local_gate(&rc, None).unwrap_err().gate_step(), Some(GateStep::Library));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_and_says_why() {
    let (a, b) = tokio::time::timeout(Duration::from_secs(30), local_pair(&cfg(), &NegotiateOptions::default())).await.unwrap().unwrap();
    assert_ne!(a.report.chosen, TransportKind::Rdma);
    // Displayed to 0.1 µs: the peer's copy went through JSON, which may move a float by one ulp.
    assert_eq!(a.report.to_string(), b.report.to_string());
    let why = &a.report.rejected.iter().find(|r| r.transport == TransportKind::Rdma).unwrap().reason;
    assert!(why.contains("find device"), "{why}");
    let other = if a.report.chosen == TransportKind::Tcp { TransportKind::Quic } else { TransportKind::Tcp };
    assert!(a.report.rejected.iter().any(|r| r.transport == other && r.reason.contains("slower by probe")), "{}", a.report);
    a.link.send(&baton_transport::Frame::control(1, bytes::Bytes::from_static(b"works"))).await.unwrap();
    assert_eq!(b.link.recv().await.unwrap().micro_batch, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_rdma_falls_back_loudly() {
    let opts = NegotiateOptions { preference: Preference::Rdma, ..NegotiateOptions::default() };
    let (a, _b) = tokio::time::timeout(Duration::from_secs(30), local_pair(&cfg(), &opts)).await.unwrap().unwrap();
    assert_eq!(a.report.requested, Preference::Rdma);
    assert_ne!(a.report.chosen, TransportKind::Rdma);
    assert!(a.report.to_string().contains("rdma not chosen"), "{}", a.report);
}
