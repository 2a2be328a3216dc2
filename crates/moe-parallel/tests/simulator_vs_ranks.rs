//! The traffic simulator against the expert-parallel layer's own accounting, on the same
//! routing: a real layer routes the tokens of every rank, the layer runs sharded over logical
//! ranks and counts what it moved, and the simulator replays the same ids as a trace.

use burn::backend::NdArray;
use burn::tensor::{Distribution, Tensor};
use moe_balance::RoutingTrace;
use moe_experts::MoeLayerConfig;
use moe_parallel::Placement;
use moe_parallel::ep::{ExpertParallelMoe, LocalTransport, StepAccounting};
use moe_parallel::sim::{RoutingModel, ScenarioReport, SimConfig, simulate_trace};
use moe_router::RouterConfig;

type B = NdArray;

const D: usize = 16;
const E: usize = 16;
const K: usize = 4;
const TOKENS_PER_RANK: usize = 40;

/// Routes `ranks * TOKENS_PER_RANK` tokens through a layer sharded over `ranks` on `nodes`,
/// then replays the same ids in the simulator (f32 rows: 4 bytes per element both ways).
fn both(ranks: usize, nodes: usize, groups: usize, keep: usize) -> (StepAccounting, ScenarioReport) {
    let device = Default::default();
    let router = RouterConfig::new(D, E, K).with_num_groups(groups).with_topk_groups(keep);
    let layer = MoeLayerConfig::new(router, 8).init::<B>(&device).unwrap();
    let x = Tensor::<B, 2>::random([ranks * TOKENS_PER_RANK, D], Distribution::Normal(0.0, 1.0), &device);

    let ep = ExpertParallelMoe::from_layer(&layer, Placement::new(E, ranks, nodes).unwrap()).unwrap();
    let inputs = (0..ranks).map(|r| x.clone().narrow(0, r * TOKENS_PER_RANK, TOKENS_PER_RANK)).collect();
    let (_, accounting) = ep.forward_with_accounting(inputs, &mut LocalTransport::new()).unwrap();

    // Token j of rank g is the trace's token g * TOKENS_PER_RANK + j, as the simulator reads it.
    let ids: Vec<u32> = layer.router.forward(x).expert_ids.into_data().iter::<i64>().map(|e| e as u32).collect();
    let mut trace = RoutingTrace::new(E as u32, K as u32).unwrap();
    trace.push_layer(&ids).unwrap();
    let config = SimConfig {
        gpus: ranks,
        gpus_per_node: ranks / nodes,
        ep_gpus: Some(ranks),
        experts: E,
        top_k: K,
        shared: 0,
        hidden: D,
        tokens_per_gpu: TOKENS_PER_RANK,
        dispatch_bytes: 4,
        combine_bytes: 4,
        routing: RoutingModel::Uniform,
        ..SimConfig::default()
    };
    let report = simulate_trace(&config, &trace).unwrap();
    (accounting, report.scenarios.into_iter().next().unwrap())
}

fn token_nodes(accounting: &StepAccounting) -> u64 {
    accounting.nodes_reached.iter().enumerate().map(|(n, &count)| n as u64 * count).sum()
}

#[test]
fn simulator_counts_what_the_ranks_moved() {
    // (ranks, nodes, groups, groups kept): node-limited (groups = nodes, M = 2), unlimited,
    // and one GPU per node.
    for (ranks, nodes, groups, keep) in [(8, 4, 4, 2), (8, 4, 1, 1), (4, 4, 4, 2), (4, 2, 1, 1)] {
        let (acc, sim) = both(ranks, nodes, groups, keep);
        let tokens = (ranks * TOKENS_PER_RANK) as u64;
        let case = format!("{ranks} ranks on {nodes} nodes, {groups} groups keep {keep}");
        // Per-rank load: the (token, expert) rows each rank computed.
        assert_eq!(sim.rank_rows, acc.pairs_per_rank, "{case}");
        // Nodes per token: the same histogram's mean and maximum.
        assert_eq!(sim.tokens, tokens, "{case}");
        assert!((sim.mean_nodes * tokens as f64 - token_nodes(&acc) as f64).abs() < 1e-6, "{case}");
        assert_eq!(sim.max_nodes, acc.max_nodes_reached(), "{case}");
        if groups == nodes {
            assert!(sim.max_nodes <= keep, "{case}: node limit");
        }
        // GPUs per token: the layer sends a token once to each rank holding its experts.
        let rows: u64 = acc.rows_sent.iter().flatten().sum();
        assert!((sim.mean_gpus * tokens as f64 - rows as f64).abs() < 1e-6, "{case}");
        let moved = acc.bytes_inter_node + acc.bytes_intra_node;
        if ranks == nodes {
            // One GPU per node: DeepSeek's two hops are one, so the bytes agree exactly.
            assert_eq!((sim.ib_bytes_sent, sim.nvlink_bytes_sent), (acc.bytes_inter_node, 0), "{case}");
        } else {
            // The layer sends a token straight to every remote rank holding its experts;
            // the simulator sends it over IB once per remote node, to the relay GPU there,
            // which forwards it over NVLink. So IB carries at most the layer's inter-node
            // bytes, and the relays add at most one copy per IB copy (none when the relay
            // is itself a destination).
            assert!(sim.ib_bytes_sent <= acc.bytes_inter_node, "{case}");
            let relayed = sim.ib_bytes_sent + sim.nvlink_bytes_sent;
            assert!(moved <= relayed && relayed <= moved + sim.ib_bytes_sent, "{case}");
        }
    }
}
