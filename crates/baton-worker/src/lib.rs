//! baton-worker: a pipeline stage.
//!
//! - [`wire`]: frames ↔ tensors (hidden states in the wire dtype, token ids as u32, failures).
//! - [`stage`]: a shard with its samplers, and the loop from the upstream link to the downstream.
//! - [`service`]: the `Worker` control-plane service (hello, load, links, sequences, health, stats).
//! - [`sysinfo`]: memory figures reported in `Hello` and heartbeats.
//! - [`weights`]: a shard's tensors cut out of a GGUF model (head) and cached (worker).
//! - [`progress`]: progress bars and log milestones for weights.

pub mod progress;
pub mod service;
pub mod stage;
pub mod sysinfo;
pub mod weights;
pub mod wire;

pub use service::{WorkerConfig, WorkerService};
pub use stage::Stage;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] baton_model::ModelError),
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("frame: {0}")]
    FrameCodec(#[from] baton_transport::FrameError),
    #[error("frame: {0}")]
    Frame(String),
    #[error("{0}")]
    Request(String),
}

pub type Result<T> = std::result::Result<T, WorkerError>;
