//! The planner on real models: SmolLM2-135M and Qwen2.5-Coder-0.5B read from their GGUF headers
//! (fetched by scripts/fetch-models.sh), and DeepSeek-V3 671B Q4_K_M from a manifest computed from
//! its published shape (tests/data/make_deepseek_manifest.py).

use std::path::PathBuf;

use baton_cluster::planner::{plan, NodeCapacity, Plan, PlanError, PlanOptions, ServingBudget};
use baton_cluster::units::GIB;
use baton_model::manifest::Manifest;

const MIB: u64 = 1 << 20;

fn node(name: &str, bytes: u64, gbps: u64) -> NodeCapacity {
    NodeCapacity {
        name: name.into(),
        available_bytes: bytes,
        headroom_bytes: bytes / 10,
        bandwidth_bytes_per_s: gbps * 1_000_000_000,
    }
}

fn model(file: &str) -> Manifest {
    let dir = std::env::var_os("BATON_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/baton/models")
        });
    let path = dir.join(file);
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models.sh --all (CI does)",
        path.display()
    );
    baton_model::loader::read_manifest(&path).unwrap()
}

fn deepseek() -> Manifest {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/deepseek-v3-q4_k_m.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Structural checks every plan must pass.
fn check(p: &Plan, m: &Manifest) {
    assert_eq!(p.stages[0].start, 0);
    assert_eq!(p.stages.last().unwrap().end, m.n_layers);
    for w in p.stages.windows(2) {
        assert_eq!(w[0].end, w[1].start);
    }
    for s in &p.stages {
        assert_eq!(s.weight_bytes, m.stage_weight_bytes(s.start, s.end));
        assert_eq!(
            s.kv_bytes,
            m.stage_kv_bytes(s.start, s.end, p.budget.context_length * p.budget.sequences)
        );
    }
    let total: u64 = p.stages.iter().map(|s| s.weight_bytes).sum();
    assert_eq!(total, m.total_weight_bytes());
}

#[test]
fn smollm2_splits_evenly_over_equal_nodes_and_reports_a_shortfall() {
    let m = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!((m.n_layers, m.hidden_size), (30, 576));
    let budget = ServingBudget {
        context_length: 2048,
        sequences: 4,
    };
    let nodes: Vec<_> = ["a", "b", "c"].iter().map(|n| node(n, GIB, 100)).collect();
    let p = plan(&m, &nodes, &budget, &PlanOptions::default()).unwrap();
    println!("{p}");
    check(&p, &m);
    assert_eq!(p.stages.len(), 3);
    // The embedding is on stage 0 and the (tied) head copy on the last: the middle stage gets more
    // layers so that the three stages' bytes are as even as layers allow.
    let layers: Vec<usize> = p.stages.iter().map(|s| s.end - s.start).collect();
    assert!(
        layers[1] >= layers[0] && layers[1] >= layers[2],
        "{layers:?}"
    );

    let tiny: Vec<_> = ["a", "b"].iter().map(|n| node(n, 40 * MIB, 100)).collect();
    let Err(PlanError::DoesNotFit(s)) = plan(&m, &tiny, &budget, &PlanOptions::default()) else {
        panic!("expected a shortfall");
    };
    println!("{s}");
    assert!(s.shortfall_bytes > 0);
    assert_eq!(s.nodes.len(), 2);
}

#[test]
fn qwen_coder_on_heterogeneous_nodes() {
    let m = model("Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf");
    assert_eq!(m.n_layers, 24);
    let budget = ServingBudget {
        context_length: 4096,
        sequences: 4,
    };
    // 64/64/48/24 scaled down so that the model (weights + KV) needs every node.
    let need = m.total_weight_bytes()
        + m.stage_kv_bytes(0, m.n_layers, budget.context_length * budget.sequences);
    let unit = need / 120;
    let nodes = [
        node("a", 64 * unit, 400),
        node("b", 64 * unit, 400),
        node("c", 48 * unit, 400),
        node("d", 24 * unit, 400),
    ];
    let p = plan(&m, &nodes, &budget, &PlanOptions::default()).unwrap();
    println!("{p}");
    check(&p, &m);
    // Qwen's tied 136M-parameter vocabulary makes the embedding and head stages the heaviest: the
    // small node cannot hold either, and a fourth stage would not lower the bottleneck.
    assert!((3..=4).contains(&p.stages.len()), "{p}");
    for s in &p.stages {
        let n = &nodes[s.node_index];
        assert!(
            s.weight_bytes + s.kv_bytes + s.activation_bytes + n.headroom_bytes
                <= n.available_bytes
        );
    }
}

#[test]
fn deepseek_v3_manifest_matches_the_published_size() {
    let m = deepseek();
    assert_eq!(
        (m.n_layers, m.hidden_size, m.vocab_size),
        (61, 7168, 129280)
    );
    let gb = m.total_weight_bytes() as f64 / 1e9;
    assert!((395.0..415.0).contains(&gb), "{gb} GB");
    assert_eq!(m.kv_bytes_per_token, vec![1152; 61]);
}

#[test]
fn deepseek_v3_fits_on_8_x_64_gb_with_8k_context_for_4_sequences() {
    let m = deepseek();
    let budget = ServingBudget {
        context_length: 8192,
        sequences: 4,
    };
    let nodes: Vec<_> = (0..8)
        .map(|i| node(&format!("mac{i}"), 64 * GIB, 800))
        .collect();
    let p = plan(&m, &nodes, &budget, &PlanOptions::default()).unwrap();
    println!("{p}");
    check(&p, &m);
    assert_eq!(p.stages.len(), 8);
    assert!(p.stages.iter().all(|s| s.free_bytes > 0));
}

#[test]
fn deepseek_v3_fits_on_4_x_192_gb() {
    let m = deepseek();
    let budget = ServingBudget {
        context_length: 8192,
        sequences: 4,
    };
    let nodes: Vec<_> = (0..4)
        .map(|i| node(&format!("ultra{i}"), 192 * GIB, 800))
        .collect();
    let p = plan(&m, &nodes, &budget, &PlanOptions::default()).unwrap();
    println!("{p}");
    check(&p, &m);
    assert_eq!(p.stages.len(), 4);
}

#[test]
fn deepseek_v3_on_4_x_64_gb_reports_the_shortfall() {
    let m = deepseek();
    let budget = ServingBudget {
        context_length: 8192,
        sequences: 4,
    };
    let nodes: Vec<_> = (0..4)
        .map(|i| node(&format!("mac{i}"), 64 * GIB, 800))
        .collect();
    let Err(PlanError::DoesNotFit(s)) = plan(&m, &nodes, &budget, &PlanOptions::default()) else {
        panic!("671B at Q4_K_M cannot fit in 256 GiB");
    };
    let text = s.to_string();
    println!("{text}");
    // ~379 GiB needed (weights + 2.1 GiB of KV) against ~230 GiB usable.
    let short_gib = s.shortfall_bytes as f64 / GIB as f64;
    assert!((140.0..160.0).contains(&short_gib), "{short_gib} GiB");
    assert_eq!(s.nodes.len(), 4);
    assert!(
        s.nodes.iter().all(|n| (8..=11).contains(&n.max_layers)),
        "{text}"
    );
    assert!(text.contains("short by 1"), "{text}");
}
