//! Negotiation: preference and capabilities in, chosen transport + RTT + reasons out.

mod common;

use std::time::Duration;

use baton_transport::negotiate::{local_pair, plan, Capabilities, NegotiateOptions, Preference};
use baton_transport::{Frame, LinkConfig, TransportKind};
use bytes::Bytes;
use common::{emulated_rdma, key};

fn cfg(device: &str) -> LinkConfig {
    let mut c = LinkConfig::new(key(3));
    c.rdma = emulated_rdma(device);
    c
}

async fn pair(c: &LinkConfig, pref: Preference) -> (baton_transport::Negotiated, baton_transport::Negotiated) {
    let opts = NegotiateOptions { preference: pref, ..NegotiateOptions::default() };
    tokio::time::timeout(Duration::from_secs(40), local_pair(c, &opts)).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_takes_rdma_when_the_gate_passes() {
    let (a, b) = pair(&cfg("rdma_emu0"), Preference::Auto).await;
    assert_eq!(a.report.chosen, TransportKind::Rdma, "{}", a.report);
    assert_eq!(a.report.transport_name, "rdma-emulated");
    assert!(a.report.rtt_us > 0.0);
    // Displayed to 0.1 µs: the peer's copy went through JSON, which may move a float by one ulp.
    assert_eq!(a.report.to_string(), b.report.to_string());
    a.link.send(&Frame::control(7, Bytes::from(vec![1; 50_000]))).await.unwrap();
    assert_eq!(b.link.recv().await.unwrap().payload.len(), 50_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_preference_gives_tcp() {
    let (a, b) = pair(&cfg("rdma_emu0"), Preference::Tcp).await;
    assert_eq!((a.report.chosen, b.report.chosen), (TransportKind::Tcp, TransportKind::Tcp));
    assert!(a.report.rejected.iter().all(|r| r.reason.contains("not requested")), "{}", a.report);
    b.link.send(&Frame::control(1, Bytes::new())).await.unwrap();
    a.link.recv().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_preference_gives_quic() {
    let (a, b) = pair(&cfg("rdma_emu0"), Preference::Quic).await;
    assert_eq!((a.report.chosen, b.report.chosen), (TransportKind::Quic, TransportKind::Quic));
    assert_eq!(a.link.kind(), TransportKind::Quic);
    a.link.send(&Frame::control(1, Bytes::new())).await.unwrap();
    b.link.recv().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdma_preference_without_gid_falls_back_with_the_step() {
    let (a, _b) = pair(&cfg("rdma_emu_nogid"), Preference::Rdma).await;
    assert_ne!(a.report.chosen, TransportKind::Rdma);
    let why = &a.report.rejected.iter().find(|r| r.transport == TransportKind::Rdma).unwrap().reason;
    assert!(why.contains("IPv4-mapped GID"), "{why}");
}

#[test]
fn plan_is_pure_and_explains() {
    let ok = Capabilities { quic: Some(1), rdma: Ok(()) };
    let no_rdma = Capabilities { quic: Some(1), rdma: Err("no device".into()) };
    let (t, r) = plan(Preference::Auto, &ok, &ok);
    assert_eq!(t, vec![TransportKind::Rdma, TransportKind::Quic, TransportKind::Tcp]);
    assert!(r.is_empty());
    let (t, r) = plan(Preference::Auto, &ok, &no_rdma);
    assert_eq!(t, vec![TransportKind::Quic, TransportKind::Tcp]);
    assert_eq!(r[0].reason, "peer: no device");
    let (t, r) = plan(Preference::Tcp, &ok, &ok);
    assert_eq!(t, vec![TransportKind::Tcp]);
    assert_eq!(r.len(), 2);
    let no_quic = Capabilities { quic: None, rdma: Ok(()) };
    let (t, r) = plan(Preference::Quic, &no_quic, &ok);
    assert_eq!(t, vec![TransportKind::Tcp]);
    assert!(r.iter().any(|r| r.transport == TransportKind::Quic && r.reason == "disabled on this end"));
}
