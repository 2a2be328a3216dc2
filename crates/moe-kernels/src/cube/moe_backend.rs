//! The `MoeBackend` methods of the cube backends and their fusion wrappers: each method
//! runs its kernels through [`MoeCubeKernels`], or the portable rule where the settings turn
//! the kernels off (`MOE_KERNELS=portable`) or a case has no kernel.

use burn::tensor::{DType, FloatDType, Int, Tensor};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::{Fusion, FusionBackend};

use super::settings::kernels_enabled;
use super::{MoeCubeKernels, attention, gemm};
use crate::{
    AdamWStep, CapacityLimit, DispatchLayout, DispatchPlan, GateRule, Gated, MoeBackend, PlanError, ScoreFunction,
    Selection, float_primitive, float_tensor, portable,
};

/// The plan's kernels on tensors, as [`portable::plan_with_kernels`] takes them.
fn plan_kernels<B: MoeCubeKernels>() -> portable::PlanKernels<B> {
    portable::PlanKernels {
        scan: |ids, experts| {
            let (ranks, summary) = B::scan_experts(ids.into_primitive(), experts);
            (Tensor::from_primitive(ranks), Tensor::from_primitive(summary))
        },
        place: |ids, ranks, starts, kept, rows, padded| {
            let (ids, ranks, starts) = (ids.into_primitive(), ranks.into_primitive(), starts.into_primitive());
            let (row_of_pair, source_of_row) = B::place_rows(ids, ranks, starts, kept, rows, padded);
            (Tensor::from_primitive(row_of_pair), Tensor::from_primitive(source_of_row))
        },
    }
}

