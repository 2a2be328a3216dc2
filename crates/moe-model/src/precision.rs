//! Mixed precision: the model's parameters stay f32 (the masters the optimizer updates) and each
//! module computes in the dtype of its input, casting its weights to it on the way in.
//! [`DeepSeekModel::with_compute_dtype`](crate::DeepSeekModel::with_compute_dtype) picks that
//! dtype once, for the embedding's output; the rest follows. A cast's backward casts the gradient
//! back, so gradients land in f32. Where a bf16 product would lose what the loss needs, the
//! computation runs in f32: RMSNorm's statistics (here), the router (in `moe-router`), the
//! attention softmax (flash attention accumulates in f32; its backward recomputes in f32) and the
//! logits, which the model returns in f32.

use burn::nn::{Linear, RmsNorm};
use burn::tensor::Tensor;
use moe_experts::MoeBackend;

/// `layer` on `x` in `x`'s dtype, as one `[rows, d_in]` product
/// ([`MoeBackend::moe_dense_matmul`]: the grouped GEMM on the cube backends' tensor cores).
pub fn linear<B: MoeBackend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let dtype = x.dtype();
    let mut dims = x.dims();
    let [d_in, d_out] = layer.weight.dims();
    let rows = dims[..D - 1].iter().product();
    let y = B::moe_dense_matmul(x.reshape([rows, d_in]), layer.weight.val().cast(dtype));
    let y = match &layer.bias {
        Some(bias) => y + bias.val().cast(dtype).unsqueeze::<2>(),
        None => y,
    };
    dims[D - 1] = d_out;
    y.reshape(dims)
}

/// `norm` on `x` with its statistics and scale in f32, the result in `x`'s dtype, as one
/// operation over the rows ([`MoeBackend::moe_rms_norm`]).
pub fn rms_norm<B: MoeBackend, const D: usize>(norm: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let dims = x.dims();
    let d = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    B::moe_rms_norm(x.reshape([rows, d]), norm.gamma.val(), norm.epsilon).reshape(dims)
}
