//! The placement planner: which node serves which contiguous range of layers. A pure function of
//! the model's manifest, the nodes' capacities and the serving budget.
//!
//! **Objective.** Minimise the slowest stage's time per token, estimated as the stage's weight bytes
//! ÷ the node's memory bandwidth (decode reads every weight of a stage once per step); among plans
//! with that bottleneck, use the fewest stages (fewer hops), then the least total time.
//!
//! **Constraint.** On every stage: weights + KV (for `context_length × sequences` tokens) +
//! activation buffers ≤ available memory − headroom.
//!
//! **Order.** Nodes keep the order given: stage 0 goes to the earliest node used (the head lists
//! itself first when it hosts stage 0), and the chain follows the list. A node may be left out
//! when that does not make the bottleneck worse, e.g. a slow node whose smallest share would be
//! the slowest stage, or when fewer stages are as fast; [`PlanOptions::use_all_nodes`] forbids
//! it and [`PlanOptions::pin_first`] keeps the first node in. Reordering is left to the caller:
//! the order carries information the planner lacks (which node is the head, network topology).
//!
//! **Method.** An exact dynamic programme over (nodes considered, layers placed): first the
//! minimal bottleneck, compared exactly as rationals (bytes ÷ bytes/s in 128-bit integers), then
//! the fewest stages and least total time under that bottleneck. O(nodes × layers²).

use std::cmp::Ordering;
use std::fmt;

use baton_model::manifest::Manifest;
use serde::Serialize;

use crate::units::format_bytes;

/// Memory bandwidth assumed for a backend when neither configured nor measured, in bytes/s.
/// Deliberately modest: a plan that is too pessimistic about a node only under-uses it.
pub fn default_bandwidth(backend: &str) -> u64 {
    match backend {
        "cuda" => 900_000_000_000,
        "metal" => 400_000_000_000,
        _ => 50_000_000_000,
    }
}

/// What a node offers the planner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeCapacity {
    pub name: String,
    /// Memory the node can give to baton now, in bytes.
    pub available_bytes: u64,
    /// Bytes to keep free on top of everything the planner counts.
    pub headroom_bytes: u64,
    /// Memory bandwidth in bytes/s (configured, measured, or [`default_bandwidth`]).
    pub bandwidth_bytes_per_s: u64,
}

/// What the cluster must serve at once: the KV cache is sized for `context_length × sequences`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ServingBudget {
    pub context_length: u64,
    pub sequences: u64,
}

impl ServingBudget {
    pub fn kv_tokens(&self) -> u64 {
        self.context_length.saturating_mul(self.sequences)
    }
}

/// One manually placed stage (from `cluster.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManualStage {
    pub node: String,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOptions {
    /// Tokens in the largest micro-batch a stage forwards (prefill chunk plus decode tokens).
    pub max_batch_tokens: u64,
    /// Working memory per batch token, as a multiple of one token's f32 hidden state. Covers the
    /// input and output hidden states, residual, attention projections, MLP intermediates and
    /// attention scratch; 16 is generous for dense models whose MLP is ~4× hidden.
    pub activation_factor: u64,
    /// Give every node at least one layer.
    pub use_all_nodes: bool,
    /// The first node must serve stage 0 (the head runs it in-process).
    pub pin_first: bool,
    /// Explicit ranges that replace the search; validated, not optimised.
    pub manual: Option<Vec<ManualStage>>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            max_batch_tokens: 512,
            activation_factor: 16,
            use_all_nodes: false,
            pin_first: false,
            manual: None,
        }
    }
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stage {
    /// Index into the `nodes` given to [`plan`].
    pub node_index: usize,
    pub node: String,
    /// Layers `[start, end)`.
    pub start: usize,
    pub end: usize,
    /// Includes the embedding on stage 0 and norm + lm_head on the last stage.
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    pub activation_bytes: u64,
    /// Memory left on the node after all of the above and its headroom.
    pub free_bytes: u64,
    /// Weight bytes ÷ bandwidth: the stage's share of one decode step.
    pub ms_per_token: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub stages: Vec<Stage>,
    /// The slowest stage's time: the pipeline's throughput bound.
    pub bottleneck_ms: f64,
    /// Sum over stages: single-stream latency per token, hops excluded.
    pub total_ms: f64,
    pub budget: ServingBudget,
    pub manual: bool,
}

