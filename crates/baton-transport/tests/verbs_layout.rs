//! RDMA layer (a): the hand-declared verbs ABI against the real header, via a C probe.
//! A missing `<infiniband/verbs.h>` fails this test: CI installs libibverbs-dev first.

use std::collections::BTreeMap;
use std::process::Command;

#[test]
fn rust_declarations_match_verbs_h() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("probe");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/verbs_layout_probe.c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc).arg(src).arg("-o").arg(&exe).output().expect("a C compiler (cc) is needed");
    assert!(
        out.status.success(),
        "compiling the layout probe against <infiniband/verbs.h> failed (install libibverbs-dev):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(run.status.success());
    let c: BTreeMap<String, usize> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    assert_eq!(c.get("port_attr_fits_64"), Some(&1), "ibv_port_attr grew past 64 bytes");
    let rust: BTreeMap<String, usize> = baton_transport::rdma::sys::layout().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let mut mismatches = Vec::new();
    for (k, v) in &rust {
        match c.get(k) {
            Some(cv) if cv == v => {}
            Some(cv) => mismatches.push(format!("{k}: Rust {v}, C {cv}")),
            None => mismatches.push(format!("{k}: not printed by the C probe")),
        }
    }
    assert_eq!(c.len() - 1, rust.len(), "the probe and the Rust table list different items");
    assert!(mismatches.is_empty(), "layout mismatches:\n{}", mismatches.join("\n"));
    // The offsets RDMA.md gives, stated once more in plain numbers.
    assert_eq!(rust["offsetof(ibv_context,ops)"], 8);
    assert_eq!(rust["offsetof(ibv_context_ops,poll_cq)"], 88);
    assert_eq!(rust["offsetof(ibv_context_ops,req_notify_cq)"], 96);
    assert_eq!(rust["offsetof(ibv_context_ops,post_send)"], 200);
    assert_eq!(rust["offsetof(ibv_context_ops,post_recv)"], 208);
    assert_eq!(rust["sizeof(ibv_qp_attr)"], 144);
}
