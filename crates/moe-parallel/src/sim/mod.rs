//! A traffic simulator for expert parallelism: samples routing decisions for one MoE layer on
//! a cluster and reports the nodes each token reaches, the bytes over InfiniBand and NVLink,
//! all-to-all time against expert compute, and per-GPU load, with and without DeepSeek-V3's
//! node limit. See `docs/parallelism.md` for the model and its assumptions.
//!
//! ```
//! use moe_parallel::sim::{RoutingModel, SimConfig, simulate};
//!
//! let config = SimConfig {
//!     gpus: 32, experts: 64, top_k: 8, max_nodes: Some(2), tokens_per_gpu: 64,
//!     routing: RoutingModel::Zipf { s: 1.0 }, ..SimConfig::default()
//! };
//! let report = simulate(&config).unwrap();
//! assert_eq!(report.scenarios.len(), 2); // M=2 and no limit
//! assert!(report.scenarios[0].max_nodes <= 2);
//! println!("{report}");
//! ```

mod config;
mod report;
mod select;
mod traffic;

use std::fmt::Display;

use moe_balance::metrics::max_violation;
use moe_balance::trace::{RoutingTrace, TraceError};
use thiserror::Error;

pub use config::{RoutingModel, RoutingModelParseError, SimConfig};
pub use report::{ScenarioReport, SimReport};

use crate::rng::SplitMix64;
use crate::{Placement, PlacementError};
use select::NodeLimitedSelector;
use traffic::TrafficCounter;

/// A [`SimConfig`] that cannot be simulated, or a trace that cannot be replayed.
#[derive(Debug, Error)]
pub enum SimError {
    /// A setting is out of range: names it, its value and what was expected.
    #[error("{field} = {value}: expected {expected}")]
    Setting {
        /// The field (as in [`SimConfig`]).
        field: &'static str,
        /// The value given.
        value: String,
        /// What would be accepted.
        expected: String,
    },
    /// The experts do not fit the expert-parallel group.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// The trace file could not be read.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// The trace was recorded with different E or K than the config.
    #[error("the trace has {field} = {trace}, but the config says {config}")]
    TraceMismatch {
        /// `experts` or `top_k`.
        field: &'static str,
        /// The trace's value.
        trace: u64,
        /// The config's value.
        config: u64,
    },
    /// The trace holds no layer or no token.
    #[error("the trace holds no routed token")]
    EmptyTrace,
}