/// One node's side of a failed plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeFit {
    pub name: String,
    pub available_bytes: u64,
    pub headroom_bytes: u64,
    /// Activation buffers a stage on this node reserves.
    pub buffer_bytes: u64,
    /// What is left for weights and KV.
    pub usable_bytes: u64,
    /// The longest run of (non-embedding, non-head) layers with their KV that fits.
    pub max_layers: usize,
}

/// Why a model does not fit, with the whole picture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shortfall {
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    /// Weights + KV.
    pub required_bytes: u64,
    /// Sum of the nodes' usable bytes.
    pub usable_bytes: u64,
    /// `required − usable`, 0 when the total would suffice but no contiguous split fits.
    pub shortfall_bytes: u64,
    pub budget: ServingBudget,
    pub nodes: Vec<NodeFit>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("no nodes to plan over")]
    NoNodes,
    #[error("manifest is inconsistent: {0}")]
    BadManifest(String),
    #[error("{0}")]
    DoesNotFit(Box<Shortfall>),
    #[error("manual placement: {0}")]
    Manual(String),
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tokens = format!(
            "{} tokens × {} sequences",
            self.budget.context_length, self.budget.sequences
        );
        if self.shortfall_bytes > 0 {
            writeln!(
                f,
                "model does not fit: it needs {} (weights {} + KV {} for {tokens}) but the nodes \
                 can hold {}: short by {}",
                format_bytes(self.required_bytes),
                format_bytes(self.weight_bytes),
                format_bytes(self.kv_bytes),
                format_bytes(self.usable_bytes),
                format_bytes(self.shortfall_bytes),
            )?;
        } else {
            writeln!(
                f,
                "model does not fit: it needs {} (weights {} + KV {} for {tokens}) and the nodes \
                 hold {} in all, but no split into contiguous layer ranges fits each node",
                format_bytes(self.required_bytes),
                format_bytes(self.weight_bytes),
                format_bytes(self.kv_bytes),
                format_bytes(self.usable_bytes),
            )?;
        }
        write!(
            f,
            "  {:<16} {:>11} {:>11} {:>11} {:>11} {:>10}",
            "node", "available", "headroom", "buffers", "usable", "max layers"
        )?;
        for n in &self.nodes {
            write!(
                f,
                "\n  {:<16} {:>11} {:>11} {:>11} {:>11} {:>10}",
                n.name,
                format_bytes(n.available_bytes),
                format_bytes(n.headroom_bytes),
                format_bytes(n.buffer_bytes),
                format_bytes(n.usable_bytes),
                n.max_layers
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<5} {:<16} {:>9} {:>11} {:>11} {:>11} {:>9}",
            "stage", "node", "layers", "weights", "kv", "free", "ms/token"
        )?;
        for (i, s) in self.stages.iter().enumerate() {
            write!(
                f,
                "\n{:<5} {:<16} {:>9} {:>11} {:>11} {:>11} {:>9.2}",
                i,
                s.node,
                format!("{}..{}", s.start, s.end),
                format_bytes(s.weight_bytes),
                format_bytes(s.kv_bytes),
                format_bytes(s.free_bytes),
                s.ms_per_token
            )?;
        }
        write!(
            f,
            "\nbottleneck {:.2} ms/token ({:.1} tok/s pipelined), {:.2} ms/token single-stream, \
             KV for {} tokens × {} sequences{}",
            self.bottleneck_ms,
            if self.bottleneck_ms > 0.0 {
                1000.0 / self.bottleneck_ms
            } else {
                f64::INFINITY
            },
            self.total_ms,
            self.budget.context_length,
            self.budget.sequences,
            if self.manual {
                " (manual placement)"
            } else {
                ""
            }
        )
    }
}

/// A stage time as the exact fraction bytes ÷ (bytes/s).
#[derive(Debug, Clone, Copy)]
struct Time {
    bytes: u64,
    bandwidth: u64,
}

impl Time {
    const ZERO: Time = Time {
        bytes: 0,
        bandwidth: 1,
    };

