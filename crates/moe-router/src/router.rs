use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{FloatDType, Int, Tensor, backend::Backend};
use moe_kernels::{GateRule, Gated, MoeBackend, ScoreFunction, Selection};

use crate::{RouterConfig, RouterConfigError};

/// DeepSeek-V3's gate: affinities, bias-steered top-K selection, weights from unbiased scores.
#[derive(Module, Debug)]
pub struct TopKRouter<B: Backend> {
    /// `[E, d]`, f32 (HF `mlp.gate.weight` layout).
    pub weight: Param<Tensor<B, 2>>,
    /// `[E]`, f32: steers selection only; never trained by autodiff (HF
    /// `e_score_correction_bias`).
    pub bias: Param<Tensor<B, 1>>,
    top_k: usize,
    num_groups: usize,
    topk_groups: usize,
    group_score_topk: usize,
    normalize_weights: bool,
    route_scale: f64,
    #[module(skip)]
    score_function: ScoreFunction,
}

/// What the router decided for a batch of `T` tokens.
#[derive(Debug, Clone)]
pub struct Routing<B: Backend> {
    /// `[T, K]` chosen experts, best first.
    pub expert_ids: Tensor<B, 2, Int>,
    /// `[T, K]` f32 weights of the chosen experts (from the unbiased scores).
    pub weights: Tensor<B, 2>,
    /// `[T, E]` f32 unbiased affinities `s`: what balance losses need.
    pub scores: Tensor<B, 2>,
    /// `[T, E]` f32 logits `x . e_i`: what the z-loss needs.
    pub logits: Tensor<B, 2>,
    /// `[E]` tokens routed to each expert in this batch.
    pub counts: Tensor<B, 1, Int>,
}

impl RouterConfig {
    /// Validates the configuration and builds a router with a zero bias.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<TopKRouter<B>, RouterConfigError> {
        self.validate()?;
        let weight = Initializer::KaimingUniform { gain: 1.0 / 3f64.sqrt(), fan_out_only: false }
            .init_with::<B, 2, _>([self.num_experts, self.d_model], Some(self.d_model), Some(self.num_experts), device)
            .val();
        // The cast must happen before the tensor becomes a parameter: a cast parameter would
        // be a graph node, not a leaf, and get no gradient.
        let weight = Param::from_tensor(weight.cast(FloatDType::F32).detach());
        let bias = Param::from_tensor(Tensor::<B, 1>::zeros([self.num_experts], device).cast(FloatDType::F32))
            .set_require_grad(false);
        Ok(TopKRouter {
            weight,
            bias,
            top_k: self.top_k,
            num_groups: self.num_groups,
            topk_groups: self.topk_groups,
            group_score_topk: self.group_score_topk,
            normalize_weights: self.normalize_weights,
            route_scale: self.route_scale,
            score_function: self.score_function,
        })
    }
}

impl<B: MoeBackend> TopKRouter<B> {
    /// Routes `x` `[T, d]` (any float dtype; the math runs in f32) on the backend's kernels:
    /// the logits by [`MoeBackend::moe_dense_matmul`], the gate by [`MoeBackend::moe_gate`]
    /// (which must match the portable [`GateRule::apply`]) and the counts by
    /// [`MoeBackend::moe_expert_counts`].
    pub fn forward(&self, x: Tensor<B, 2>) -> Routing<B> {
        let weight = self.weight.val().cast(FloatDType::F32).transpose();
        let logits = B::moe_dense_matmul(x.cast(FloatDType::F32), weight);
        let experts = logits.dims()[1];
        let bias = self.bias.val().detach().cast(FloatDType::F32);
        let Gated { scores, expert_ids, weights } = B::moe_gate(logits.clone(), bias, &self.gate_rule());
        let counts = B::moe_expert_counts(expert_ids.clone(), experts);
        Routing { expert_ids, weights, scores, logits, counts }
    }
}

impl<B: Backend> TopKRouter<B> {
    /// The gate's rule: score function, selection, normalisation and scale.
    pub fn gate_rule(&self) -> GateRule {
        GateRule {
            score_function: self.score_function,
            selection: self.selection(),
            normalize_weights: self.normalize_weights,
            route_scale: self.route_scale,
        }
    }

    /// K and the group limit, as the selection takes them.
    pub fn selection(&self) -> Selection {
        Selection {
            top_k: self.top_k,
            num_groups: self.num_groups,
            topk_groups: self.topk_groups,
            group_score_topk: self.group_score_topk,
        }
    }

    /// The selection bias `[E]` (f32).
    pub fn bias(&self) -> Tensor<B, 1> {
        self.bias.val()
    }

    /// Adds `delta` `[E]` to the selection bias: the load-balancer's update.
    pub fn add_to_bias(&mut self, delta: Tensor<B, 1>) {
        let delta = delta.cast(FloatDType::F32).detach();
        self.bias = self.bias.clone().map(|b| (b + delta).detach()).set_require_grad(false);
    }

    /// Experts chosen per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Routed experts `E`.
    pub fn num_experts(&self) -> usize {
        self.bias.dims()[0]
    }

    /// Groups `G` and groups kept per token.
    pub fn groups(&self) -> (usize, usize) {
        (self.num_groups, self.topk_groups)
    }
}
