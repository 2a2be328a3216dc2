use super::*;

/// `C(n - m, k) / C(n, k)`: the chance that a uniform k-subset of n items misses a fixed set
/// of m items.
fn miss_probability(n: usize, m: usize, k: usize) -> f64 {
    (0..k).map(|i| (n - m - i) as f64 / (n - i) as f64).product()
}

/// 4 nodes x 8 GPUs, 64 experts (2 per GPU), K 6, unlimited, 64 000 tokens.
fn small_uniform() -> SimConfig {
    SimConfig {
        gpus: 32,
        gpus_per_node: 8,
        experts: 64,
        top_k: 6,
        max_nodes: None,
        tokens_per_gpu: 2000,
        hidden: 128,
        ..SimConfig::default()
    }
}

#[test]
fn uniform_unlimited_routing_matches_the_closed_forms() {
    let c = small_uniform();
    let r = simulate(&c).unwrap();
    assert_eq!((r.ep_gpus, r.ep_nodes, r.ep_copies, r.experts_per_gpu), (32, 4, 1, 2));
    assert_eq!(r.scenarios.len(), 1);
    let s = &r.scenarios[0];
    let (e, k, n, g) = (64, 6, 4.0, 32.0);
    // A node (a GPU) is reached unless all K experts miss its E/N (E/R) experts.
    let node_hit = 1.0 - miss_probability(e, 16, k);
    let gpu_hit = 1.0 - miss_probability(e, 2, k);
    assert!((s.mean_nodes - n * node_hit).abs() < 0.02, "{} vs {}", s.mean_nodes, n * node_hit);
    assert!((s.mean_gpus - g * gpu_hit).abs() < 0.02, "{} vs {}", s.mean_gpus, g * gpu_hit);
    // IB copies: the reached nodes other than the sender's, which is one of N at random.
    let row = (c.hidden * (c.dispatch_bytes + c.combine_bytes)) as f64;
    let ib = n * node_hit * (n - 1.0) / n * row;
    assert!((s.ib_bytes_per_token - ib).abs() / ib < 0.01, "{} vs {ib}", s.ib_bytes_per_token);
    // NVLink copies: every reached GPU except each node's entry GPU (the sender in its own
    // node, the relay elsewhere), each reached with the same chance.
    let nvlink = (g - n) * gpu_hit * row;
    assert!((s.nvlink_bytes_per_token - nvlink).abs() / nvlink < 0.01, "{} vs {nvlink}", s.nvlink_bytes_per_token);
    assert_eq!(s.max_nodes, 4);
}

#[test]
fn node_limit_caps_the_nodes_reached() {
    for routing in [RoutingModel::Uniform, RoutingModel::Zipf { s: 1.2 }] {
        let c = SimConfig { max_nodes: Some(2), tokens_per_gpu: 300, routing, ..small_uniform() };
        let r = simulate(&c).unwrap();
        let [limited, free] = r.scenarios.as_slice() else { panic!("two scenarios expected") };
        assert_eq!((limited.node_limit, free.node_limit), (Some(2), None));
        assert!(limited.max_nodes <= 2 && limited.mean_nodes <= 2.0, "{limited:?}");
        assert!(free.max_nodes > 2);
        assert!(limited.ib_bytes_per_token < free.ib_bytes_per_token);
    }
    // A limit of all the nodes limits nothing: one scenario.
    let r = simulate(&SimConfig { max_nodes: Some(4), tokens_per_gpu: 10, ..small_uniform() }).unwrap();
    assert_eq!(r.scenarios.len(), 1);
    assert_eq!(r.scenarios[0].node_limit, None);
}

#[test]
fn bytes_are_conserved_and_times_follow_the_bytes() {
    let c = SimConfig {
        max_nodes: Some(3),
        tokens_per_gpu: 200,
        routing: RoutingModel::Zipf { s: 1.0 },
        ..small_uniform()
    };
    for s in simulate(&c).unwrap().scenarios {
        assert_eq!(s.ib_bytes_sent, s.ib_bytes_received);
        assert_eq!(s.nvlink_bytes_sent, s.nvlink_bytes_received);
        assert_eq!(s.tokens, 32 * 200);
        let per_token = s.ib_bytes_sent as f64 / s.tokens as f64;
        assert!((per_token - s.ib_bytes_per_token).abs() < 1e-9);
        // Each IB copy is one row of d elements, dispatch and combine bytes.
        assert_eq!(s.ib_bytes_sent % (c.hidden as u64 * 3), 0);
        // Every (token, expert) pair is computed once.
        assert_eq!(s.rank_rows.iter().sum::<u64>(), s.tokens * c.top_k as u64);
        let by_rank: Vec<u64> = s.expert_load.chunks(2).map(|pair| pair.iter().sum()).collect();
        assert_eq!(by_rank, s.rank_rows);
        // Combine moves the same copies at 2 bytes instead of 1.
        assert!((s.combine_time_s - 2.0 * s.dispatch_time_s).abs() < 1e-15);
        let max_rows = *s.rank_rows.iter().max().unwrap() as f64;
        let flops = (max_rows + 200.0) * 6.0 * 128.0 * 2048.0;
        assert!((s.compute_time_s - flops / 400e12).abs() < 1e-15);
        let mean = s.rank_rows.iter().sum::<u64>() as f64 / 32.0;
        assert!((s.rank_max_violation - (max_rows - mean) / mean).abs() < 1e-12);
    }
}

