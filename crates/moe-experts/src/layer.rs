use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Int, Tensor, backend::Backend};
use moe_balance::losses::{router_z_loss, sequence_balance_loss, switch_aux_loss};
use moe_kernels::{CapacityLimit, MoeBackend};
use moe_router::{RouterConfig, TopKRouter};
use serde::{Deserialize, Serialize};

use crate::{ExpertBank, ExpertBankConfig, MoeError, SwiGlu, SwiGluConfig};

/// Which pairs a full expert drops first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Later tokens in the batch are dropped first (GShard).
    Position,
    /// Lower routing weights are dropped first.
    Probability,
}

/// Token dropping, for comparison with the dropless default: the layer's setting, serialised
/// with [`MoeLayerConfig`]. It is the dispatch plan's [`CapacityLimit`] ([`Self::limit`]) plus
/// the [`DropPolicy`] that picks which pairs go first ([`Self::drop_policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum CapacityConfig {
    /// No token is dropped (DeepSeek-V3).
    #[default]
    Dropless,
    /// Each expert takes at most `ceil(factor * T * K / E)` pairs.
    Factor {
        /// The capacity factor.
        factor: f64,
        /// Which pairs go first.
        policy: DropPolicy,
    },
}

impl CapacityConfig {
    /// The per-expert limit the dispatch plan applies (`MoeBackend::moe_plan`).
    pub fn limit(self) -> CapacityLimit {
        match self {
            Self::Dropless => CapacityLimit::Dropless,
            Self::Factor { factor, .. } => CapacityLimit::Factor(factor),
        }
    }

    /// Which pairs a full expert drops first; `None` when dropless.
    pub fn drop_policy(self) -> Option<DropPolicy> {
        match self {
            Self::Dropless => None,
            Self::Factor { policy, .. } => Some(policy),
        }
    }
}

/// Configuration of a [`MoeLayer`].
#[derive(Config, Debug)]
pub struct MoeLayerConfig {
    /// The router (carries d_model, E, K, groups, scale, z-loss weight).
    pub router: RouterConfig,
    /// Hidden width of one routed expert (`moe_intermediate_size`).
    pub expert_hidden: usize,
    /// Shared experts S (each of width `expert_hidden`); 0 for none.
    #[config(default = 0)]
    pub num_shared: usize,
    /// Token dropping; dropless by default.
    #[config(default = "CapacityConfig::Dropless")]
    pub capacity: CapacityConfig,
    /// Weight of DeepSeek-V3's sequence-wise balance loss; 0 turns it off.
    #[config(default = 1e-4)]
    pub seq_balance_alpha: f64,
    /// Weight of the classic Switch/GShard batch aux loss; 0 (off) by default.
    #[config(default = 0.0)]
    pub aux_loss_alpha: f64,
}

fn check_loss_weights(seq_balance_alpha: f64, aux_loss_alpha: f64) -> Result<(), MoeError> {
    for (field, value) in [("seq_balance_alpha", seq_balance_alpha), ("aux_loss_alpha", aux_loss_alpha)] {
        if !(value.is_finite() && value >= 0.0) {
            return Err(MoeError::Setting { field, value: value.to_string(), expected: "finite and >= 0" });
        }
    }
    Ok(())
}

impl MoeLayerConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), MoeError> {
        self.router.validate()?;
        if self.expert_hidden == 0 {
            return Err(MoeError::Setting { field: "expert_hidden", value: "0".into(), expected: "at least 1" });
        }
        check_loss_weights(self.seq_balance_alpha, self.aux_loss_alpha)?;
        if let CapacityConfig::Factor { factor, .. } = self.capacity
            && !(factor.is_finite() && factor > 0.0)
        {
            return Err(MoeError::Setting {
                field: "capacity.factor",
                value: factor.to_string(),
                expected: "finite and > 0",
            });
        }
        Ok(())
    }

    /// Validates and builds a randomly initialised layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<MoeLayer<B>, MoeError> {
        self.validate()?;
        let d = self.router.d_model;
        Ok(MoeLayer {
            router: self.router.init(device)?,
            experts: ExpertBankConfig::new(self.router.num_experts, d, self.expert_hidden).init(device),
            shared: (self.num_shared > 0)
                .then(|| SwiGluConfig::new(d, self.num_shared * self.expert_hidden).init(device)),
            d_model: d,
            seq_balance_alpha: self.seq_balance_alpha,
            aux_loss_alpha: self.aux_loss_alpha,
            z_loss_weight: self.router.z_loss_weight.unwrap_or(0.0),
            capacity: self.capacity,
        })
    }
}

