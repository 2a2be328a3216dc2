//! The MoE operations a burn backend may specialise, with a portable default.
//!
//! Model code (`moe-experts`) never calls burn matmuls on expert segments directly; it goes
//! through [`MoeBackend`], whose every method has a portable default built from burn tensor ops.
//! That default runs on every backend and under `Autodiff`. A backend with its own kernels
//! (a CubeCL grouped GEMM, say) overrides the methods and keeps the same [`DispatchPlan`]
//! contract, so model code does not change.
//!
//! The data path is: [`MoeBackend::moe_plan`] (sort the (token, slot) pairs by expert),
//! [`MoeBackend::moe_permute`] (gather token rows into the dispatch layout),
//! [`MoeBackend::moe_grouped_swiglu`] (each expert's SwiGLU on its segment, built on
//! [`MoeBackend::moe_grouped_matmul`]),
//! [`MoeBackend::moe_combine`] (weighted sum of each token's K expert outputs). Beside them,
//! [`MoeBackend::moe_dense_matmul`] runs the shared experts' products.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Int, Tensor};
//! use moe_kernels::{CapacityLimit, MoeBackend};
//!
//! type B = NdArray;
//! let device = Default::default();
//! // 3 tokens, top-2 over 4 experts.
//! let ids = Tensor::<B, 2, Int>::from_ints([[0, 2], [2, 3], [0, 1]], &device);
//! let plan = B::moe_plan(ids, None, 4, CapacityLimit::Dropless).unwrap();
//! assert_eq!(plan.counts(), &[2, 1, 2, 1]);
//! assert_eq!(plan.dropped(), 0);
//!
//! let x = Tensor::<B, 2>::ones([3, 8], &device);
//! let w = Tensor::<B, 3>::ones([4, 8, 5], &device);
//! let rows = B::moe_permute(x, &plan);
//! let y = B::moe_grouped_matmul(rows, w, &plan);
//! let weights = Tensor::<B, 2>::full([3, 2], 0.5, &device);
//! let out = B::moe_combine(y, weights, &plan);
//! assert_eq!(out.dims(), [3, 5]);
//! // every token: 0.5 * 8 + 0.5 * 8
//! out.into_data().assert_eq(&Tensor::<B, 2>::full([3, 5], 8.0, &device).into_data(), true);
//! ```

pub mod adamw;
pub mod attention;
mod autodiff;
mod backends;
#[cfg(feature = "cube")]
pub mod cube;
mod error;
mod gate;
mod plan;
pub mod portable;
pub mod rms_norm;
pub mod rotary;
mod select;

pub use adamw::AdamWStep;
pub use error::PlanError;
pub use gate::{GateRule, Gated, ScoreFunction};
pub use plan::{CapacityLimit, DispatchLayout, DispatchPlan};
pub use select::{Selection, mask_groups, top_k_lowest_id};

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Int, Tensor, TensorPrimitive, backend::Backend};

/// The MoE operations a backend may specialise. Every method has a portable default.
///
/// Shapes: `T` tokens, `K` experts per token, `E` experts, `N = T * K` (token, slot) pairs.
/// "Rows" are the dispatch layout chosen by [`MoeBackend::moe_plan`]; only the methods of
/// the same backend read them, so a backend may pick any layout (the default pads each
/// expert's segment to a common capacity).
pub trait MoeBackend: Backend {
    /// The layout [`MoeBackend::moe_plan`] plans: `Padded` (one batched matmul) unless the
    /// backend runs many small matmuls well (CPUs) or has kernels for packed segments.
    fn layout() -> DispatchLayout {
        DispatchLayout::Padded
    }

    /// Plans the dispatch of `expert_ids` `[T, K]`: sorts the pairs by expert, counts them,
    /// and, under a [`CapacityLimit`], decides which pairs are dropped. `priority` `[T, K]`
    /// orders pairs inside an expert when dropping (higher kept first); `None` keeps the
    /// earlier token. Reads the per-expert counts to the host: the one host sync of a layer.
    fn moe_plan(
        expert_ids: Tensor<Self, 2, Int>,
        priority: Option<Tensor<Self, 2>>,
        num_experts: usize,
        limit: CapacityLimit,
    ) -> Result<DispatchPlan<Self>, PlanError> {
        portable::plan(expert_ids, priority, num_experts, limit, Self::layout())
    }

    /// The router's expert selection on the biased scores `choice` `[T, E]` (f32, detached):
    /// must return exactly [`Selection::select`]'s ids, which is the default.
    fn moe_select_experts(choice: Tensor<Self, 2>, selection: &Selection) -> Tensor<Self, 2, Int> {
        selection.select(choice)
    }