    fn ms(self) -> f64 {
        self.bytes as f64 / self.bandwidth as f64 * 1000.0
    }
}

impl PartialEq for Time {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Time {}
impl PartialOrd for Time {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Time {
    fn cmp(&self, other: &Self) -> Ordering {
        (u128::from(self.bytes) * u128::from(other.bandwidth))
            .cmp(&(u128::from(other.bytes) * u128::from(self.bandwidth)))
    }
}

/// Per-layer costs in prefix-sum form, and what each node can hold.
struct Costs<'a> {
    manifest: &'a Manifest,
    nodes: &'a [NodeCapacity],
    weight_prefix: Vec<u64>,
    kv_prefix: Vec<u64>,
    tokens: u64,
    buffers: u64,
    logits: u64,
}

impl<'a> Costs<'a> {
    fn new(
        manifest: &'a Manifest,
        nodes: &'a [NodeCapacity],
        budget: &ServingBudget,
        opts: &PlanOptions,
    ) -> Self {
        let prefix = |v: &[u64]| {
            let mut p = vec![0u64; v.len() + 1];
            for (i, x) in v.iter().enumerate() {
                p[i + 1] = p[i].saturating_add(*x);
            }
            p
        };
        Costs {
            manifest,
            nodes,
            weight_prefix: prefix(&manifest.layer_bytes),
            kv_prefix: prefix(&manifest.kv_bytes_per_token),
            tokens: budget.kv_tokens(),
            buffers: manifest
                .activation_bytes_per_token
                .saturating_mul(opts.max_batch_tokens)
                .saturating_mul(opts.activation_factor),
            // The last stage also holds f32 logits for one position per sequence.
            logits: (manifest.vocab_size as u64)
                .saturating_mul(4)
                .saturating_mul(budget.sequences),
        }
    }

    fn n_layers(&self) -> usize {
        self.manifest.n_layers
    }

    fn weights(&self, start: usize, end: usize) -> u64 {
        let mut bytes = self.weight_prefix[end] - self.weight_prefix[start];
        if start == 0 {
            bytes = bytes.saturating_add(self.manifest.embedding_bytes);
        }
        if end == self.n_layers() {
            bytes = bytes.saturating_add(self.manifest.head_bytes);
        }
        bytes
    }

    fn kv(&self, start: usize, end: usize) -> u64 {
        (self.kv_prefix[end] - self.kv_prefix[start]).saturating_mul(self.tokens)
    }

    fn activation(&self, end: usize) -> u64 {
        if end == self.n_layers() {
            self.buffers.saturating_add(self.logits)
        } else {
            self.buffers
        }
    }

    /// Bytes node `n` has for weights + KV + buffers.
    fn usable(&self, n: usize) -> u64 {
        self.nodes[n]
            .available_bytes
            .saturating_sub(self.nodes[n].headroom_bytes)
    }

    fn need(&self, start: usize, end: usize) -> u64 {
        self.weights(start, end)
            .saturating_add(self.kv(start, end))
            .saturating_add(self.activation(end))
    }

    fn fits(&self, n: usize, start: usize, end: usize) -> bool {
        self.need(start, end) <= self.usable(n)
    }

    fn time(&self, n: usize, start: usize, end: usize) -> Time {
        Time {
            bytes: self.weights(start, end),
            bandwidth: self.nodes[n].bandwidth_bytes_per_s,
        }
    }

    fn stage(&self, n: usize, start: usize, end: usize) -> Stage {
        let weight_bytes = self.weights(start, end);
        let kv_bytes = self.kv(start, end);
        let activation_bytes = self.activation(end);
        Stage {
            node_index: n,
            node: self.nodes[n].name.clone(),
            start,
            end,
            weight_bytes,
            kv_bytes,
            activation_bytes,
            free_bytes: self.usable(n).saturating_sub(self.need(start, end)),
            ms_per_token: self.time(n, start, end).ms(),
        }
    }

