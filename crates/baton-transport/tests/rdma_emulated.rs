//! RDMA layer (b): the production code over baton's EMULATED verbs provider (Apple's rules),
//! loaded through the normal dlopen path. Each test uses its own emulated device, so the
//! per-device queue-pair budget of one test never disturbs another.

mod common;

use std::time::Duration;

use baton_transport::rdma::device::{open_device, Cq, Resources};
use baton_transport::rdma::proto::{ClassSpec, CLASSES};
use baton_transport::rdma::sys::{ibv_wc, IBV_WC_LOC_LEN_ERR};
use baton_transport::rdma::{self, GateStep, RdmaConfig, RdmaError};
use baton_transport::{Frame, LinkConfig, LinkError};
use bytes::Bytes;
use common::{emulated_rdma, key, LOOPBACK};
use tokio::net::TcpListener;
use tokio::time::timeout;

fn cfg_for(rc: RdmaConfig) -> LinkConfig {
    let mut c = LinkConfig::new(key(1));
    c.rdma = rc;
    c
}

/// Sets up a link between two ends with these settings; returns both results.
async fn attempt(a: LinkConfig, b: LinkConfig) -> (Result<baton_transport::Link, LinkError>, Result<baton_transport::Link, LinkError>) {
    let l = TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = l.local_addr().unwrap();
    timeout(Duration::from_secs(20), async { tokio::join!(rdma::accept(&l, &a), rdma::connect(addr, &b)) }).await.unwrap()
}