#[test]
fn skew_raises_per_gpu_imbalance_and_seeds_repeat() {
    let base = SimConfig { tokens_per_gpu: 300, ..small_uniform() };
    let uniform = simulate(&base).unwrap();
    let zipf = simulate(&SimConfig { routing: RoutingModel::Zipf { s: 1.2 }, ..base.clone() }).unwrap();
    assert!(zipf.scenarios[0].rank_max_violation > 2.0 * uniform.scenarios[0].rank_max_violation);
    assert_eq!(simulate(&base).unwrap(), uniform);
    assert_ne!(simulate(&SimConfig { seed: 1, ..base }).unwrap(), uniform);
}

#[test]
fn trace_replay_counts_the_recorded_ids() {
    // 2 nodes x 4 GPUs, 16 experts (2 per GPU, 8 per node), K 2, one token per GPU.
    let c = SimConfig {
        gpus: 8,
        gpus_per_node: 4,
        experts: 16,
        top_k: 2,
        tokens_per_gpu: 3,
        hidden: 10,
        ..SimConfig::default()
    };
    let ids: Vec<u32> = vec![0, 1, 0, 8, 15, 9, 3, 12, 2, 4];
    let mut trace = RoutingTrace::new(16, 2).unwrap();
    trace.push_layer(&ids).unwrap();
    let r = simulate_trace(&c, &trace).unwrap();
    let s = &r.scenarios[0];
    // Hand loop: GPU g's token j is trace token (3g + j) mod 5.
    let (mut nodes, mut ib, mut max_nodes) = (0usize, 0usize, 0usize);
    for g in 0..8 {
        for j in 0..3 {
            let t = (3 * g + j) % 5;
            let mut reached: Vec<usize> = ids[2 * t..2 * t + 2].iter().map(|&e| e as usize / 8).collect();
            reached.dedup();
            nodes += reached.len();
            max_nodes = max_nodes.max(reached.len());
            ib += reached.iter().filter(|&&n| n != g / 4).count();
        }
    }
    assert_eq!(s.name, "trace layer 0");
    assert!((s.mean_nodes - nodes as f64 / 24.0).abs() < 1e-12);
    assert_eq!(s.max_nodes, max_nodes);
    assert_eq!(s.ib_bytes_sent, (ib * 10 * 3) as u64);

    // Through a file, as `--routing trace:FILE`.
    let path = std::env::temp_dir().join(format!("moe-sim-trace-{}.bin", std::process::id()));
    trace.save(&path).unwrap();
    let from_file = simulate(&SimConfig { routing: RoutingModel::Trace { path: path.clone() }, ..c.clone() });
    std::fs::remove_file(&path).unwrap();
    assert_eq!(from_file.unwrap(), r);

    assert!(matches!(
        simulate_trace(&SimConfig { top_k: 3, ..c.clone() }, &trace),
        Err(SimError::TraceMismatch { field: "top_k", trace: 2, config: 3 })
    ));
    assert!(matches!(simulate_trace(&c, &RoutingTrace::new(16, 2).unwrap()), Err(SimError::EmptyTrace)));
    let missing = SimConfig { routing: RoutingModel::Trace { path: "/nonexistent/t.bin".into() }, ..c };
    assert!(matches!(simulate(&missing), Err(SimError::Trace(TraceError::File { .. }))));
}

#[test]
fn bad_settings_name_their_field() {
    let field_of = |c: SimConfig| match simulate(&c) {
        Err(SimError::Setting { field, .. }) => field,
        other => panic!("expected a setting error, got {other:?}"),
    };
    let base = small_uniform();
    assert_eq!(field_of(SimConfig { gpus: 0, ..base.clone() }), "gpus");
    assert_eq!(field_of(SimConfig { hidden: 0, ..base.clone() }), "hidden");
    assert_eq!(field_of(SimConfig { gpus: 36, ..base.clone() }), "gpus");
    assert_eq!(field_of(SimConfig { top_k: 65, ..base.clone() }), "top_k");
    assert_eq!(field_of(SimConfig { ep_gpus: Some(12), ..base.clone() }), "ep_gpus");
    assert_eq!(field_of(SimConfig { ep_gpus: Some(3), gpus: 24, ..base.clone() }), "ep_gpus");
    assert_eq!(field_of(SimConfig { max_nodes: Some(0), ..base.clone() }), "max_nodes");
    // K = 20 cannot fit in one node of 16 experts.
    assert_eq!(field_of(SimConfig { max_nodes: Some(1), top_k: 20, ..base.clone() }), "top_k");
    assert_eq!(field_of(SimConfig { ib_gbps: 0.0, ..base.clone() }), "ib_gbps");
    assert_eq!(field_of(SimConfig { gpu_tflops: f64::NAN, ..base.clone() }), "gpu_tflops");
    assert_eq!(field_of(SimConfig { routing: RoutingModel::Zipf { s: -1.0 }, ..base.clone() }), "routing");
    assert!(matches!(
        simulate(&SimConfig { experts: 48, ep_gpus: Some(32), ..base }),
        Err(SimError::Placement(PlacementError::ExpertsPerRank { num_experts: 48, num_ranks: 32 }))
    ));
}

#[test]
fn a_group_inside_one_node_and_the_report_table() {
    // EP 4 inside a node of 8: one node, so no IB and no node limit to apply.
    let c = SimConfig { gpus: 16, ep_gpus: Some(4), experts: 16, top_k: 4, tokens_per_gpu: 50, ..small_uniform() };
    let r = simulate(&c).unwrap();
    assert_eq!((r.ep_gpus, r.ep_nodes, r.ep_copies), (4, 1, 4));
    assert_eq!(r.scenarios[0].ib_bytes_sent, 0);
    let table = r.to_string();
    assert!(table.contains("no limit") && table.contains("MaxVio"), "{table}");
    let json: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(json["scenarios"][0]["max_nodes"], 1);
}
