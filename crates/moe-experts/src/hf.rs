//! Loading an MoE layer from an HF DeepSeek-V3 checkpoint (`config.json` + safetensors).
//!
//! Tensor names: `{prefix}.gate.weight` `[E, d]`, `{prefix}.gate.e_score_correction_bias`
//! `[E]`, `{prefix}.experts.{e}.{gate,up,down}_proj.weight`, and
//! `{prefix}.shared_experts.{gate,up,down}_proj.weight`, with `prefix` such as
//! `model.layers.1.mlp`. HF stores linear weights as `[out, in]`; the bank stores `[in, out]`.

use burn::module::Param;
use burn::tensor::{Tensor, TensorData, backend::Backend};
use moe_kernels::ScoreFunction;
use moe_router::RouterConfig;
use serde::{Deserialize, Serialize};

use crate::safetensors_source::{SafetensorsFile, TensorSource};
use crate::{ExpertBank, LoadError, MoeLayer, MoeLayerConfig, SwiGlu};

/// The MoE keys of an HF DeepSeek-V3 `config.json` (unknown keys are ignored).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HfMoeConfig {
    /// d.
    pub hidden_size: usize,
    /// E.
    pub n_routed_experts: usize,
    /// K.
    pub num_experts_per_tok: usize,
    /// h of one routed expert.
    pub moe_intermediate_size: usize,
    /// S.
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    /// G.
    #[serde(default = "one")]
    pub n_group: usize,
    /// Groups kept.
    #[serde(default = "one")]
    pub topk_group: usize,
    /// Route scale.
    #[serde(default = "one_f")]
    pub routed_scaling_factor: f64,
    /// Normalise the K weights.
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// `sigmoid` or `softmax`.
    #[serde(default = "sigmoid")]
    pub scoring_func: String,
    /// `noaux_tc` (bias + groups) or `greedy` (plain top-K).
    #[serde(default = "noaux_tc")]
    pub topk_method: String,
}

fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn sigmoid() -> String {
    "sigmoid".into()
}
fn noaux_tc() -> String {
    "noaux_tc".into()
}

impl HfMoeConfig {
    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, LoadError> {
        Ok(serde_json::from_str(text)?)
    }

    /// The layer configuration these keys describe (inference settings: no balance loss).
    pub fn layer_config(&self) -> Result<MoeLayerConfig, LoadError> {
        let score_function = match self.scoring_func.as_str() {
            "sigmoid" => ScoreFunction::Sigmoid,
            "softmax" => ScoreFunction::Softmax,
            other => {
                return Err(LoadError::Unsupported {
                    key: "scoring_func",
                    value: other.into(),
                    expected: "\"sigmoid\" or \"softmax\"",
                });
            }
        };
        let (groups, kept) = match self.topk_method.as_str() {
            "noaux_tc" => (self.n_group, self.topk_group),
            "greedy" => (1, 1),
            other => {
                return Err(LoadError::Unsupported {
                    key: "topk_method",
                    value: other.into(),
                    expected: "\"noaux_tc\" or \"greedy\"",
                });
            }
        };
        let router = RouterConfig::new(self.hidden_size, self.n_routed_experts, self.num_experts_per_tok)
            .with_score_function(score_function)
            .with_num_groups(groups)
            .with_topk_groups(kept)
            .with_normalize_weights(self.norm_topk_prob)
            .with_route_scale(self.routed_scaling_factor);
        let config = MoeLayerConfig::new(router, self.moe_intermediate_size)
            .with_num_shared(self.n_shared_experts.unwrap_or(0))
            .with_seq_balance_alpha(0.0);
        config.validate()?;
        Ok(config)
    }
}

/// An HF `[out, in]` linear weight, transposed to `[in, out]`.
fn linear_t(source: &impl TensorSource, name: &str, out: usize, inp: usize) -> Result<Vec<f32>, LoadError> {
    let w = source.read_f32(name, &[out, inp])?;
    let mut t = vec![0.0; w.len()];
    for o in 0..out {
        for i in 0..inp {
            t[i * out + o] = w[o * inp + i];
        }
    }
    Ok(t)
}

/// E per-expert `[out, in]` weights stacked as `[E, in, out]`.
fn stacked(
    source: &impl TensorSource,
    prefix: &str,
    proj: &str,
    experts: usize,
    out: usize,
    inp: usize,
) -> Result<Vec<f32>, LoadError> {
    let mut all = Vec::with_capacity(experts * out * inp);
    for e in 0..experts {
        all.extend(linear_t(source, &format!("{prefix}.experts.{e}.{proj}.weight"), out, inp)?);
    }
    Ok(all)
}

fn param<B: Backend, const D: usize>(values: Vec<f32>, shape: [usize; D], device: &B::Device) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

/// Loads the MoE layer under `prefix` (e.g. `model.layers.1.mlp`) from the bytes of a
/// safetensors file, for a layer shaped by `config`.
pub fn load_moe_layer<B: Backend>(
    config: &MoeLayerConfig,
    safetensors_bytes: &[u8],
    prefix: &str,
    device: &B::Device,
) -> Result<MoeLayer<B>, LoadError> {
    load_moe_layer_from(config, &SafetensorsFile::new(safetensors_bytes)?, prefix, device)
}

/// Loads the MoE layer under `prefix` from any [`TensorSource`] (e.g. `moe-model`'s sharded,
/// memory-mapped `TensorStore`), for a layer shaped by `config`.
pub fn load_moe_layer_from<B: Backend>(
    config: &MoeLayerConfig,
    source: &impl TensorSource,
    prefix: &str,
    device: &B::Device,
) -> Result<MoeLayer<B>, LoadError> {
    let mut layer = config.init::<B>(device)?;
    let (e, d, h) = (config.router.num_experts, config.router.d_model, config.expert_hidden);
    layer.router.weight = param(source.read_f32(&format!("{prefix}.gate.weight"), &[e, d])?, [e, d], device);
    let bias = source.read_f32(&format!("{prefix}.gate.e_score_correction_bias"), &[e]);
    // greedy checkpoints (DeepSeek-V2 style) have no bias: keep zeros there.
    match bias {
        Ok(b) => layer.router.bias = param(b, [e], device).set_require_grad(false),
        Err(LoadError::Missing(_)) if config.router.num_groups == 1 => {}
        Err(err) => return Err(err),
    }
    layer.experts = ExpertBank {
        gate: param(stacked(source, prefix, "gate_proj", e, h, d)?, [e, d, h], device),
        up: param(stacked(source, prefix, "up_proj", e, h, d)?, [e, d, h], device),
        down: param(stacked(source, prefix, "down_proj", e, d, h)?, [e, h, d], device),
    };
    if config.num_shared > 0 {
        let sh = config.num_shared * h;
        let name = |p: &str| format!("{prefix}.shared_experts.{p}.weight");
        layer.shared = Some(SwiGlu {
            gate: param(linear_t(source, &name("gate_proj"), sh, d)?, [d, sh], device),
            up: param(linear_t(source, &name("up_proj"), sh, d)?, [d, sh], device),
            down: param(linear_t(source, &name("down_proj"), d, sh)?, [sh, d], device),
        });
    }
    Ok(layer)
}
