//! Where each stage goes: the memory-aware planner of `baton-cluster` over the head (when it hosts
//! stage 0) and the workers in chain order, with `cluster.toml`'s per-node overrides and manual
//! ranges. Only when some node does not report its memory does an even split stand in.

use std::ops::Range;

use baton_cluster::config::ClusterConfig;
use baton_cluster::planner::{self, NodeCapacity, PlanOptions};
use baton_model::manifest::Manifest;

use crate::head::HeadError;

/// What a node told the head about itself.
pub struct NodeReport {
    pub name: String,
    pub total_memory: u64,
    pub available_memory: u64,
    /// "cpu", "cuda", "metal": picks the default bandwidth.
    pub backend: String,
    /// Reported bandwidth in bytes/s; 0 when unknown.
    pub bandwidth: u64,
}

/// One layer range per node, in the nodes' order, and a line saying how it was decided.
pub struct Placement {
    pub ranges: Vec<Range<usize>>,
    pub how: String,
}

fn capacity(n: &NodeReport, cluster: &ClusterConfig) -> NodeCapacity {
    let over = cluster.nodes.get(&n.name);
    let available = over.and_then(|o| o.memory).unwrap_or(n.available_memory);
    let total = n.total_memory.max(available);
    NodeCapacity {
        name: n.name.clone(),
        available_bytes: available,
        headroom_bytes: cluster.headroom_for(&n.name).resolve(total),
        bandwidth_bytes_per_s: over
            .and_then(|o| o.memory_bandwidth)
            .or((n.bandwidth > 0).then_some(n.bandwidth))
            .unwrap_or_else(|| planner::default_bandwidth(&n.backend)),
    }
}

/// Places every layer of `manifest` on `nodes` (all of them, in order: the head put them in chain
/// order and runs stage 0 itself when `head_first`).
pub fn place(
    manifest: &Manifest,
    nodes: &[NodeReport],
    cluster: &ClusterConfig,
    max_batch_tokens: u64,
    head_first: bool,
) -> Result<Placement, HeadError> {
    let n_layers = manifest.n_layers;
    let manual = cluster.manual_stages();
    let memory_known = nodes.iter().all(|n| {
        n.available_memory > 0
            || cluster
                .nodes
                .get(&n.name)
                .is_some_and(|o| o.memory.is_some())
    });
    if !memory_known && manual.is_none() {
        let unknown: Vec<&str> = nodes
            .iter()
            .filter(|n| n.available_memory == 0)
            .map(|n| n.name.as_str())
            .collect();
        let ranges = baton_model::pipeline::even_split(n_layers, nodes.len())?;
        return Ok(Placement {
            ranges,
            how: format!(
                "even split of {n_layers} layers over {} stages ({} reported no memory figure)",
                nodes.len(),
                unknown.join(", ")
            ),
        });
    }
    let caps: Vec<NodeCapacity> = nodes.iter().map(|n| capacity(n, cluster)).collect();
    let budget = cluster.serving_budget(manifest.context_length as u64);
    let opts = PlanOptions {
        max_batch_tokens,
        use_all_nodes: true,
        pin_first: head_first,
        manual: manual.clone(),
        ..Default::default()
    };
    let plan = planner::plan(manifest, &caps, &budget, &opts)
        .map_err(|e| HeadError::Plan(e.to_string()))?;
    // Every node was told to take part, so the plan has one stage per node, in order; a manual
    // placement that leaves a node out is an error, since that node's links would dangle.
    let used: Vec<usize> = plan.stages.iter().map(|s| s.node_index).collect();
    if used != (0..nodes.len()).collect::<Vec<_>>() {
        let names: Vec<&str> = plan.stages.iter().map(|s| s.node.as_str()).collect();
        return Err(HeadError::Plan(format!(
            "the placement uses nodes [{}] but the chain is [{}]: give every node a range, in chain order",
            names.join(", "),
            nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    let ranges = plan.stages.iter().map(|s| s.start..s.end).collect();
    let how = format!(
        "{} over {} stages for {} tokens × {} sequences of KV; slowest stage {:.2} ms/token",
        if plan.manual {
            "manual placement"
        } else {
            "planned"
        },
        plan.stages.len(),
        budget.context_length,
        budget.sequences,
        plan.bottleneck_ms
    );
    Ok(Placement { ranges, how })
}
