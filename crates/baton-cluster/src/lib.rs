//! baton-cluster: who the nodes are, how they find each other and where each layer goes.
//!
//! - [`identity`]: a stable node id persisted in the state directory, and a human name.
//! - [`key`]: the cluster key and the public cluster id derived from it.
//! - [`config`]: `cluster.toml` (documented setting by setting in `cluster.example.toml`).
//! - [`discovery`]: mDNS advertisement and browsing of `_baton._tcp.local.`, and the inventory of
//!   nodes with freshness, merged with static peers.
//! - [`planner`]: the placement planner, a pure function from manifest, nodes and serving budget to
//!   ordered stages.
//! - [`units`]: byte sizes and bandwidths as people write them.

pub mod config;
pub mod discovery;
pub mod identity;
pub mod key;
pub mod planner;
pub mod units;
