//! Prints the tables of `docs/parallelism.md`: the traffic simulator on DeepSeek-V3's setting
//! (uniform and Zipf 1.0 routing, M = 4 and no limit, EP 64 and EP 256) and EPLB's per-GPU
//! MaxVio before and after on the simulated Zipf load.
//!
//! `cargo run --release -p moe-parallel --example parallelism_tables`

use moe_parallel::eplb::ReplicaPlan;
use moe_parallel::sim::{RoutingModel, SimConfig, simulate};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for ep_gpus in [64, 256] {
        for routing in [RoutingModel::Uniform, RoutingModel::Zipf { s: 1.0 }] {
            let config = SimConfig { ep_gpus: Some(ep_gpus), routing: routing.clone(), ..SimConfig::default() };
            let report = simulate(&config)?;
            println!("## EP {ep_gpus}, {routing}\n\n{report}\n");
            if matches!(routing, RoutingModel::Zipf { .. }) {
                let nodes = report.ep_nodes;
                for scenario in &report.scenarios {
                    let load = &scenario.expert_load;
                    for (policy, groups, eplb_nodes) in [("hierarchical", nodes, nodes), ("global", 1, 1)] {
                        for spare_per_gpu in [0, 1] {
                            let slots = load.len() + spare_per_gpu * ep_gpus;
                            let plan = ReplicaPlan::rebalance(load, groups, eplb_nodes, ep_gpus, slots)?;
                            let (before, after) =
                                plan.max_violation_before_after(load).ok_or("load does not fit the plan")?;
                            println!(
                                "EPLB {policy:<12} EP {ep_gpus:>3}, {:<9} spare slots {:>3}: per-GPU MaxVio {before:.3} -> {after:.3}",
                                scenario.name,
                                spare_per_gpu * ep_gpus
                            );
                        }
                    }
                }
                println!();
            }
        }
    }
    Ok(())
}
