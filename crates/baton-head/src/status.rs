//! What `baton status` shows: the head writes a snapshot of its cluster to the state directory on
//! every change (nodes joining or going, links set up, requests finishing).

use std::path::Path;

use serde::{Deserialize, Serialize};

pub const STATUS_FILE: &str = "head-status.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub head: String,
    pub pid: u32,
    pub model: String,
    pub wire_dtype: String,
    /// `starting`, `serving`, `recovering: <why>`, `re-planning: <why>` or `failed: <why>`.
    pub state: String,
    /// Where the head's operator service (`baton drain`, `join`, `rebalance`) listens.
    #[serde(default)]
    pub control: String,
    /// Chains built after the first.
    #[serde(default)]
    pub replans: u64,
    /// Streams that paused and continued on a rebuilt chain, over the head's life.
    #[serde(default)]
    pub resumed_sequences: u64,
    /// How long the last re-plan paused the streams, in milliseconds.
    #[serde(default)]
    pub last_pause_ms: u64,
    pub updated_unix_ms: u64,
    /// How the layers were placed (planner or even split) and why.
    pub placement: String,
    pub nodes: Vec<NodeStatus>,
    pub stages: Vec<StageStatus>,
    pub links: Vec<LinkStatus>,
    pub tokens_generated: u64,
    /// Decode speed of the last finished request.
    pub last_decode_tok_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub id: String,
    /// Control endpoint, `host:port`; empty for the head itself.
    pub endpoint: String,
    pub alive: bool,
    /// `serving` (in the chain), `spare` (known, used at the next re-plan), `gone` or `drained`.
    #[serde(default)]
    pub state: String,
    /// Why a node is gone or drained; empty while it serves.
    pub detail: String,
    pub backend: String,
    pub total_memory: u64,
    pub available_memory: u64,
    pub kv_bytes: u64,
    pub active_sequences: u32,
    /// Micro-batches its stage ran and their forward time, cumulative (from heartbeats).
    #[serde(default)]
    pub forwards: u64,
    #[serde(default)]
    pub forward_seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageStatus {
    pub index: usize,
    pub node: String,
    pub layers: String,
    pub weight_bytes: u64,
    /// Where its weights came from at the last plan: `kept` (already loaded, unchanged), `local`
    /// (the node's own file), `cache` or `pushed` (by the head).
    #[serde(default)]
    pub source: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LinkStatus {
    pub from: String,
    pub to: String,
    pub transport: String,
    pub rtt_us: f64,
    /// Transports not chosen, with why.
    pub rejected: Vec<String>,
}

impl ClusterStatus {
    /// Writes the snapshot atomically (temporary file + rename), so a reader never sees half.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, path)
    }

    pub fn read(path: &Path) -> std::io::Result<Self> {
        serde_json::from_slice(&std::fs::read(path)?).map_err(std::io::Error::other)
    }
}