    fn shortfall(&self, budget: &ServingBudget) -> Shortfall {
        let weight_bytes = self.manifest.total_weight_bytes();
        let kv_bytes = self.kv(0, self.n_layers());
        let required_bytes = weight_bytes.saturating_add(kv_bytes);
        let nodes: Vec<NodeFit> = (0..self.nodes.len())
            .map(|n| {
                let usable_bytes = self.usable(n).saturating_sub(self.buffers);
                NodeFit {
                    name: self.nodes[n].name.clone(),
                    available_bytes: self.nodes[n].available_bytes,
                    headroom_bytes: self.nodes[n].headroom_bytes,
                    buffer_bytes: self.buffers,
                    usable_bytes,
                    max_layers: self.max_run(usable_bytes),
                }
            })
            .collect();
        let usable_bytes = nodes
            .iter()
            .fold(0u64, |a, n| a.saturating_add(n.usable_bytes));
        Shortfall {
            weight_bytes,
            kv_bytes,
            required_bytes,
            usable_bytes,
            shortfall_bytes: required_bytes.saturating_sub(usable_bytes),
            budget: *budget,
            nodes,
        }
    }

    /// Longest window of layers whose weights and KV fit in `bytes` (two pointers).
    fn max_run(&self, bytes: u64) -> usize {
        let cost = |a: usize, b: usize| {
            (self.weight_prefix[b] - self.weight_prefix[a]).saturating_add(self.kv(a, b))
        };
        let (mut best, mut start) = (0, 0);
        for end in 1..=self.n_layers() {
            while start < end && cost(start, end) > bytes {
                start += 1;
            }
            best = best.max(end - start);
        }
        best
    }
}

fn check_manifest(m: &Manifest) -> Result<(), PlanError> {
    if m.n_layers == 0 {
        return Err(PlanError::BadManifest("the model has no layers".into()));
    }
    if m.layer_bytes.len() != m.n_layers || m.kv_bytes_per_token.len() != m.n_layers {
        return Err(PlanError::BadManifest(format!(
            "{} layers but {} layer sizes and {} KV sizes",
            m.n_layers,
            m.layer_bytes.len(),
            m.kv_bytes_per_token.len()
        )));
    }
    Ok(())
}

/// Places `manifest` over `nodes`. See the module documentation for the objective.
pub fn plan(
    manifest: &Manifest,
    nodes: &[NodeCapacity],
    budget: &ServingBudget,
    opts: &PlanOptions,
) -> Result<Plan, PlanError> {
    check_manifest(manifest)?;
    if nodes.is_empty() {
        return Err(PlanError::NoNodes);
    }
    if let Some(bad) = nodes.iter().find(|n| n.bandwidth_bytes_per_s == 0) {
        return Err(PlanError::BadManifest(format!(
            "node {} has zero memory bandwidth",
            bad.name
        )));
    }
    let costs = Costs::new(manifest, nodes, budget, opts);
    let stages = match &opts.manual {
        Some(manual) => manual_stages(&costs, manual)?,
        None => search(&costs, opts)
            .ok_or_else(|| PlanError::DoesNotFit(Box::new(costs.shortfall(budget))))?,
    };
    let stages: Vec<Stage> = stages
        .into_iter()
        .map(|(n, a, b)| costs.stage(n, a, b))
        .collect();
    Ok(Plan {
        bottleneck_ms: stages.iter().map(|s| s.ms_per_token).fold(0.0, f64::max),
        total_ms: stages.iter().map(|s| s.ms_per_token).sum(),
        stages,
        budget: *budget,
        manual: opts.manual.is_some(),
    })
}

fn manual_stages(
    costs: &Costs<'_>,
    manual: &[ManualStage],
) -> Result<Vec<(usize, usize, usize)>, PlanError> {
    let err = |m: String| Err(PlanError::Manual(m));
    if manual.is_empty() {
        return err("no stages given".into());
    }
    let n_layers = costs.n_layers();
    let mut out = Vec::with_capacity(manual.len());
    let mut next = 0;
    let mut too_big = Vec::new();
    for s in manual {
        let Some(n) = costs.nodes.iter().position(|c| c.name == s.node) else {
            let known: Vec<&str> = costs.nodes.iter().map(|c| c.name.as_str()).collect();
            return err(format!(
                "node `{}` is not in the cluster (known: {})",
                s.node,
                known.join(", ")
            ));
        };
        if out.iter().any(|&(m, _, _)| m == n) {
            return err(format!("node `{}` has more than one range", s.node));
        }
        if s.start >= s.end || s.end > n_layers {
            return err(format!(
                "`{}` has layers {}..{}, not a non-empty range within 0..{n_layers}",
                s.node, s.start, s.end
            ));
        }
        if s.start != next {
            return err(if s.start > next {
                format!("layers {next}..{} are not assigned to any node", s.start)
            } else {
                format!(
                    "layers {}..{next} are assigned twice (again to `{}`)",
                    s.start, s.node
                )
            });
        }
        if !costs.fits(n, s.start, s.end) {
            too_big.push(format!(
                "`{}` ({}..{}) needs {} but has {} usable",
                s.node,
                s.start,
                s.end,
                format_bytes(costs.need(s.start, s.end)),
                format_bytes(costs.usable(n))
            ));
        }
        out.push((n, s.start, s.end));
        next = s.end;
    }
    if next != n_layers {
        return err(format!(
            "layers {next}..{n_layers} are not assigned to any node"
        ));
    }
    if !too_big.is_empty() {
        return err(format!("stages do not fit: {}", too_big.join("; ")));
    }
    Ok(out)
}

/// The exact search: `(node, start, end)` per stage, or `None` when nothing fits.
fn search(costs: &Costs<'_>, opts: &PlanOptions) -> Option<Vec<(usize, usize, usize)>> {
    let (n_nodes, n_layers) = (costs.nodes.len(), costs.n_layers());
    let may_skip = |j: usize| !(opts.use_all_nodes || opts.pin_first && j == 0);

    // Phase 1: best[j][i] = least bottleneck placing layers [0, i) on nodes [0, j).
    let mut best: Vec<Vec<Option<Time>>> = vec![vec![None; n_layers + 1]; n_nodes + 1];
    best[0][0] = Some(Time::ZERO);
    for j in 0..n_nodes {
        for i in 0..=n_layers {
            let mut cell = if may_skip(j) { best[j][i] } else { None };
            for (k, prev) in best[j][..i].iter().enumerate() {
                let Some(prev) = *prev else { continue };
                if costs.fits(j, k, i) {
                    let t = prev.max(costs.time(j, k, i));
                    if cell.is_none_or(|c| t < c) {
                        cell = Some(t);
                    }
                }
            }
            best[j + 1][i] = cell;
        }
    }
    let bound = best[n_nodes][n_layers]?;

    // Phase 2: under that bound, fewest stages, then least total time; keep choices to rebuild.
    #[derive(Clone, Copy)]
    struct Cell {
        stages: usize,
        total_ms: f64,
        from: Option<usize>,
    }
    let better = |a: &Cell, b: &Cell| {
        a.stages < b.stages || (a.stages == b.stages && a.total_ms < b.total_ms)
    };
    let mut cells: Vec<Vec<Option<Cell>>> = vec![vec![None; n_layers + 1]; n_nodes + 1];
    cells[0][0] = Some(Cell {
        stages: 0,
        total_ms: 0.0,
        from: None,
    });
    for j in 0..n_nodes {
        for i in 0..=n_layers {
            let mut cell = if may_skip(j) {
                cells[j][i].map(|c| Cell { from: None, ..c })
            } else {
                None
            };
            for (k, prev) in cells[j][..i].iter().enumerate() {
                let Some(prev) = *prev else { continue };
                if costs.fits(j, k, i) && costs.time(j, k, i) <= bound {
                    let cand = Cell {
                        stages: prev.stages + 1,
                        total_ms: prev.total_ms + costs.time(j, k, i).ms(),
                        from: Some(k),
                    };
                    if cell.as_ref().is_none_or(|c| better(&cand, c)) {
                        cell = Some(cand);
                    }
                }
            }
            cells[j + 1][i] = cell;
        }
    }

    let mut stages = Vec::new();
    let mut i = n_layers;
    for j in (0..n_nodes).rev() {
        if let Some(k) = cells[j + 1][i]?.from {
            stages.push((j, k, i));
            i = k;
        }
    }
    (i == 0).then(|| {
        stages.reverse();
        stages
    })
}

#[cfg(test)]
mod tests;
