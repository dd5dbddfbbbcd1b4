//! Opt-in wall-clock split of layer time between attention, routing, experts and dense MLPs, for
//! benchmarks. Off unless `BATON_PROFILE=1` is set or [`enable`] is called, so a layer pays one
//! relaxed load per phase. Timings are host wall time: exact on CPU, where candle runs ops
//! synchronously; on GPU backends they measure launch time unless the caller synchronises.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Parts of a layer's forward that are timed separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Norm-free attention: projections, rotary, cache append, softmax, output projection.
    Attention,
    /// Router logits, scoring and top-k selection.
    Routing,
    /// Routed and shared experts: gather, expert matmuls, weighted scatter-add.
    Experts,
    /// Dense feed-forward of non-MoE layers.
    DenseMlp,
}

const PHASES: usize = 4;
static TOTALS: [AtomicU64; PHASES] = [const { AtomicU64::new(0) }; PHASES];
static FORCED: AtomicBool = AtomicBool::new(false);

fn enabled() -> bool {
    static FROM_ENV: OnceLock<bool> = OnceLock::new();
    FORCED.load(Ordering::Relaxed)
        || *FROM_ENV.get_or_init(|| std::env::var_os("BATON_PROFILE").is_some_and(|v| v != "0"))
}

/// Turns timing on for the rest of the process.
pub fn enable() {
    FORCED.store(true, Ordering::Relaxed);
}

/// Starts timing a phase; `None` when profiling is off.
pub fn start() -> Option<Instant> {
    enabled().then(Instant::now)
}

/// Adds the time since `start` to `phase`.
pub fn record(phase: Phase, start: Option<Instant>) {
    if let Some(t) = start {
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        TOTALS[phase as usize].fetch_add(ns, Ordering::Relaxed);
    }
}

/// Time spent per phase since the last call (process-wide, all shards).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Profile {
    pub attention: Duration,
    pub routing: Duration,
    pub experts: Duration,
    pub dense_mlp: Duration,
}

/// Returns and resets the accumulated times.
pub fn take() -> Profile {
    let get = |p: Phase| Duration::from_nanos(TOTALS[p as usize].swap(0, Ordering::Relaxed));
    Profile {
        attention: get(Phase::Attention),
        routing: get(Phase::Routing),
        experts: get(Phase::Experts),
        dense_mlp: get(Phase::DenseMlp),
    }
}
