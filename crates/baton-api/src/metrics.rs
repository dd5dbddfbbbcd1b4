//! Prometheus figures of one server. Each server owns its recorder (not the process-global one),
//! so several servers in one process (tests, `baton serve`) keep separate counts.

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge, histogram, with_local_recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::backend::BackendStats;

/// Latency buckets in seconds: from sub-millisecond inter-token gaps to slow first tokens.
const LATENCY_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// What [`crate::backend::NodeStats::state`] can say.
pub const NODE_STATES: [&str; 4] = ["serving", "spare", "gone", "drained"];

#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        Self { recorder: Arc::new(recorder), handle }
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        with_local_recorder(self.recorder.as_ref(), f)
    }

    pub fn request(&self, endpoint: &'static str, status: u16) {
        self.with(|| counter!("baton_api_requests_total", "endpoint" => endpoint, "status" => status.to_string()).increment(1));
    }

    pub fn prompt_tokens(&self, n: usize) {
        self.with(|| counter!("baton_api_prompt_tokens_total").increment(n as u64));
    }

    pub fn generated_token(&self) {
        self.with(|| counter!("baton_api_generated_tokens_total").increment(1));
    }

    pub fn time_to_first_token(&self, d: Duration) {
        self.with(|| histogram!("baton_api_time_to_first_token_seconds").record(d.as_secs_f64()));
    }

    pub fn inter_token_latency(&self, d: Duration) {
        self.with(|| histogram!("baton_api_inter_token_latency_seconds").record(d.as_secs_f64()));
    }

    /// The exposition text, with the backend's live figures as of now.
    pub fn render(&self, stats: &BackendStats) -> String {
        self.with(|| {
            gauge!("baton_queue_depth").set(stats.queued as f64);
            gauge!("baton_in_flight_sequences").set(stats.in_flight as f64);
            gauge!("baton_kv_cache_bytes").set(stats.kv_bytes as f64);
            for s in &stats.stages {
                gauge!("baton_stage_forwards_total", "stage" => s.stage.clone()).set(s.forwards as f64);
                gauge!("baton_stage_forward_seconds_total", "stage" => s.stage.clone()).set(s.forward_seconds);
                gauge!("baton_stage_kv_cache_bytes", "stage" => s.stage.clone()).set(s.kv_bytes as f64);
            }
            for n in &stats.nodes {
                gauge!("baton_node_up", "node" => n.node.clone()).set(if n.up { 1.0 } else { 0.0 });
                // A state set (one series per state, 1 for the current one), so that a state
                // left behind does not linger at 1.
                for state in NODE_STATES {
                    gauge!("baton_node_state", "node" => n.node.clone(), "state" => state).set(if n.state == state { 1.0 } else { 0.0 });
                }
                gauge!("baton_node_losses_total", "node" => n.node.clone()).set(n.losses as f64);
            }
            gauge!("baton_cluster_replans_total").set(stats.replans as f64);
            gauge!("baton_resumed_sequences_total").set(stats.resumed_sequences as f64);
            for l in &stats.links {
                let labels = [("from", l.from.clone()), ("to", l.to.clone()), ("transport", l.transport.clone())];
                gauge!("baton_link_rtt_seconds", &labels).set(l.rtt_seconds);
            }
        });
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
