use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{IndexingUpdateOp, Int, Tensor, activation::silu, backend::Backend};
use moe_kernels::{CapacityLimit, DispatchPlan, MoeBackend};

use crate::MoeError;
use crate::swiglu::fan_in_uniform;

/// Shape of an [`ExpertBank`].
#[derive(Config, Debug)]
pub struct ExpertBankConfig {
    /// Experts `E`.
    pub num_experts: usize,
    /// Token width `d`.
    pub d_model: usize,
    /// Hidden width `h` of one expert (`moe_intermediate_size`).
    pub hidden: usize,
}

/// E SwiGLU experts with stacked weights.
#[derive(Module, Debug)]
pub struct ExpertBank<B: Backend> {
    /// `[E, d, h]`.
    pub gate: Param<Tensor<B, 3>>,
    /// `[E, d, h]`.
    pub up: Param<Tensor<B, 3>>,
    /// `[E, h, d]`.
    pub down: Param<Tensor<B, 3>>,
}

impl ExpertBankConfig {
    /// Randomly initialised experts (Kaiming-uniform on each expert's fan-in).
    pub fn init<B: Backend>(&self, device: &B::Device) -> ExpertBank<B> {
        let (e, d, h) = (self.num_experts, self.d_model, self.hidden);
        ExpertBank {
            gate: fan_in_uniform().init_with([e, d, h], Some(d), Some(h), device),
            up: fan_in_uniform().init_with([e, d, h], Some(d), Some(h), device),
            down: fan_in_uniform().init_with([e, h, d], Some(h), Some(d), device),
        }
    }
}

impl<B: Backend> ExpertBank<B> {
    /// Experts `E`.
    pub fn num_experts(&self) -> usize {
        self.gate.dims()[0]
    }
}

impl<B: MoeBackend> ExpertBank<B> {
    /// Runs each token through its K experts and sums the outputs with `weights`:
    /// `out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])`.
    ///
    /// `x` `[T, d]`, `expert_ids` `[T, K]`, `weights` `[T, K]`. Sorted dispatch through
    /// [`MoeBackend`]; one host sync (the per-expert counts, in `moe_plan`). Returns the plan
    /// too, for its counts and drops.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        expert_ids: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
        limit: CapacityLimit,
        priority: Option<Tensor<B, 2>>,
    ) -> Result<(Tensor<B, 2>, DispatchPlan<B>), MoeError> {
        let plan = B::moe_plan(expert_ids, priority, self.num_experts(), limit)?;
        // In `x`'s dtype: f32 parameters run bf16 products under mixed precision.
        let weight = |p: &Param<Tensor<B, 3>>| p.val().cast(x.dtype());
        let (gate, up, down) = (weight(&self.gate), weight(&self.up), weight(&self.down));
        let rows = B::moe_permute(x, &plan);
        let y = B::moe_grouped_swiglu(rows, gate, up, down, &plan);
        Ok((B::moe_combine(y, weights, &plan), plan))
    }
}

impl<B: Backend> ExpertBank<B> {
    /// The same sum as [`ExpertBank::forward`] (dropless), one expert at a time: reads the ids
    /// to the host, gathers each expert's tokens, runs that expert alone. Test oracle and
    /// bench baseline; not for training.
    pub fn forward_loop(&self, x: Tensor<B, 2>, expert_ids: Tensor<B, 2, Int>, weights: Tensor<B, 2>) -> Tensor<B, 2> {
        let [tokens, d] = x.dims();
        let k = expert_ids.dims()[1];
        let device = x.device();
        let ids: Vec<i64> = expert_ids.into_data().iter::<i64>().collect();
        let flat_weights = weights.cast(x.dtype()).reshape([tokens * k, 1]);
        let mut out = Tensor::<B, 2>::zeros([tokens, d], &device).cast(x.dtype());
        for expert in 0..self.num_experts() {
            let pairs: Vec<i64> = (0..ids.len() as i64).filter(|&p| ids[p as usize] == expert as i64).collect();
            if pairs.is_empty() {
                continue;
            }
            let token_of_pair: Vec<i64> = pairs.iter().map(|p| p / k as i64).collect();
            let pairs = Tensor::<B, 1, Int>::from_ints(pairs.as_slice(), &device);
            let tokens_idx = Tensor::<B, 1, Int>::from_ints(token_of_pair.as_slice(), &device);
            let xe = x.clone().select(0, tokens_idx.clone());
            let w = |p: &Param<Tensor<B, 3>>| {
                let [_, a, b] = p.dims();
                p.val().narrow(0, expert, 1).reshape([a, b])
            };
            let ye = (silu(xe.clone().matmul(w(&self.gate))) * xe.matmul(w(&self.up))).matmul(w(&self.down));
            let ye = ye * flat_weights.clone().select(0, pairs);
            out = out.select_assign(0, tokens_idx, ye, IndexingUpdateOp::Add);
        }
        out
    }
}
