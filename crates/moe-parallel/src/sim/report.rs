//! What a simulation measured, per scenario, and its table.

use std::fmt;

use serde::Serialize;

/// One routing scenario of a simulation (node-limited, unlimited, or one traced layer).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScenarioReport {
    /// `"M=4"`, `"no limit"` or `"trace layer 3"`.
    pub name: String,
    /// The node limit applied, if any.
    pub node_limit: Option<usize>,
    /// Tokens simulated (the expert-parallel group's GPUs x tokens per GPU).
    pub tokens: u64,
    /// Mean distinct nodes a token's experts live on (its own node included).
    pub mean_nodes: f64,
    /// The most nodes any token reached.
    pub max_nodes: usize,
    /// Mean distinct GPUs a token's experts live on.
    pub mean_gpus: f64,
    /// InfiniBand bytes per token, dispatch plus combine.
    pub ib_bytes_per_token: f64,
    /// NVLink bytes per token, dispatch plus combine.
    pub nvlink_bytes_per_token: f64,
    /// InfiniBand bytes all ranks sent, dispatch plus combine.
    pub ib_bytes_sent: u64,
    /// InfiniBand bytes all ranks received (equal to sent: every copy lands somewhere).
    pub ib_bytes_received: u64,
    /// NVLink bytes all ranks sent, dispatch plus combine.
    pub nvlink_bytes_sent: u64,
    /// NVLink bytes all ranks received.
    pub nvlink_bytes_received: u64,
    /// Dispatch time of the slowest rank, seconds: per rank the larger of its InfiniBand and
    /// NVLink times (they overlap), each the larger of its send and receive bytes over the
    /// link's bandwidth.
    pub dispatch_time_s: f64,
    /// Combine time of the slowest rank, seconds (as the dispatch, at the combine's bytes).
    pub combine_time_s: f64,
    /// Expert compute of the slowest rank, seconds: its routed rows plus its own tokens
    /// through the shared experts, at `6 d h` FLOPs per row (forward only).
    pub compute_time_s: f64,
    /// (token, expert) rows each rank computes.
    pub rank_rows: Vec<u64>,
    /// Tokens routed to each expert (`[E]`): the load an EPLB plan is made from.
    pub expert_load: Vec<u64>,
    /// MaxVio of `rank_rows`: (max - mean) / mean.
    pub rank_max_violation: f64,
}

impl ScenarioReport {
    /// Dispatch plus combine time, seconds.
    pub fn all_to_all_time_s(&self) -> f64 {
        self.dispatch_time_s + self.combine_time_s
    }
}

/// The result of [`crate::sim::simulate`]: the expert-parallel layout and one row per
/// scenario. Prints as a table; serialises (serde) for machine-readable output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReport {
    /// GPUs in the simulated expert-parallel group.
    pub ep_gpus: usize,
    /// Nodes of that group (the routing groups).
    pub ep_nodes: usize,
    /// Data-parallel copies of the group in the cluster (`gpus / ep_gpus`).
    pub ep_copies: usize,
    /// Routed experts per GPU.
    pub experts_per_gpu: usize,
    /// One line describing the simulated layer, links and routing.
    pub setting: String,
    /// One per scenario.
    pub scenarios: Vec<ScenarioReport>,
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Expert-parallel group: {} GPUs on {} node(s), {} routed expert(s) per GPU; the cluster holds {} such group(s), one simulated.",
            self.ep_gpus, self.ep_nodes, self.experts_per_gpu, self.ep_copies
        )?;
        writeln!(f, "{}", self.setting)?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<16} {:>8} {:>5} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
            "scenario",
            "nodes",
            "max",
            "GPUs",
            "IB KB/tok",
            "NVL KB/tok",
            "dispatch",
            "combine",
            "compute",
            "a2a/cmp",
            "MaxVio"
        )?;
        for s in &self.scenarios {
            writeln!(
                f,
                "{:<16} {:>8.3} {:>5} {:>8.3} {:>10.2} {:>10.2} {:>7.3} ms {:>7.3} ms {:>7.3} ms {:>8.3} {:>8.3}",
                s.name,
                s.mean_nodes,
                s.max_nodes,
                s.mean_gpus,
                s.ib_bytes_per_token / 1e3,
                s.nvlink_bytes_per_token / 1e3,
                s.dispatch_time_s * 1e3,
                s.combine_time_s * 1e3,
                s.compute_time_s * 1e3,
                s.all_to_all_time_s() / s.compute_time_s,
                s.rank_max_violation
            )?;
        }
        writeln!(f)?;
        write!(
            f,
            "nodes, GPUs: mean distinct per token; KB = 1e3 bytes, dispatch + combine; times: slowest GPU, one layer forward; MaxVio: per-GPU routed rows."
        )
    }
}