fn setting(field: &'static str, value: impl Display, expected: impl Display) -> SimError {
    SimError::Setting { field, value: value.to_string(), expected: expected.to_string() }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The validated shape of a simulation.
#[derive(Debug, Clone, Copy)]
struct Layout {
    placement: Placement,
    /// `Some(M)` when the limit binds (`M < nodes`).
    node_limit: Option<usize>,
    ep_copies: usize,
}

fn layout(c: &SimConfig) -> Result<Layout, SimError> {
    for (field, value) in [
        ("gpus", c.gpus),
        ("gpus_per_node", c.gpus_per_node),
        ("experts", c.experts),
        ("top_k", c.top_k),
        ("hidden", c.hidden),
        ("tokens_per_gpu", c.tokens_per_gpu),
        ("dispatch_bytes", c.dispatch_bytes),
        ("combine_bytes", c.combine_bytes),
        ("expert_hidden", c.expert_hidden),
    ] {
        if value == 0 {
            return Err(setting(field, 0, "at least 1"));
        }
    }
    for (field, value) in [("nvlink_gbps", c.nvlink_gbps), ("ib_gbps", c.ib_gbps), ("gpu_tflops", c.gpu_tflops)] {
        if !(value.is_finite() && value > 0.0) {
            return Err(setting(field, value, "a finite number > 0"));
        }
    }
    if !c.gpus.is_multiple_of(c.gpus_per_node) {
        return Err(setting("gpus", c.gpus, format!("a multiple of gpus_per_node ({})", c.gpus_per_node)));
    }
    if c.top_k > c.experts {
        return Err(setting("top_k", c.top_k, format!("at most experts ({})", c.experts)));
    }
    let ep = c.ep_gpus.unwrap_or_else(|| gcd(c.gpus, c.experts));
    if ep == 0 || !c.gpus.is_multiple_of(ep) {
        return Err(setting("ep_gpus", ep, format!("a divisor of gpus ({})", c.gpus)));
    }
    // A group is whole nodes, or a part of one node.
    let ep_nodes = if ep >= c.gpus_per_node && ep.is_multiple_of(c.gpus_per_node) {
        ep / c.gpus_per_node
    } else if ep < c.gpus_per_node && c.gpus_per_node.is_multiple_of(ep) {
        1
    } else {
        return Err(setting("ep_gpus", ep, format!("a multiple or a divisor of gpus_per_node ({})", c.gpus_per_node)));
    };
    let placement = Placement::new(c.experts, ep, ep_nodes)?;
    if let RoutingModel::Zipf { s } = c.routing
        && !(s.is_finite() && s >= 0.0)
    {
        return Err(setting("routing", c.routing.clone(), "zipf:S with S finite and >= 0"));
    }
    let node_limit = match c.max_nodes {
        Some(0) => return Err(setting("max_nodes", 0, "at least 1, or none")),
        Some(m) if m < ep_nodes => {
            let reachable = m * placement.experts_per_node();
            if c.top_k > reachable {
                return Err(setting(
                    "top_k",
                    c.top_k,
                    format!("at most the {reachable} experts on max_nodes ({m}) nodes"),
                ));
            }
            Some(m)
        }
        _ => None,
    };
    Ok(Layout { placement, node_limit, ep_copies: c.gpus / ep })
}

/// Simulates `config`'s layer: for `uniform` and `zipf:S`, sampled routing with the node
/// limit (when it binds) and without, on the same scores; for `trace:FILE`, every traced
/// layer as recorded.
pub fn simulate(config: &SimConfig) -> Result<SimReport, SimError> {
    match &config.routing {
        RoutingModel::Trace { path } => simulate_trace(config, &RoutingTrace::load(path)?),
        _ => {
            let layout = layout(config)?;
            let limits = layout.node_limit.map_or_else(|| vec![None], |m| vec![Some(m), None]);
            let scenarios = limits.into_iter().map(|limit| sampled_scenario(config, &layout, limit)).collect();
            Ok(report(config, &layout, format!("{}, seed {}", config.routing, config.seed), scenarios))
        }
    }
}

/// Replays `trace` (whatever `config.routing` says): one scenario per traced layer, its ids
/// as recorded (the node limit is the one the model's router applied, if any). GPU `g`'s
/// token `j` is the trace's token `(g * tokens_per_gpu + j) mod num_tokens`.
pub fn simulate_trace(config: &SimConfig, trace: &RoutingTrace) -> Result<SimReport, SimError> {
    let layout = layout(config)?;
    for (field, traced, wanted) in
        [("experts", trace.num_experts(), config.experts), ("top_k", trace.top_k(), config.top_k)]
    {
        if traced as usize != wanted {
            return Err(SimError::TraceMismatch { field, trace: traced.into(), config: wanted as u64 });
        }
    }
    if trace.num_tokens() == 0 || trace.num_layers() == 0 {
        return Err(SimError::EmptyTrace);
    }
    let k = config.top_k;
    let traced_tokens = trace.num_tokens() as usize;
    let mut scenarios = Vec::with_capacity(trace.num_layers());
    let mut ids = Vec::with_capacity(k);
    for (layer, layer_ids) in trace.layers().iter().enumerate() {
        let mut counter = TrafficCounter::new(layout.placement);
        for origin in 0..layout.placement.num_ranks() {
            for j in 0..config.tokens_per_gpu {
                let t = (origin * config.tokens_per_gpu + j) % traced_tokens;
                ids.clear();
                ids.extend(layer_ids[t * k..(t + 1) * k].iter().map(|&id| id as usize));
                counter.add_token(origin, &ids);
            }
        }
        scenarios.push(scenario(config, format!("trace layer {layer}"), None, counter));
    }
    let routing = format!("a trace of {} layer(s) x {} token(s), as recorded", trace.num_layers(), trace.num_tokens());
    Ok(report(config, &layout, routing, scenarios))
}

/// Log-popularity of each expert under the routing model (`None`: uniform).
fn log_popularity(config: &SimConfig) -> Option<Vec<f64>> {
    let RoutingModel::Zipf { s } = config.routing else { return None };
    // A stream of its own, so the permutation does not shift the score stream.
    let mut rng = SplitMix64::new(config.seed ^ 0x5EED_0F21_29F0);
    let mut rank_of: Vec<usize> = (0..config.experts).collect();
    rng.shuffle(&mut rank_of);
    Some(rank_of.iter().map(|&rank| -s * ((rank + 1) as f64).ln()).collect())
}

/// Samples every token of one expert-parallel group and counts its traffic.
fn sampled_scenario(config: &SimConfig, layout: &Layout, limit: Option<usize>) -> ScenarioReport {
    let placement = layout.placement;
    let log_p = log_popularity(config);
    let mut rng = SplitMix64::new(config.seed);
    let mut selector = NodeLimitedSelector::new(placement.num_nodes(), limit, config.top_k);
    let mut counter = TrafficCounter::new(placement);
    let mut scores = vec![0.0; config.experts];
    let mut ids = Vec::with_capacity(config.top_k);
    for origin in 0..placement.num_ranks() {
        for _ in 0..config.tokens_per_gpu {
            match &log_p {
                // Top-K of i.i.d. scores is a uniform K-subset; any continuous law does.
                None => scores.iter_mut().for_each(|s| *s = rng.open01()),
                // Gumbel-top-K: the K best of ln p + Gumbel are a draw without replacement
                // with probabilities p (Plackett-Luce).
                Some(log_p) => scores.iter_mut().zip(log_p).for_each(|(s, lp)| *s = lp + rng.gumbel()),
            }
            selector.select(&scores, &mut ids);
            counter.add_token(origin, &ids);
        }
    }
    let name = match limit {
        Some(m) => format!("M={m}"),
        None => "no limit".to_string(),
    };
    scenario(config, name, limit, counter)
}

/// Turns token copies into bytes and times.
fn scenario(config: &SimConfig, name: String, node_limit: Option<usize>, c: TrafficCounter) -> ScenarioReport {
    let d = config.hidden as u64;
    let copy_bytes = d * (config.dispatch_bytes + config.combine_bytes) as u64;
    let sum = |v: &[u64]| v.iter().sum::<u64>();
    let tokens = c.tokens.max(1) as f64;
    let slowest_link_time = |bytes_per_elem: usize| {
        let row = (d * bytes_per_elem as u64) as f64;
        (0..c.rows.len())
            .map(|r| {
                let ib = c.ib_out[r].max(c.ib_in[r]) as f64 * row / (config.ib_gbps * 1e9);
                let nvlink = c.nvlink_out[r].max(c.nvlink_in[r]) as f64 * row / (config.nvlink_gbps * 1e9);
                ib.max(nvlink)
            })
            .fold(0.0, f64::max)
    };
    // Three d x h GEMMs per row (gate, up, down), 2 FLOPs per multiply-add.
    let flops_per_row = 6.0 * config.hidden as f64 * config.expert_hidden as f64;
    let shared_rows = (config.tokens_per_gpu * config.shared) as f64;
    let max_rows = c.rows.iter().copied().max().unwrap_or(0) as f64;
    ScenarioReport {
        name,
        node_limit,
        tokens: c.tokens,
        mean_nodes: c.nodes_sum as f64 / tokens,
        max_nodes: c.nodes_max,
        mean_gpus: c.gpus_sum as f64 / tokens,
        ib_bytes_per_token: (sum(&c.ib_out) * copy_bytes) as f64 / tokens,
        nvlink_bytes_per_token: (sum(&c.nvlink_out) * copy_bytes) as f64 / tokens,
        ib_bytes_sent: sum(&c.ib_out) * copy_bytes,
        ib_bytes_received: sum(&c.ib_in) * copy_bytes,
        nvlink_bytes_sent: sum(&c.nvlink_out) * copy_bytes,
        nvlink_bytes_received: sum(&c.nvlink_in) * copy_bytes,
        dispatch_time_s: slowest_link_time(config.dispatch_bytes),
        combine_time_s: slowest_link_time(config.combine_bytes),
        compute_time_s: (max_rows + shared_rows) * flops_per_row / (config.gpu_tflops * 1e12),
        rank_max_violation: max_violation(&c.rows),
        rank_rows: c.rows,
        expert_load: c.expert_load,
    }
}

fn report(config: &SimConfig, layout: &Layout, routing: String, scenarios: Vec<ScenarioReport>) -> SimReport {
    let p = layout.placement;
    let setting = format!(
        "Layer: E {}, K {}, {} shared, d {}, expert width {}, {} tokens per GPU; dispatch {} B, combine {} B per element; NVLink {} GB/s, IB {} GB/s per GPU; {} TFLOP/s per GPU. Routing: {routing}.",
        config.experts,
        config.top_k,
        config.shared,
        config.hidden,
        config.expert_hidden,
        config.tokens_per_gpu,
        config.dispatch_bytes,
        config.combine_bytes,
        config.nvlink_gbps,
        config.ib_gbps,
        config.gpu_tflops,
    );
    SimReport {
        ep_gpus: p.num_ranks(),
        ep_nodes: p.num_nodes(),
        ep_copies: layout.ep_copies,
        experts_per_gpu: p.experts_per_rank(),
        setting,
        scenarios,
    }
}

#[cfg(test)]
mod tests;
