use super::*;
use crate::units::GIB;
use proptest::prelude::*;

fn manifest(layer_bytes: Vec<u64>, kv_per_token: u64, embedding: u64, head: u64) -> Manifest {
    let n = layer_bytes.len();
    Manifest {
        architecture: "llama".into(),
        name: Some("synthetic".into()),
        format: "gguf".into(),
        n_layers: n,
        hidden_size: 1024,
        vocab_size: 1000,
        context_length: 8192,
        layer_bytes,
        embedding_bytes: embedding,
        head_bytes: head,
        kv_bytes_per_token: vec![kv_per_token; n],
        kv_dtype: "f16".into(),
        activation_bytes_per_token: 4096,
        bytes_by_dtype: Default::default(),
    }
}

fn node(name: &str, gib: u64, gbps: u64) -> NodeCapacity {
    NodeCapacity {
        name: name.into(),
        available_bytes: gib * GIB,
        headroom_bytes: gib * GIB / 10,
        bandwidth_bytes_per_s: gbps * 1_000_000_000,
    }
}

const BUDGET: ServingBudget = ServingBudget {
    context_length: 4096,
    sequences: 4,
};

/// Every feasible placement, enumerated: (bottleneck, stages, total ms, placement).
fn brute_force(
    m: &Manifest,
    nodes: &[NodeCapacity],
    budget: &ServingBudget,
    opts: &PlanOptions,
) -> Option<(Time, usize, f64)> {
    let costs = Costs::new(m, nodes, budget, opts);
    let mut best: Option<(Time, usize, f64)> = None;
    fn walk(
        costs: &Costs<'_>,
        opts: &PlanOptions,
        j: usize,
        i: usize,
        acc: &mut Vec<(usize, usize, usize)>,
        best: &mut Option<(Time, usize, f64)>,
    ) {
        let (n_nodes, n_layers) = (costs.nodes.len(), costs.n_layers());
        if j == n_nodes {
            if i == n_layers {
                let bottleneck = acc
                    .iter()
                    .map(|&(n, a, b)| costs.time(n, a, b))
                    .max()
                    .unwrap_or(Time::ZERO);
                let total: f64 = acc.iter().map(|&(n, a, b)| costs.time(n, a, b).ms()).sum();
                let cand = (bottleneck, acc.len(), total);
                let better = match best {
                    None => true,
                    Some(b) => {
                        cand.0 < b.0
                            || (cand.0 == b.0 && (cand.1 < b.1 || (cand.1 == b.1 && cand.2 < b.2)))
                    }
                };
                if better {
                    *best = Some(cand);
                }
            }
            return;
        }
        let may_skip = !(opts.use_all_nodes || opts.pin_first && j == 0);
        if may_skip {
            walk(costs, opts, j + 1, i, acc, best);
        }
        for k in i + 1..=n_layers {
            if costs.fits(j, i, k) {
                acc.push((j, i, k));
                walk(costs, opts, j + 1, k, acc, best);
                acc.pop();
            }
        }
    }
    walk(&costs, opts, 0, 0, &mut Vec::new(), &mut best);
    best
}

fn check_valid(p: &Plan, m: &Manifest, nodes: &[NodeCapacity], budget: &ServingBudget) {
    assert_eq!(p.stages.first().unwrap().start, 0);
    assert_eq!(p.stages.last().unwrap().end, m.n_layers);
    for w in p.stages.windows(2) {
        assert_eq!(w[0].end, w[1].start);
        assert!(w[0].node_index < w[1].node_index, "node order is kept");
    }
    for s in &p.stages {
        assert_eq!(s.weight_bytes, m.stage_weight_bytes(s.start, s.end));
        assert_eq!(
            s.kv_bytes,
            m.stage_kv_bytes(s.start, s.end, budget.kv_tokens())
        );
        let n = &nodes[s.node_index];
        assert_eq!(s.node, n.name);
        assert_eq!(
            s.weight_bytes + s.kv_bytes + s.activation_bytes + s.free_bytes + n.headroom_bytes,
            n.available_bytes
        );
    }
}

#[test]
fn heterogeneous_memory_64_64_48_24() {
    // 80 layers of 1.5 GiB with 8 KiB of KV per token: ~123 GiB of weights + 10 GiB of KV.
    let m = manifest(vec![3 * GIB / 2; 80], 8192, GIB, 2 * GIB);
    let nodes = [
        node("a", 64, 400),
        node("b", 64, 400),
        node("c", 48, 400),
        node("d", 24, 400),
    ];
    let p = plan(&m, &nodes, &BUDGET, &PlanOptions::default()).unwrap();
    check_valid(&p, &m, &nodes, &BUDGET);
    assert_eq!(p.stages.len(), 4, "all four nodes are needed to fit\n{p}");
    let layers: Vec<usize> = p.stages.iter().map(|s| s.end - s.start).collect();
    // The 24 GB node is full with fewer layers; the others share the rest within a layer or two.
    assert!(layers[3] < *layers[..3].iter().min().unwrap(), "{p}");
    assert!(p.stages[3].free_bytes < GIB, "{p}");
    assert!(
        layers[..3].iter().max().unwrap() - layers[..3].iter().min().unwrap() <= 2,
        "{p}"
    );
    let (bound, stages, _) = brute_force(&m, &nodes, &BUDGET, &PlanOptions::default()).unwrap();
    assert_eq!(stages, p.stages.len());
    assert!((bound.ms() - p.bottleneck_ms).abs() < 1e-9);
}

