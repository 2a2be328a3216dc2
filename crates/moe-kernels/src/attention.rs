//! Causal self-attention for training: burn's attention forward (flash attention on the cube
//! backends) and a backward that recomputes the softmax in f32 from the queries and keys.
//!
//! burn 0.21's `Autodiff` runs `module::attention` as its decomposed fallback (the scores, the
//! mask and the softmax as separate tracked ops, each kept for the backward), and the cube
//! backends' flash kernel has no backward and returns no row statistics. So `Autodiff` gets its
//! own operation ([`crate::MoeBackend::moe_causal_attention`]): the inner backend's forward, and
//! [`causal_attention_grad`] as its backward, which keeps only `q`, `k` and `v` between the
//! passes and forms one layer's `[b, h, l, l]` probabilities at a time, during that layer's
//! backward.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, FloatDType, Tensor, activation::softmax, backend::Backend};

/// `softmax(scale q k^T + causal mask) v` for `q`, `k` `[b, h, l, e]` and `v` `[b, h, l, ev]`,
/// through burn's `module::attention` (a flash kernel on the cube backends, accumulating in f32).
/// burn's kernels take only their default scale `e^-0.5`, so any other scale goes into `q`.
pub fn causal_attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f64) -> Tensor<B, 4> {
    let default = (q.dims()[3] as f64).powf(-0.5);
    let q = if (scale / default - 1.0).abs() > 1e-12 { q.mul_scalar(scale / default) } else { q };
    attention(q, k, v, None, None, AttentionModuleOptions { scale: None, softcap: None, is_causal: true })
}

/// Gradients of [`causal_attention`] with respect to `q`, `k` and `v` from the output's
/// gradient `grad` `[b, h, l, ev]`. The probabilities are recomputed in f32, or f64 for f64
/// operands (`P`); with
/// `dP = grad v^T`, the scores' gradient is `P (dP - rowsum(P dP))`. The products run in the
/// operands' dtype.
pub fn causal_attention_grad<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    grad: Tensor<B, 4>,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, l, _] = q.dims();
    let dtype = q.dtype();
    let stats = if dtype == DType::F64 { FloatDType::F64 } else { FloatDType::F32 };
    // True where the key lies after the query: the future, which a causal model must not see.
    let future = Tensor::<B, 2, Bool>::tril_mask([l, l], 0, &q.device()).reshape([1, 1, l, l]).expand([b, h, l, l]);
    let scores = q.clone().matmul(k.clone().swap_dims(2, 3)).cast(stats).mul_scalar(scale);
    let probs = softmax(scores.mask_fill(future, f32::NEG_INFINITY), 3);
    let grad_v = probs.clone().cast(dtype).swap_dims(2, 3).matmul(grad.clone());
    let grad_probs = grad.matmul(v.swap_dims(2, 3)).cast(stats);
    let row = (probs.clone() * grad_probs.clone()).sum_dim(3);
    let grad_scores = (probs * (grad_probs - row)).mul_scalar(scale).cast(dtype);
    let grad_q = grad_scores.clone().matmul(k);
    let grad_k = grad_scores.swap_dims(2, 3).matmul(q);
    (grad_q, grad_k, grad_v)
}