/// Router + routed experts + shared experts + balance losses.
#[derive(Module, Debug)]
pub struct MoeLayer<B: Backend> {
    /// The gate.
    pub router: TopKRouter<B>,
    /// The routed experts.
    pub experts: ExpertBank<B>,
    /// The shared experts, if any.
    pub shared: Option<SwiGlu<B>>,
    d_model: usize,
    seq_balance_alpha: f64,
    aux_loss_alpha: f64,
    z_loss_weight: f64,
    #[module(skip)]
    capacity: CapacityConfig,
}

/// What a forward pass leaves for the caller: losses to add, counts to track.
#[derive(Debug, Clone)]
pub struct MoeAux<B: Backend> {
    /// `[T, K]` chosen experts (T = batch * seq).
    pub expert_ids: Tensor<B, 2, Int>,
    /// `[T, K]` routing weights.
    pub weights: Tensor<B, 2>,
    /// `[E]` pairs routed to each expert (before drops): feed a `LoadTracker` in training.
    pub counts: Tensor<B, 1, Int>,
    /// Pairs dropped by the capacity limit (0 when dropless).
    pub dropped: usize,
    /// Sequence-wise balance loss (already weighted, in the input's dtype), when its alpha > 0.
    pub seq_balance_loss: Option<Tensor<B, 1>>,
    /// Switch/GShard aux loss (already weighted), when its alpha > 0.
    pub aux_loss: Option<Tensor<B, 1>>,
    /// Router z-loss (already weighted), when its weight > 0.
    pub z_loss: Option<Tensor<B, 1>>,
}

impl<B: Backend> MoeAux<B> {
    /// The sum of the losses that are on, if any.
    pub fn loss(&self) -> Option<Tensor<B, 1>> {
        [&self.seq_balance_loss, &self.aux_loss, &self.z_loss].into_iter().flatten().cloned().reduce(|a, b| a + b)
    }
}

impl<B: Backend> MoeLayer<B> {
    /// Token width `d`.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Moves the router bias by `delta` `[E]` (from `moe_balance::BiasBalancer::bias_delta`).
    pub fn apply_bias_delta(&mut self, delta: &[f32]) {
        let device = self.router.bias().device();
        self.router.add_to_bias(Tensor::from_floats(delta, &device));
    }

    /// Sets the weights of the sequence-wise balance loss and the Switch aux loss (0 turns a
    /// loss off), e.g. to compare balancing schemes on one model. Negative or non-finite
    /// weights are refused, naming the field.
    pub fn set_loss_weights(&mut self, seq_balance_alpha: f64, aux_loss_alpha: f64) -> Result<(), MoeError> {
        check_loss_weights(seq_balance_alpha, aux_loss_alpha)?;
        self.seq_balance_alpha = seq_balance_alpha;
        self.aux_loss_alpha = aux_loss_alpha;
        Ok(())
    }

    /// The layer's capacity setting.
    pub fn capacity(&self) -> CapacityConfig {
        self.capacity
    }

    fn flatten(&self, x: Tensor<B, 3>) -> Result<(Tensor<B, 2>, [usize; 3]), MoeError> {
        let dims = x.dims();
        if dims[2] != self.d_model {
            return Err(MoeError::InputWidth { expected: self.d_model, got: dims[2] });
        }
        Ok((x.reshape([dims[0] * dims[1], dims[2]]), dims))
    }
}

