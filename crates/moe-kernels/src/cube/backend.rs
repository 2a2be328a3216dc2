//! [`MoeCubeKernels`] on the cube backends: each method launches its kernel through the
//! launch function of the file that holds the kernel.

use burn::tensor::DType;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use super::{MoeCubeKernels, adamw, causal_softmax, dispatch, gate, gemm, rms_norm, rotary, swiglu};
use crate::{AdamWStep, GateRule, Selection};

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> MoeCubeKernels for CubeBackend<R, F, I, BT> {
    fn grouped_gemm(rows: CubeTensor<R>, weights: CubeTensor<R>, segment_rows: &[usize]) -> CubeTensor<R> {
        gemm::grouped_gemm_rows(rows, weights, segment_rows)
    }

    fn grouped_gemm_weight_grad(rows: CubeTensor<R>, grad: CubeTensor<R>, segment_rows: &[usize]) -> CubeTensor<R> {
        gemm::grouped_gemm_weight_grad(rows, grad, segment_rows)
    }

    fn scan_experts(ids: CubeTensor<R>, num_experts: usize) -> (CubeTensor<R>, CubeTensor<R>) {
        dispatch::launch_scan_experts(ids, num_experts)
    }

    fn place_rows(
        ids: CubeTensor<R>,
        ranks: CubeTensor<R>,
        starts: CubeTensor<R>,
        kept: usize,
        rows: usize,
        padded: bool,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        dispatch::launch_place_rows(ids, ranks, starts, kept, rows, padded)
    }

    fn count_experts(ids: CubeTensor<R>, num_experts: usize) -> CubeTensor<R> {
        dispatch::launch_count_experts(ids, num_experts)
    }

    fn place_pair_values(row_of_pair: CubeTensor<R>, values: CubeTensor<R>, rows: usize) -> CubeTensor<R> {
        dispatch::launch_place_pair_values(row_of_pair, values, rows)
    }

    fn gather_rows(x: CubeTensor<R>, source: CubeTensor<R>) -> CubeTensor<R> {
        dispatch::launch_gather_rows(x, source)
    }

    fn combine_rows(rows: CubeTensor<R>, row_of_pair: CubeTensor<R>, weights: CubeTensor<R>) -> CubeTensor<R> {
        dispatch::launch_combine_rows(rows, row_of_pair, weights)
    }

    fn pair_dots(rows: CubeTensor<R>, row_of_pair: CubeTensor<R>, grad: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
        dispatch::launch_pair_dots(rows, row_of_pair, grad, dtype)
    }

    fn select_experts(choice: CubeTensor<R>, selection: &Selection) -> CubeTensor<R> {
        gate::launch_select(choice, selection, I::dtype())
    }

    fn gate_experts(
        logits: CubeTensor<R>,
        bias: CubeTensor<R>,
        rule: &GateRule,
    ) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
        gate::launch_gate(logits, bias, rule, I::dtype())
    }

    fn gate_grad(scores: CubeTensor<R>, ids: CubeTensor<R>, grad: CubeTensor<R>, rule: &GateRule) -> CubeTensor<R> {
        gate::launch_gate_grad(scores, ids, grad, rule)
    }

    fn silu_mul(gate: CubeTensor<R>, up: CubeTensor<R>) -> CubeTensor<R> {
        swiglu::launch_silu_mul(gate, up)
    }

    fn silu_mul_grad(gate: CubeTensor<R>, up: CubeTensor<R>, grad: CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>) {
        swiglu::launch_silu_mul_grad(gate, up, grad)
    }

    fn dense_weight_grad(x: CubeTensor<R>, grad: CubeTensor<R>, parts: &[usize]) -> CubeTensor<R> {
        gemm::split_k::dense_weight_grad(x, grad, parts)
    }

    fn adamw(
        param: CubeTensor<R>,
        grad: CubeTensor<R>,
        [moment_1, moment_2]: [CubeTensor<R>; 2],
        step: &AdamWStep,
    ) -> [CubeTensor<R>; 3] {
        adamw::launch_adamw(param, grad, moment_1, moment_2, step)
    }

    fn rotary(x: CubeTensor<R>, cos: CubeTensor<R>, sin: CubeTensor<R>, interleave: bool) -> CubeTensor<R> {
        rotary::launch_rotary(x, cos, sin, interleave)
    }

    fn rms_norm(x: CubeTensor<R>, gamma: CubeTensor<R>, epsilon: f64) -> CubeTensor<R> {
        rms_norm::launch_rms_norm(x, gamma, epsilon)
    }

    fn rms_norm_grad(
        x: CubeTensor<R>,
        gamma: CubeTensor<R>,
        grad: CubeTensor<R>,
        epsilon: f64,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        rms_norm::launch_rms_norm_grad(x, gamma, grad, epsilon)
    }

    fn causal_softmax(scores: CubeTensor<R>, scale: f64) -> CubeTensor<R> {
        causal_softmax::launch_causal_softmax(scores, scale)
    }

    fn causal_softmax_grad(
        scores: CubeTensor<R>,
        grad_probs: CubeTensor<R>,
        scale: f64,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        causal_softmax::launch_causal_softmax_grad(scores, grad_probs, scale)
    }

    fn tensor_cores(dtype: DType, device: &R::Device) -> bool {
        gemm::tensor_cores_for(&R::client(device), dtype)
    }
}
