//! What the traffic simulator simulates: cluster, layer, routing. Field names follow the
//! `cargo xtask simulate` flags (`tokens_per_gpu` is `--tokens-per-gpu`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How the simulated tokens choose experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum RoutingModel {
    /// Every expert equally likely: each token's K experts are a uniform K-subset.
    #[default]
    Uniform,
    /// Expert popularity `p ∝ 1 / rank^s` (Zipf), with the popularity ranks a seeded random
    /// permutation of the experts so that hot experts do not all sit on one node.
    Zipf {
        /// The exponent `s >= 0` (0 is uniform).
        s: f64,
    },
    /// The recorded ids of a `moe_balance::RoutingTrace` file, replayed as they are.
    Trace {
        /// The trace file.
        path: PathBuf,
    },
}

/// A routing spec that is not `uniform`, `zipf:S` or `trace:FILE`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("routing {spec:?} not understood: expected uniform, zipf:S (S a number >= 0) or trace:FILE")]
pub struct RoutingModelParseError {
    /// The spec given.
    pub spec: String,
}

impl FromStr for RoutingModel {
    type Err = RoutingModelParseError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = || RoutingModelParseError { spec: spec.to_string() };
        match spec.split_once(':') {
            None if spec == "uniform" => Ok(Self::Uniform),
            Some(("zipf", s)) => match s.parse::<f64>() {
                Ok(s) if s.is_finite() && s >= 0.0 => Ok(Self::Zipf { s }),
                _ => Err(bad()),
            },
            Some(("trace", path)) if !path.is_empty() => Ok(Self::Trace { path: PathBuf::from(path) }),
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for RoutingModel {
    type Error = RoutingModelParseError;

    fn try_from(spec: String) -> Result<Self, Self::Error> {
        spec.parse()
    }
}

impl fmt::Display for RoutingModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uniform => write!(f, "uniform"),
            Self::Zipf { s } => write!(f, "zipf:{s}"),
            Self::Trace { path } => write!(f, "trace:{}", path.display()),
        }
    }
}

impl From<RoutingModel> for String {
    fn from(model: RoutingModel) -> Self {
        model.to_string()
    }
}

/// One simulation: a cluster, one MoE layer, a routing model. The defaults are DeepSeek-V3's
/// (2048 H800s, 8 per node, 256 routed experts, K = 8 within M = 4 nodes, 1 shared expert,
/// d = 7168, FP8 dispatch, BF16 combine, 160 GB/s NVLink and 50 GB/s InfiniBand per GPU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// GPUs in the cluster (`--gpus`).
    pub gpus: usize,
    /// GPUs per node (`--gpus-per-node`).
    pub gpus_per_node: usize,
    /// Routed experts `E` (`--experts`).
    pub experts: usize,
    /// Experts per token `K` (`--top-k`).
    pub top_k: usize,
    /// Node limit `M` (`--max-nodes`): routing groups are the nodes of an expert-parallel
    /// group and a token keeps the best `M` of them. `None` simulates only unlimited routing;
    /// with `Some`, both limited and unlimited are simulated, on the same scores. A limit of
    /// at least the node count limits nothing.
    pub max_nodes: Option<usize>,
    /// Shared experts per layer (`--shared`), each as wide as a routed one.
    pub shared: usize,
    /// Token width `d` (`--hidden`).
    pub hidden: usize,
    /// Tokens each GPU routes in one layer's forward (`--tokens-per-gpu`).
    pub tokens_per_gpu: usize,
    /// The routing model (`--routing uniform|zipf:S|trace:FILE`).
    pub routing: RoutingModel,
    /// NVLink bandwidth per GPU, GB/s (1e9 bytes/s), each direction (`--nvlink-gbps`).
    pub nvlink_gbps: f64,
    /// InfiniBand bandwidth per GPU, GB/s, each direction (`--ib-gbps`).
    pub ib_gbps: f64,
    /// Bytes per element of a dispatched token (`--dispatch-bytes`; 1 for FP8).
    pub dispatch_bytes: usize,
    /// Bytes per element of a combined expert output (`--combine-bytes`; 2 for BF16).
    pub combine_bytes: usize,
    /// Seed of the sampled routing (`--seed`).
    pub seed: u64,
    /// GPUs in one expert-parallel group, over which the experts are sharded; the cluster
    /// holds `gpus / ep_gpus` data-parallel copies of the group, which all see the same
    /// traffic, so one is simulated. `None`: the largest group that divides both `gpus` and
    /// `experts` (their gcd). DeepSeek-V3 trained with 64 (`--ep-gpus`, not yet a flag).
    pub ep_gpus: Option<usize>,
    /// Intermediate width of one expert, `moe_intermediate_size` (2048 in DeepSeek-V3): with
    /// `gpu_tflops` it sizes the expert compute the all-to-all is compared with.
    pub expert_hidden: usize,
    /// Achieved dense TFLOP/s of one GPU on the expert GEMMs (an input, not a peak).
    pub gpu_tflops: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            gpus: 2048,
            gpus_per_node: 8,
            experts: 256,
            top_k: 8,
            max_nodes: Some(4),
            shared: 1,
            hidden: 7168,
            tokens_per_gpu: 4096,
            routing: RoutingModel::Uniform,
            nvlink_gbps: 160.0,
            ib_gbps: 50.0,
            dispatch_bytes: 1,
            combine_bytes: 2,
            seed: 0,
            ep_gpus: None,
            expert_hidden: 2048,
            gpu_tflops: 400.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_specs_parse_and_print_back() {
        for (spec, model) in [
            ("uniform", RoutingModel::Uniform),
            ("zipf:1.5", RoutingModel::Zipf { s: 1.5 }),
            ("zipf:0", RoutingModel::Zipf { s: 0.0 }),
            ("trace:runs/a.trace", RoutingModel::Trace { path: "runs/a.trace".into() }),
        ] {
            assert_eq!(spec.parse::<RoutingModel>(), Ok(model.clone()));
            assert_eq!(model.to_string().parse::<RoutingModel>(), Ok(model));
        }
        for bad in ["", "zipf", "zipf:", "zipf:-1", "zipf:nan", "zipf:x", "trace:", "uniform:2", "gauss:1"] {
            assert_eq!(bad.parse::<RoutingModel>(), Err(RoutingModelParseError { spec: bad.into() }), "{bad}");
        }
    }

    #[test]
    fn config_reads_from_json_with_defaults() {
        let c: SimConfig = serde_json::from_str(r#"{"gpus": 64, "routing": "zipf:1.0", "max_nodes": null}"#).unwrap();
        assert_eq!(
            c,
            SimConfig { gpus: 64, routing: RoutingModel::Zipf { s: 1.0 }, max_nodes: None, ..Default::default() }
        );
        assert!(serde_json::from_str::<SimConfig>(r#"{"routing": "zipf:-2"}"#).is_err());
        assert!(serde_json::from_str::<SimConfig>(r#"{"gpu": 8}"#).is_err());
        let json = serde_json::to_string(&SimConfig::default()).unwrap();
        assert_eq!(serde_json::from_str::<SimConfig>(&json).unwrap(), SimConfig::default());
    }
}