fn step(r: &Result<baton_transport::Link, LinkError>) -> Option<GateStep> {
    match r {
        Err(LinkError::Rdma(e)) => e.gate_step(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_is_reported_as_emulated() {
    let c = cfg_for(emulated_rdma("rdma_emu1"));
    let (a, b) = attempt(c.clone(), c).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.transport_name(), "rdma-emulated");
    b.send(&Frame::control(5, Bytes::from_static(b"over verbs"))).await.unwrap();
    assert_eq!(a.recv().await.unwrap().payload, Bytes::from_static(b"over verbs"));
    a.close("done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_ipv4_gid_fails_at_gid_step() {
    let c = cfg_for(emulated_rdma("rdma_emu_nogid"));
    let (a, b) = attempt(c.clone(), c).await;
    assert_eq!(step(&a), Some(GateStep::Gid), "{a:?}");
    assert_eq!(step(&b), Some(GateStep::Gid), "{b:?}");
    assert!(a.unwrap_err().to_string().contains("IPv4-mapped"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_down_fails_at_port_step() {
    let c = cfg_for(emulated_rdma("rdma_emu_down"));
    let (a, b) = attempt(c.clone(), c).await;
    assert_eq!(step(&a), Some(GateStep::Port));
    assert_eq!(step(&b), Some(GateStep::Port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_device_fails_at_device_step() {
    let c = cfg_for(emulated_rdma("rdma_en9"));
    let (a, _) = attempt(c.clone(), c).await;
    assert_eq!(step(&a), Some(GateStep::Device));
    assert!(a.unwrap_err().to_string().contains("no RDMA device rdma_en9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_pair_budget_is_asserted_before_the_device_refuses() {
    // Both ends on one emulated device: one link takes 6 of its 10 queue pairs.
    let c = cfg_for(emulated_rdma("rdma_emu2"));
    let (a1, b1) = attempt(c.clone(), c.clone()).await;
    let (_a1, _b1) = (a1.unwrap(), b1.unwrap());
    let (a2, b2) = attempt(c.clone(), c).await;
    let errs = [a2, b2].map(|r| r.unwrap_err().to_string());
    assert!(errs.iter().any(|e| e.contains("QP/MR/PD budget") && e.contains("queue pairs")), "{errs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleventh_queue_pair_is_refused_by_the_device() {
    // With baton's own budget lifted, the emulated device's limit (EBUSY) surfaces precisely.
    let mut rc = emulated_rdma("rdma_emu3");
    rc.max_qps_per_device = 100;
    let c = cfg_for(rc);
    let (a1, b1) = attempt(c.clone(), c.clone()).await;
    let (_a1, _b1) = (a1.unwrap(), b1.unwrap());
    let (a2, b2) = attempt(c.clone(), c).await;
    assert_eq!(step(&a2), Some(GateStep::QueuePair), "{a2:?}");
    assert_eq!(step(&b2), Some(GateStep::QueuePair), "{b2:?}");
    let errs = [a2, b2].map(|r| r.unwrap_err().to_string());
    assert!(errs.iter().any(|e| e.contains("Device or resource busy") || e.contains("busy")), "{errs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_region_is_refused_before_registration() {
    let mut rc = emulated_rdma("rdma_emu4");
    rc.classes[2] = ClassSpec { slot_bytes: 1 << 20, depth: 16 };
    let c = cfg_for(rc);
    let (a, _) = attempt(c.clone(), c).await;
    assert_eq!(step(&a), Some(GateStep::Budget));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_slot_classes_are_refused_at_exchange() {
    let a = cfg_for(emulated_rdma("rdma_emu4"));
    let mut rb = emulated_rdma("rdma_emu4");
    rb.classes[1] = ClassSpec { slot_bytes: 32 << 10, depth: 64 };
    let (a, b) = attempt(a, cfg_for(rb)).await;
    assert_eq!(step(&a), Some(GateStep::Exchange), "{a:?}");
    assert_eq!(step(&b), Some(GateStep::Exchange), "{b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rc_is_used_where_the_provider_offers_it() {
    let c = cfg_for(emulated_rdma("rdma_emu_rc"));
    let (a, b) = attempt(c.clone(), c).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    a.send(&Frame::control(1, Bytes::from(vec![3u8; 100_000]))).await.unwrap();
    assert_eq!(b.recv().await.unwrap().payload.len(), 100_000);
}

fn wait_completion(r: &Resources, cq: Cq) -> Option<ibv_wc> {
    let mut wc = [ibv_wc::default(); 1];
    for _ in 0..1000 {
        if r.poll(cq, &mut wc).unwrap() == 1 {
            return Some(wc[0]);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    None
}

/// Two ends wired by hand, for rules below the link protocol.
fn raw_pair(device: &str, a_classes: [ClassSpec; 3], b_classes: [ClassSpec; 3]) -> (Resources, Resources) {
    let mk = |classes| {
        let rc = RdmaConfig { classes, ..emulated_rdma(device) };
        let d = open_device(&rc, None).unwrap();
        Resources::create(d, &rc, false).unwrap()
    };
    let (mut a, mut b) = (mk(a_classes), mk(b_classes));
    let (ai, bi) = (a.dev.info.clone(), b.dev.info.clone());
    let (aq, bq, ap, bp) = (a.qpns(), b.qpns(), a.psns, b.psns);
    a.connect(&bi, &bq, &bp).unwrap();
    b.connect(&ai, &aq, &ap).unwrap();
    (a, b)
}

#[test]
fn frame_count_mismatch_fails_at_both_ends() {
    let mut big = CLASSES;
    big[1] = ClassSpec { slot_bytes: 32 << 10, depth: 64 };
    let (mut a, b) = raw_pair("rdma_emu5", CLASSES, big);
    a.post_send(1, 0).unwrap();
    let s = wait_completion(&a, Cq::Send).expect("send completion");
    let r = wait_completion(&b, Cq::Recv).expect("receive completion");
    assert_eq!((s.status, r.status), (IBV_WC_LOC_LEN_ERR, IBV_WC_LOC_LEN_ERR));
}

#[test]
fn sends_are_held_until_a_receive_is_posted() {
    let mut one = CLASSES;
    one[0] = ClassSpec { slot_bytes: 4096, depth: 1 };
    let (mut a, mut b) = raw_pair("rdma_emu5", one, one);
    a.post_send(0, 0).unwrap();
    assert_eq!(wait_completion(&a, Cq::Send).map(|w| w.status), Some(0));
    assert_eq!(wait_completion(&b, Cq::Recv).map(|w| w.status), Some(0));
    // b has no receive posted now: the next send is held, with no completion.
    a.post_send(0, 0).unwrap();
    let mut wc = [ibv_wc::default(); 1];
    assert_eq!(a.poll(Cq::Send, &mut wc).unwrap(), 0);
    b.post_recv(0, 0).unwrap();
    assert_eq!(wait_completion(&a, Cq::Send).map(|w| w.status), Some(0));
}

#[test]
fn gate_errors_name_their_step() {
    let e = RdmaError::Gate { step: GateStep::Rtr, detail: "x".into() };
    assert_eq!(e.to_string(), "RDMA gate failed at step 'RTR': x");
}