impl<B: MoeBackend> MoeLayer<B> {
    /// The per-expert loop version of [`MoeLayer::forward`] (dropless, no losses): the oracle
    /// and the bench baseline.
    pub fn forward_loop(&self, x: Tensor<B, 3>) -> Result<Tensor<B, 3>, MoeError> {
        let (flat, dims) = self.flatten(x)?;
        let routing = self.router.forward(flat.clone());
        let routed = self.experts.forward_loop(flat.clone(), routing.expert_ids, routing.weights);
        Ok(plus(routed, self.shared.as_ref().map(|shared| shared.forward(flat))).reshape(dims))
    }

    /// `x` `[batch, seq, d]` -> `[batch, seq, d]` and the auxiliary record. Sequences matter
    /// only to the sequence-wise balance loss.
    pub fn forward(&self, x: Tensor<B, 3>) -> Result<(Tensor<B, 3>, MoeAux<B>), MoeError> {
        let (flat, dims) = self.flatten(x)?;
        // The shared experts go first: they need no routing, so the device runs their GEMMs
        // while the host enqueues the router and waits at the plan's read of the counts.
        let shared = self.shared.as_ref().map(|shared| shared.forward_moe(flat.clone()));
        let mut aux = self.route_flat(flat.clone(), dims);
        // Under the probability policy the plan drops the lowest routing weights first.
        let priority =
            (self.capacity.drop_policy() == Some(DropPolicy::Probability)).then(|| aux.weights.clone().detach());
        let (routed, plan) = self.experts.forward(
            flat.clone(),
            aux.expert_ids.clone(),
            aux.weights.clone(),
            self.capacity.limit(),
            priority,
        )?;
        aux.dropped = plan.dropped();
        Ok((plus(routed, shared).reshape(dims), aux))
    }
}

/// `routed`, plus the shared experts' output when there is one.
fn plus<B: Backend>(routed: Tensor<B, 2>, shared: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
    match shared {
        Some(shared) => routed + shared,
        None => routed,
    }
}

impl<B: MoeBackend> MoeLayer<B> {
    /// The gate's half of [`MoeLayer::forward`]: `x` `[batch, seq, d]` flattened to
    /// `[batch * seq, d]`, and the auxiliary record (routing, loads, losses; `dropped` 0).
    /// For callers that run the experts elsewhere, e.g. sharded over ranks.
    pub fn route(&self, x: Tensor<B, 3>) -> Result<(Tensor<B, 2>, MoeAux<B>), MoeError> {
        let (flat, dims) = self.flatten(x)?;
        Ok((flat.clone(), self.route_flat(flat, dims)))
    }

    /// [`MoeLayer::route`] on the flattened input `[batch * seq, d]` of `dims`.
    fn route_flat(&self, flat: Tensor<B, 2>, dims: [usize; 3]) -> MoeAux<B> {
        let dtype = flat.dtype();
        let routing = self.router.forward(flat);
        let weighted = |alpha: f64| (alpha > 0.0).then_some(alpha);
        // Computed in f32 with the router; handed back in the model's dtype so they add to
        // its loss.
        let model_dtype = |loss: Tensor<B, 1>| loss.cast(dtype);
        MoeAux {
            seq_balance_loss: weighted(self.seq_balance_alpha)
                .map(|a| sequence_balance_loss(routing.scores.clone(), routing.expert_ids.clone(), dims[1], a))
                .map(model_dtype),
            aux_loss: weighted(self.aux_loss_alpha)
                .map(|a| switch_aux_loss(routing.scores.clone(), routing.expert_ids.clone(), a))
                .map(model_dtype),
            z_loss: weighted(self.z_loss_weight).map(|w| router_z_loss(routing.logits.clone(), w)).map(model_dtype),
            expert_ids: routing.expert_ids,
            weights: routing.weights,
            counts: routing.counts,
            dropped: 0,
        }
    }
}
