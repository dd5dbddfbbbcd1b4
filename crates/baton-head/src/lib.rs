//! baton-head: the cluster's head.
//!
//! - [`head`]: connects workers, places layers, loads shards, links the chain and runs requests
//!   (a request table keyed by sequence id; tokens stream back per request).
//! - [`status`]: the cluster snapshot behind `baton status`.

pub mod head;
pub mod status;

pub use head::{Event, Finish, GenerateRequest, Head, HeadConfig, HeadError};
pub use status::ClusterStatus;
