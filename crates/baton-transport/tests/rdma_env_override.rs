//! The verbs library path comes from `BATON_RDMA_LIB` when the configuration names none: the
//! emulated provider is found through that override like any real library.

use baton_transport::rdma::{self, GateStep, RdmaConfig};

#[test]
fn env_override_loads_the_emulated_provider() {
    let path = rdma::emulated_provider_path().expect("the emulated verbs provider was built");
    // The only test in this binary, so no other test sees the variable.
    std::env::set_var("BATON_RDMA_LIB", path);
    let rc = RdmaConfig { device: Some("rdma_emu0".into()), ..RdmaConfig::default() };
    assert_eq!(rdma::library_path(&rc).to_str(), Some(path));
    let steps = rdma::local_gate(&rc, Some("127.0.0.1".parse().unwrap())).unwrap();
    assert_eq!(steps[0].0, GateStep::Library);
    assert!(steps[0].1.contains("EMULATED"), "{:?}", steps[0]);
    assert!(steps.iter().any(|(s, d)| *s == GateStep::Gid && d.contains("::ffff:127.0.0.1")), "{steps:?}");
}