/// The `MoeBackend` methods of a backend with [`MoeCubeKernels`]: the cube backends and their
/// fusion wrappers share them (one impl each, as the two types cannot share a blanket impl).
macro_rules! cube_moe_methods {
    () => {
        fn moe_plan(
            expert_ids: Tensor<Self, 2, Int>,
            priority: Option<Tensor<Self, 2>>,
            num_experts: usize,
            limit: CapacityLimit,
        ) -> Result<DispatchPlan<Self>, PlanError> {
            if !kernels_enabled() {
                return portable::plan(expert_ids, priority, num_experts, limit, Self::layout());
            }
            portable::plan_with_kernels(
                expert_ids,
                priority,
                num_experts,
                limit,
                Self::layout(),
                Some(plan_kernels::<Self>()),
            )
        }

        fn moe_select_experts(choice: Tensor<Self, 2>, selection: &Selection) -> Tensor<Self, 2, Int> {
            if !kernels_enabled() {
                return selection.select(choice);
            }
            let choice = float_primitive(choice.cast(burn::tensor::FloatDType::F32));
            Tensor::from_primitive(Self::select_experts(choice, selection))
        }

        // One kernel for the sigmoid gate (ten tensor ops otherwise, each an operation
        // burn-fusion's thread works through); softmax keeps the ops.
        fn moe_gate(logits: Tensor<Self, 2>, bias: Tensor<Self, 1>, rule: &GateRule) -> Gated<Self> {
            if !kernels_enabled() || rule.score_function != ScoreFunction::Sigmoid {
                return rule.apply(logits, bias, Self::moe_select_experts);
            }
            let f32 = burn::tensor::FloatDType::F32;
            let (scores, ids, weights) =
                Self::gate_experts(float_primitive(logits.cast(f32)), float_primitive(bias.cast(f32)), rule);
            Gated {
                scores: float_tensor(scores),
                expert_ids: Tensor::from_primitive(ids),
                weights: float_tensor(weights),
            }
        }

        fn moe_gate_grad(
            scores: Tensor<Self, 2>,
            expert_ids: Tensor<Self, 2, Int>,
            grad_weights: Tensor<Self, 2>,
            rule: &GateRule,
        ) -> Tensor<Self, 2> {
            if !kernels_enabled() || rule.score_function != ScoreFunction::Sigmoid {
                return rule.weights_grad(scores, expert_ids, grad_weights);
            }
            let f32 = burn::tensor::FloatDType::F32;
            float_tensor(Self::gate_grad(
                float_primitive(scores.cast(f32)),
                expert_ids.into_primitive(),
                float_primitive(grad_weights.cast(f32)),
                rule,
            ))
        }

        fn moe_expert_counts(expert_ids: Tensor<Self, 2, Int>, num_experts: usize) -> Tensor<Self, 1, Int> {
            if !kernels_enabled() {
                return portable::count_experts(expert_ids, num_experts);
            }
            Tensor::from_primitive(Self::count_experts(expert_ids.into_primitive(), num_experts))
        }

        fn moe_permute(x: Tensor<Self, 2>, plan: &DispatchPlan<Self>) -> Tensor<Self, 2> {
            if !kernels_enabled() {
                return portable::permute(x, plan);
            }
            float_tensor(Self::gather_rows(float_primitive(x), plan.source_of_row.clone().into_primitive()))
        }

        fn moe_combine(rows: Tensor<Self, 2>, weights: Tensor<Self, 2>, plan: &DispatchPlan<Self>) -> Tensor<Self, 2> {
            if !kernels_enabled() {
                return portable::combine(rows, weights, plan);
            }
            // The kernel reads the router's f32 weights as they are: no cast launch.
            let row_of_pair = plan.row_of_pair.clone().into_primitive();
            float_tensor(Self::combine_rows(float_primitive(rows), row_of_pair, float_primitive(weights)))
        }

        fn moe_combine_grad(
            rows: Tensor<Self, 2>,
            weights: Tensor<Self, 2>,
            grad_out: Tensor<Self, 2>,
            plan: &DispatchPlan<Self>,
        ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
            if !kernels_enabled() {
                return portable::combine_grad(rows, weights, grad_out, plan);
            }
            let row_of_pair = plan.row_of_pair.clone().reshape([plan.tokens, plan.top_k]);
            let scaled = float_primitive(weights.clone().cast(grad_out.dtype()));
            let row_weight =
                float_tensor(Self::place_pair_values(row_of_pair.clone().into_primitive(), scaled, rows.dims()[0]));
            let grad_rows = portable::combine_grad_rows(grad_out.clone(), plan, row_weight);
            let grad_weights = Self::pair_dots(
                float_primitive(rows),
                row_of_pair.into_primitive(),
                float_primitive(grad_out),
                weights.dtype(),
            );
            (grad_rows, float_tensor(grad_weights))
        }

        fn moe_grouped_matmul(
            rows: Tensor<Self, 2>,
            weights: Tensor<Self, 3>,
            plan: &DispatchPlan<Self>,
        ) -> Tensor<Self, 2> {
            if !kernels_enabled() {
                return portable::grouped_matmul(rows, weights, plan);
            }
            float_tensor(Self::grouped_gemm(float_primitive(rows), float_primitive(weights), plan.segment_rows()))
        }

        fn moe_grouped_matmul_grad_weights(
            rows: Tensor<Self, 2>,
            grad: Tensor<Self, 2>,
            plan: &DispatchPlan<Self>,
        ) -> Tensor<Self, 3> {
            if !kernels_enabled() {
                return portable::grouped_matmul_grad_weights(rows, grad, plan);
            }
            float_tensor(Self::grouped_gemm_weight_grad(
                float_primitive(rows),
                float_primitive(grad),
                plan.segment_rows(),
            ))
        }

        fn moe_silu_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
            if !kernels_enabled() {
                return portable::silu_mul(gate, up);
            }
            let up = up.cast(gate.dtype());
            float_tensor(Self::silu_mul(float_primitive(gate), float_primitive(up)))
        }

        fn moe_silu_mul_grad(
            gate: Tensor<Self, 2>,
            up: Tensor<Self, 2>,
            grad: Tensor<Self, 2>,
        ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
            if !kernels_enabled() {
                return portable::silu_mul_grad(gate, up, grad);
            }
            let (up, grad) = (up.cast(gate.dtype()), grad.cast(gate.dtype()));
            let (grad_gate, grad_up) =
                Self::silu_mul_grad(float_primitive(gate), float_primitive(up), float_primitive(grad));
            (float_tensor(grad_gate), float_tensor(grad_up))
        }

        fn moe_adamw(
            param: Tensor<Self, 1>,
            grad: Tensor<Self, 1>,
            moment_1: Tensor<Self, 1>,
            moment_2: Tensor<Self, 1>,
            step: &AdamWStep,
        ) -> [Tensor<Self, 1>; 3] {
            let f32_only = [&param, &grad, &moment_1, &moment_2].iter().all(|t| t.dtype() == DType::F32);
            if !kernels_enabled() || !f32_only {
                return crate::adamw::adamw(param, grad, moment_1, moment_2, step);
            }
            Self::adamw(
                float_primitive(param),
                float_primitive(grad),
                [float_primitive(moment_1), float_primitive(moment_2)],
                step,
            )
            .map(float_tensor)
        }

        fn moe_rotary(
            x: Tensor<Self, 4>,
            cos: Tensor<Self, 2>,
            sin: Tensor<Self, 2>,
            interleave: bool,
        ) -> Tensor<Self, 4> {
            if !kernels_enabled() {
                return crate::rotary::rotary(x, cos, sin, interleave);
            }
            let [cos, sin] = [cos, sin].map(|t| float_primitive(t.cast(FloatDType::F32)));
            float_tensor(Self::rotary(float_primitive(x), cos, sin, interleave))
        }

        fn moe_rms_norm(x: Tensor<Self, 2>, gamma: Tensor<Self, 1>, epsilon: f64) -> Tensor<Self, 2> {
            if !kernels_enabled() {
                return crate::rms_norm::rms_norm(x, gamma, epsilon);
            }
            let gamma = float_primitive(gamma.cast(FloatDType::F32));
            float_tensor(Self::rms_norm(float_primitive(x), gamma, epsilon))
        }

        fn moe_rms_norm_grad(
            x: Tensor<Self, 2>,
            gamma: Tensor<Self, 1>,
            grad: Tensor<Self, 2>,
            epsilon: f64,
        ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
            if !kernels_enabled() {
                return crate::rms_norm::rms_norm_grad(x, gamma, grad, epsilon);
            }
            let (dtype, gamma_dtype) = (x.dtype(), gamma.dtype());
            let gamma = float_primitive(gamma.cast(FloatDType::F32));
            let grad = float_primitive(grad.cast(dtype));
            let (grad_x, grad_normed) = Self::rms_norm_grad(float_primitive(x), gamma, grad, epsilon);
            let grad_gamma = float_tensor::<Self, 2>(grad_normed).sum_dim(0).squeeze_dim::<1>(0).cast(gamma_dtype);
            (float_tensor(grad_x), grad_gamma)
        }

        fn moe_dense_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
            // The grouped GEMM with one segment: faster than burn's matmul on tensor cores,
            // while the scalar tile product (f32, devices without them) is slower.
            let ([rows, inner], cols) = (x.dims(), w.dims()[1]);
            if !gemm::dense_on_kernels::<Self>(rows, inner, cols, x.dtype(), &x.device()) {
                return x.matmul(w);
            }
            let w = float_primitive(w.unsqueeze_dim::<3>(0));
            float_tensor(Self::grouped_gemm(float_primitive(x), w, &[rows]))
        }

        fn moe_causal_attention(
            q: Tensor<Self, 4>,
            k: Tensor<Self, 4>,
            v: Tensor<Self, 4>,
            scale: f64,
        ) -> Tensor<Self, 4> {
            if !attention::on_kernels(&q, &v) {
                return crate::attention::causal_attention(q, k, v, scale);
            }
            attention::forward(q, k, v, scale)
        }

        fn moe_causal_attention_grad(
            q: Tensor<Self, 4>,
            k: Tensor<Self, 4>,
            v: Tensor<Self, 4>,
            grad: Tensor<Self, 4>,
            scale: f64,
        ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
            if !attention::on_kernels(&q, &v) {
                return crate::attention::causal_attention_grad(q, k, v, grad, scale);
            }
            attention::backward(q, k, v, grad, scale)
        }

        fn moe_dense_matmul_grad_weights(x: Tensor<Self, 2>, grad: Tensor<Self, 2>) -> Tensor<Self, 2> {
            let ([rows, a], b) = (x.dims(), grad.dims()[1]);
            if !gemm::dense_on_kernels::<Self>(rows, a, b, x.dtype(), &x.device()) {
                return x.transpose().matmul(grad);
            }
            let grad = grad.cast(x.dtype());
            let parts = gemm::split_k::dense_weight_grad_parts(rows, a, b);
            float_tensor(Self::dense_weight_grad(float_primitive(x), float_primitive(grad), &parts))
        }

        fn moe_grouped_swiglu(
            rows: Tensor<Self, 2>,
            gate: Tensor<Self, 3>,
            up: Tensor<Self, 3>,
            down: Tensor<Self, 3>,
            plan: &DispatchPlan<Self>,
        ) -> Tensor<Self, 2> {
            portable::swiglu_by_grouped_matmuls(rows, gate, up, down, plan)
        }
    };
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> MoeBackend for CubeBackend<R, F, I, BT> {
    /// Packed segments for the kernels; `Padded` for the portable path, which needs it, when
    /// the settings turn the kernels off.
    fn layout() -> DispatchLayout {
        if kernels_enabled() { DispatchLayout::Segments } else { DispatchLayout::Padded }
    }

    cube_moe_methods!();
}

impl<B: FusionBackend + MoeCubeKernels + MoeBackend> MoeBackend for Fusion<B> {
    fn layout() -> DispatchLayout {
        B::layout()
    }

    cube_moe_methods!();
}