    /// The router's gate on its logits `[T, E]` and selection bias `[E]` (both f32): what
    /// [`GateRule::apply`] returns, with exactly its ids. The default is that, selecting with
    /// [`MoeBackend::moe_select_experts`]; a backend may run the whole gate as one kernel where
    /// no gradient is tracked.
    fn moe_gate(logits: Tensor<Self, 2>, bias: Tensor<Self, 1>, rule: &GateRule) -> Gated<Self> {
        rule.apply(logits, bias, Self::moe_select_experts)
    }

    /// The gradient of the gate's logits `[T, E]` through its weights, from the weights'
    /// gradient `grad_weights` `[T, K]` and the forward's `scores` `[T, E]` and `expert_ids`
    /// `[T, K]`: what [`GateRule::weights_grad`] returns, which is the default. `Autodiff`
    /// calls it on the inner backend, so the gate's backward can be one kernel too.
    fn moe_gate_grad(
        scores: Tensor<Self, 2>,
        expert_ids: Tensor<Self, 2, Int>,
        grad_weights: Tensor<Self, 2>,
        rule: &GateRule,
    ) -> Tensor<Self, 2> {
        rule.weights_grad(scores, expert_ids, grad_weights)
    }

    /// Pairs per expert of `expert_ids` `[T, K]` (ids in `0..num_experts`): the router's
    /// counts. The default is a scatter-add.
    fn moe_expert_counts(expert_ids: Tensor<Self, 2, Int>, num_experts: usize) -> Tensor<Self, 1, Int> {
        portable::count_experts(expert_ids, num_experts)
    }

    /// Gathers token rows `x` `[T, d]` into the plan's dispatch layout.
    fn moe_permute(x: Tensor<Self, 2>, plan: &DispatchPlan<Self>) -> Tensor<Self, 2> {
        portable::permute(x, plan)
    }

    /// Multiplies each expert's segment of `rows` `[rows, a]` by that expert's matrix
    /// `weights[e]` (`weights`: `[E, a, b]`); returns rows `[rows, b]` in the same layout.
    fn moe_grouped_matmul(
        rows: Tensor<Self, 2>,
        weights: Tensor<Self, 3>,
        plan: &DispatchPlan<Self>,
    ) -> Tensor<Self, 2> {
        portable::grouped_matmul(rows, weights, plan)
    }

    /// Gradient of [`MoeBackend::moe_grouped_matmul`] with respect to `weights`: `[E, a, b]`,
    /// `out[e] = rows_e^T grad_e` over expert `e`'s segment of `rows` `[rows, a]` and `grad`
    /// `[rows, b]`; zeros for an expert without rows. `Autodiff` calls it on the inner backend;
    /// the gradient with respect to `rows` is this method's product on `weights`' transposed
    /// view.
    fn moe_grouped_matmul_grad_weights(
        rows: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        plan: &DispatchPlan<Self>,
    ) -> Tensor<Self, 3> {
        portable::grouped_matmul_grad_weights(rows, grad, plan)
    }

    /// Each expert's SwiGLU on its segment: `down_e(silu(rows gate_e) * (rows up_e))`, with
    /// `gate`, `up` `[E, d, h]` and `down` `[E, h, d]`. The `Segments` layout runs the whole MLP
    /// one segment at a time, so its `[n, h]` intermediates stay in cache; `Padded` runs three
    /// grouped matmuls.
    fn moe_grouped_swiglu(
        rows: Tensor<Self, 2>,
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        down: Tensor<Self, 3>,
        plan: &DispatchPlan<Self>,
    ) -> Tensor<Self, 2> {
        portable::grouped_swiglu::<Self>(rows, gate, up, down, plan)
    }