#[test]
fn equal_nodes_split_evenly_and_a_slow_node_is_left_out() {
    let m = manifest(vec![GIB; 30], 1024, GIB / 4, GIB / 4);
    let nodes = [node("a", 64, 400), node("b", 64, 400), node("c", 64, 400)];
    let p = plan(&m, &nodes, &BUDGET, &PlanOptions::default()).unwrap();
    let layers: Vec<usize> = p.stages.iter().map(|s| s.end - s.start).collect();
    assert_eq!(layers.iter().sum::<usize>(), 30);
    assert!(layers.iter().all(|&l| (9..=11).contains(&l)), "{layers:?}");

    // A node 100× slower: even one layer there would be the slowest stage.
    let nodes = [
        node("fast1", 64, 400),
        node("slow", 64, 4),
        node("fast2", 64, 400),
    ];
    let p = plan(&m, &nodes, &BUDGET, &PlanOptions::default()).unwrap();
    assert!(p.stages.iter().all(|s| s.node != "slow"), "{p}");
    let forced = PlanOptions {
        use_all_nodes: true,
        ..PlanOptions::default()
    };
    let p = plan(&m, &nodes, &BUDGET, &forced).unwrap();
    assert_eq!(p.stages[1].node, "slow");
    assert_eq!(p.stages[1].end - p.stages[1].start, 1, "{p}");
}

