//! baton-head: the cluster's head.
//!
//! - [`head`]: connects workers, places layers, loads shards, links the chain and runs requests;
//!   rebuilds the chain when a node is lost, drained or joins, resuming every stream.
//! - [`control`]: the operator service behind `baton drain`, `baton join`, `baton rebalance`.
//! - [`placement`]: the planner over the chain's nodes (even split only when memory is unknown).
//! - [`push`]: a shard's weights to a worker without the model file (resumable).
//! - [`scheduler`]: pipelined continuous batching: admission queue, micro-batches of several
//!   sequences, chunked prefill mixed with decode, several micro-batches in flight.
//! - [`backend`]: the head as a [`baton_api::Backend`], so the OpenAI API serves the cluster.
//! - [`status`]: the cluster snapshot behind `baton status`.

pub mod backend;
pub mod control;
pub mod head;
pub mod placement;
pub mod push;
pub mod scheduler;
pub mod status;

pub use backend::ClusterBackend;
pub use head::{Event, Finish, GenerateRequest, Head, HeadConfig, HeadError, Replanned, DEFAULT_FAILURE_TIMEOUT};
pub use scheduler::SchedulerConfig;
pub use status::ClusterStatus;