    /// `silu(gate) * up`, elementwise on `[n, h]` tensors: the SwiGLU's activation between
    /// its products (routed and shared experts). The default is burn's ops; under `Autodiff`
    /// its backward is [`MoeBackend::moe_silu_mul_grad`]: one operation each way where burn's
    /// autodiff of the ops runs about 25.
    fn moe_silu_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        portable::silu_mul(gate, up)
    }

    /// Gradients of [`MoeBackend::moe_silu_mul`] with respect to `gate` and `up` from the
    /// output's gradient `grad`: `grad up silu'(gate)` and `grad silu(gate)`.
    fn moe_silu_mul_grad(
        gate: Tensor<Self, 2>,
        up: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        portable::silu_mul_grad(gate, up, grad)
    }

    /// `x` `[T, a]` times `w` `[a, b]`: the dense products beside the experts (the shared
    /// experts). The default is burn's matmul; a backend whose own GEMM is faster at these
    /// shapes overrides it. Under `Autodiff` the row gradient is this product on `w`'s
    /// transposed view and the weight gradient [`MoeBackend::moe_dense_matmul_grad_weights`].
    fn moe_dense_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        x.matmul(w)
    }

    /// `x^T grad` for `x` `[T, a]` and `grad` `[T, b]`, `[a, b]`: the weight gradient of
    /// [`MoeBackend::moe_dense_matmul`]. The default is burn's matmul.
    fn moe_dense_matmul_grad_weights(x: Tensor<Self, 2>, grad: Tensor<Self, 2>) -> Tensor<Self, 2> {
        x.transpose().matmul(grad)
    }

    /// Causal self-attention `softmax(scale q k^T) v` over `q`, `k` `[b, h, l, e]` and `v`
    /// `[b, h, l, ev]` (the attention beside the MoE layers): [`attention::causal_attention`],
    /// burn's `module::attention`, by default. Under `Autodiff` its backward is
    /// [`MoeBackend::moe_causal_attention_grad`] on the inner backend, so the forward keeps the
    /// inner backend's kernel (flash attention on the cube backends) and no probabilities.
    fn moe_causal_attention(q: Tensor<Self, 4>, k: Tensor<Self, 4>, v: Tensor<Self, 4>, scale: f64) -> Tensor<Self, 4> {
        attention::causal_attention(q, k, v, scale)
    }

    /// Gradients of [`MoeBackend::moe_causal_attention`] with respect to `q`, `k` and `v` from
    /// the output's gradient `grad`: [`attention::causal_attention_grad`] by default.
    fn moe_causal_attention_grad(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        grad: Tensor<Self, 4>,
        scale: f64,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        attention::causal_attention_grad(q, k, v, grad, scale)
    }

    /// One AdamW update of a flat parameter `param` from its gradient `grad` and moments
    /// `moment_1`, `moment_2` (all of one length, f32 masters): the new parameter and moments,
    /// [`adamw::adamw`] by default. The optimizer calls it on the inner backend, outside
    /// autodiff; the cube backends run it as one kernel.
    fn moe_adamw(
        param: Tensor<Self, 1>,
        grad: Tensor<Self, 1>,
        moment_1: Tensor<Self, 1>,
        moment_2: Tensor<Self, 1>,
        step: &AdamWStep,
    ) -> [Tensor<Self, 1>; 3] {
        adamw::adamw(param, grad, moment_1, moment_2, step)
    }

    /// Rotary position embedding of `x` `[b, h, l, r]` (any strides) by `cos` and `sin`
    /// `[l, r / 2]` (f32), pairs `(2i, 2i + 1)` when `interleave`, else `(i, i + r / 2)`:
    /// [`rotary::rotary`] by default, one kernel on the cube backends. Under `Autodiff` its
    /// backward is this rotation with `-sin`.
    fn moe_rotary(x: Tensor<Self, 4>, cos: Tensor<Self, 2>, sin: Tensor<Self, 2>, interleave: bool) -> Tensor<Self, 4> {
        rotary::rotary(x, cos, sin, interleave)
    }

    /// RMSNorm of the rows of `x` `[rows, d]` by `gamma` `[d]` with f32 statistics, in `x`'s
    /// dtype: [`rms_norm::rms_norm`] by default. Under `Autodiff` its backward is
    /// [`MoeBackend::moe_rms_norm_grad`], so each way is one operation on the cube backends.
    fn moe_rms_norm(x: Tensor<Self, 2>, gamma: Tensor<Self, 1>, epsilon: f64) -> Tensor<Self, 2> {
        rms_norm::rms_norm(x, gamma, epsilon)
    }

    /// Gradients of [`MoeBackend::moe_rms_norm`] with respect to `x` and `gamma` from the
    /// output's gradient `grad`: [`rms_norm::rms_norm_grad`] by default.
    fn moe_rms_norm_grad(
        x: Tensor<Self, 2>,
        gamma: Tensor<Self, 1>,
        grad: Tensor<Self, 2>,
        epsilon: f64,
    ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        rms_norm::rms_norm_grad(x, gamma, grad, epsilon)
    }

    /// Returns `out[t] = sum_k weights[t, k] * rows[row of (t, k)]`, `[T, d]`; a dropped
    /// pair contributes zero.
    fn moe_combine(rows: Tensor<Self, 2>, weights: Tensor<Self, 2>, plan: &DispatchPlan<Self>) -> Tensor<Self, 2> {
        portable::combine(rows, weights, plan)
    }

    /// Gradients of [`MoeBackend::moe_combine`] from `grad_out` `[T, d]`: w.r.t. `rows`
    /// (`[rows, d]`, each row's pair weight times its token's gradient) and w.r.t. `weights`
    /// (`[T, K]`, in the weights' dtype). The permute's gradient is the combine itself with
    /// unit weights (kept pairs and non-padding rows correspond one to one).
    fn moe_combine_grad(
        rows: Tensor<Self, 2>,
        weights: Tensor<Self, 2>,
        grad_out: Tensor<Self, 2>,
        plan: &DispatchPlan<Self>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        portable::combine_grad(rows, weights, grad_out, plan)
    }
}

/// A float primitive as a tensor: the custom backward ops and the kernels work on primitives.
pub(crate) fn float_tensor<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// A float tensor's primitive.
pub(crate) fn float_primitive<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> FloatTensor<B> {
    tensor.into_primitive().tensor()
}
