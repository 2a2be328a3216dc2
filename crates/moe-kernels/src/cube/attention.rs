//! Causal attention on the grouped GEMM: each of the `b * h` sequences is one segment, so the
//! six products of the forward and the backward (`q k^T`, `P v`, `P^T g`, `g v^T`, `dS k`,
//! `dS^T q`) are the three grouped products the experts use, with no autotuning.
//!
//! burn 0.21's flash kernel (cubek) does not serve training here: on the H200 its autotune
//! rejects every flash candidate for the `small` shape and keeps the decomposed fallback, whose
//! batched matmuls each autotune about 30 kernels on a cold cache (minutes), and it has no
//! backward. The scores come out of the GEMM in the operands' dtype; the causal softmax and its
//! backward are one row kernel each (`causal_softmax.rs`), in f32 inside, as PyTorch's math
//! attention under autocast computes it.

use burn::tensor::Tensor;

use super::MoeCubeKernels;
use super::settings::kernels_enabled;
use crate::{float_primitive, float_tensor};

/// Whether these operands take this route: tensor cores for their dtype, and a length and
/// widths the kernels copy whole (multiples of 8).
pub(super) fn on_kernels<B: MoeCubeKernels>(q: &Tensor<B, 4>, v: &Tensor<B, 4>) -> bool {
    let [_, _, l, e] = q.dims();
    kernels_enabled() && B::tensor_cores(q.dtype(), &q.device()) && [l, e, v.dims()[3]].iter().all(|d| d % 8 == 0)
}

/// `[b, h, l, w]` -> `[b h l, w]`: every sequence's rows, back to back.
fn rows<B: MoeCubeKernels>(t: Tensor<B, 4>) -> Tensor<B, 2> {
    let [b, h, l, w] = t.dims();
    t.reshape([b * h * l, w])
}

/// `[b, h, l, w]` -> `[b h, l, w]`: one matrix per sequence.
fn matrices<B: MoeCubeKernels>(t: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, l, w] = t.dims();
    t.reshape([b * h, l, w])
}

/// Segment `i` of `rows` times `weights[i]`.
fn product<B: MoeCubeKernels>(rows: Tensor<B, 2>, weights: Tensor<B, 3>, segments: &[usize]) -> Tensor<B, 2> {
    float_tensor(B::grouped_gemm(float_primitive(rows), float_primitive(weights), segments))
}

/// Segment `i` of `rows`, transposed, times segment `i` of `grad`.
fn transposed_product<B: MoeCubeKernels>(rows: Tensor<B, 2>, grad: Tensor<B, 2>, segments: &[usize]) -> Tensor<B, 3> {
    float_tensor(B::grouped_gemm_weight_grad(float_primitive(rows), float_primitive(grad), segments))
}

/// The raw scores `q k^T` of every sequence, `[b h l, l]`, in the operands' dtype.
fn scores<B: MoeCubeKernels>(q: Tensor<B, 4>, k: Tensor<B, 4>, segments: &[usize]) -> Tensor<B, 2> {
    product(rows(q), matrices(k).swap_dims(1, 2), segments)
}

/// [`crate::attention::causal_attention`] on the grouped GEMM.
pub(super) fn forward<B: MoeCubeKernels>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    let [b, h, l, _] = q.dims();
    let segments = vec![l; b * h];
    let probs = float_tensor(B::causal_softmax(float_primitive(scores(q, k, &segments)), scale));
    product(probs, matrices(v.clone()), &segments).reshape([b, h, l, v.dims()[3]])
}

/// [`crate::attention::causal_attention_grad`] on the grouped GEMM.
pub(super) fn backward<B: MoeCubeKernels>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    grad: Tensor<B, 4>,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let ([b, h, l, e], ev) = (q.dims(), v.dims()[3]);
    let (dtype, segments) = (q.dtype(), vec![l; b * h]);
    let grad = rows(grad.cast(dtype));
    let grad_probs = product(grad.clone(), matrices(v).swap_dims(1, 2), &segments);
    let scores = scores(q.clone(), k.clone(), &segments);
    let (probs, grad_scores) = B::causal_softmax_grad(float_primitive(scores), float_primitive(grad_probs), scale);
    let (probs, grad_scores) = (float_tensor::<B, 2>(probs), float_tensor::<B, 2>(grad_scores));
    let grad_v = transposed_product(probs, grad, &segments);
    let grad_q = product(grad_scores.clone(), matrices(k), &segments);
    let grad_k = transposed_product(grad_scores, rows(q), &segments);
    (grad_q.reshape([b, h, l, e]), grad_k.reshape([b, h, l, e]), grad_v.reshape([b, h, l, ev]))
}