#[test]
fn pin_first_keeps_the_head_in() {
    let m = manifest(vec![GIB; 10], 0, 0, 0);
    let nodes = [node("head", 64, 4), node("w", 64, 400)];
    let free = plan(&m, &nodes, &BUDGET, &PlanOptions::default()).unwrap();
    assert_eq!(free.stages.len(), 1);
    assert_eq!(free.stages[0].node, "w");
    let pinned = plan(
        &m,
        &nodes,
        &BUDGET,
        &PlanOptions {
            pin_first: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        (pinned.stages[0].node.as_str(), pinned.stages[0].end),
        ("head", 1)
    );
}

#[test]
fn shortfall_gives_the_total_and_each_node() {
    let m = manifest(vec![2 * GIB; 40], 16384, GIB, GIB);
    let nodes = [node("a", 32, 400), node("b", 16, 400)];
    let Err(PlanError::DoesNotFit(s)) = plan(&m, &nodes, &BUDGET, &PlanOptions::default()) else {
        panic!("expected DoesNotFit");
    };
    assert_eq!(s.weight_bytes, 82 * GIB);
    assert_eq!(s.kv_bytes, 40 * 16384 * 4096 * 4);
    assert_eq!(s.shortfall_bytes, s.required_bytes - s.usable_bytes);
    assert!(s.shortfall_bytes > 30 * GIB);
    assert_eq!(s.nodes.len(), 2);
    assert_eq!(s.nodes[1].max_layers, 6);
    let text = PlanError::DoesNotFit(s.clone()).to_string();
    assert!(text.contains("short by"), "{text}");
    assert!(text.contains("\n  a ") && text.contains("\n  b "), "{text}");
}

#[test]
fn fragmentation_is_reported_without_a_shortfall() {
    // Enough memory in total, but one layer is bigger than any node.
    let m = manifest(vec![GIB, 40 * GIB, GIB], 0, 0, 0);
    let nodes = [node("a", 32, 400), node("b", 32, 400)];
    let Err(PlanError::DoesNotFit(s)) = plan(&m, &nodes, &BUDGET, &PlanOptions::default()) else {
        panic!("expected DoesNotFit");
    };
    assert_eq!(s.shortfall_bytes, 0);
    assert!(
        s.to_string()
            .contains("no split into contiguous layer ranges"),
        "{s}"
    );
}

#[test]
fn manual_ranges_are_validated() {
    let m = manifest(vec![GIB; 10], 0, 0, 0);
    let nodes = [node("a", 64, 400), node("b", 64, 400), node("tiny", 2, 400)];
    let manual = |v: &[(&str, usize, usize)]| PlanOptions {
        manual: Some(
            v.iter()
                .map(|&(n, s, e)| ManualStage {
                    node: n.into(),
                    start: s,
                    end: e,
                })
                .collect(),
        ),
        ..PlanOptions::default()
    };
    let p = plan(&m, &nodes, &BUDGET, &manual(&[("b", 0, 7), ("a", 7, 10)])).unwrap();
    assert!(p.manual);
    assert_eq!((p.stages[0].node.as_str(), p.stages[1].start), ("b", 7));

    for (stages, needle) in [
        (
            vec![("a", 0, 4), ("b", 5, 10)],
            "layers 4..5 are not assigned",
        ),
        (vec![("a", 0, 6), ("b", 4, 10)], "assigned twice"),
        (vec![("a", 0, 6)], "layers 6..10 are not assigned"),
        (
            vec![("a", 0, 6), ("zz", 6, 10)],
            "`zz` is not in the cluster (known: a, b, tiny)",
        ),
        (vec![("a", 0, 6), ("a", 6, 10)], "more than one range"),
        (vec![("a", 0, 0), ("b", 0, 10)], "not a non-empty range"),
        (vec![("a", 0, 6), ("b", 6, 11)], "within 0..10"),
        (
            vec![("a", 0, 6), ("tiny", 6, 10)],
            "`tiny` (6..10) needs 4.0 GiB",
        ),
        (vec![], "no stages"),
    ] {
        let err = plan(&m, &nodes, &BUDGET, &manual(&stages))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{stages:?}: {err}");
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let mut m = manifest(vec![GIB; 3], 0, 0, 0);
    let nodes = [node("a", 64, 400)];
    assert_eq!(
        plan(&m, &[], &BUDGET, &PlanOptions::default()),
        Err(PlanError::NoNodes)
    );
    let huge = ServingBudget {
        context_length: u64::MAX,
        sequences: u64::MAX,
    };
    assert!(matches!(
        plan(&m, &nodes, &huge, &PlanOptions::default()),
        Err(PlanError::DoesNotFit(_))
    ));
    let mut zero_bw = nodes.clone();
    zero_bw[0].bandwidth_bytes_per_s = 0;
    assert!(plan(&m, &zero_bw, &BUDGET, &PlanOptions::default()).is_err());
    m.kv_bytes_per_token.pop();
    assert!(matches!(
        plan(&m, &nodes, &BUDGET, &PlanOptions::default()),
        Err(PlanError::BadManifest(_))
    ));
    m.n_layers = 0;
    assert!(matches!(
        plan(&m, &nodes, &BUDGET, &PlanOptions::default()),
        Err(PlanError::BadManifest(_))
    ));
}

fn arb_case() -> impl Strategy<Value = (Manifest, Vec<NodeCapacity>, PlanOptions)> {
    (
        proptest::collection::vec(1u64..20, 1..8),
        0u64..3,
        0u64..5,
        0u64..5,
        proptest::collection::vec((5u64..60, 1u64..4), 1..5),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(layers, kv, embed, head, nodes, all, pin)| {
            let mut m = manifest(
                layers.iter().map(|l| l * 1000).collect(),
                kv,
                embed * 1000,
                head * 1000,
            );
            m.activation_bytes_per_token = 1;
            m.vocab_size = 10;
            let nodes = nodes
                .iter()
                .enumerate()
                .map(|(i, &(mem, bw))| NodeCapacity {
                    name: format!("n{i}"),
                    available_bytes: mem * 1000,
                    headroom_bytes: 100,
                    bandwidth_bytes_per_s: bw,
                })
                .collect();
            let opts = PlanOptions {
                max_batch_tokens: 8,
                activation_factor: 2,
                use_all_nodes: all,
                pin_first: pin,
                manual: None,
            };
            (m, nodes, opts)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn dynamic_programme_matches_brute_force((m, nodes, opts) in arb_case()) {
        let budget = ServingBudget { context_length: 100, sequences: 2 };
        let dp = plan(&m, &nodes, &budget, &opts);
        match brute_force(&m, &nodes, &budget, &opts) {
            None => prop_assert!(matches!(dp, Err(PlanError::DoesNotFit(_))), "{dp:?}"),
            Some((bound, stages, total)) => {
                let p = dp.unwrap();
                check_valid(&p, &m, &nodes, &budget);
                let costs = Costs::new(&m, &nodes, &budget, &opts);
                let got = p.stages.iter().map(|s| costs.time(s.node_index, s.start, s.end)).max().unwrap();
                prop_assert_eq!(got, bound);
                prop_assert_eq!(p.stages.len(), stages);
                prop_assert!((p.total_ms - total).abs() <= 1e-9 * total.max(1.0));
                if opts.pin_first {
                    prop_assert_eq!(p.stages[0].node_index, 0);
                }
                if opts.use_all_nodes {
                    prop_assert_eq!(p.stages.len(), nodes.len());
                }
            }
        }
    }
}
