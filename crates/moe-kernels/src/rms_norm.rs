//! RMSNorm over the rows of `x` `[rows, d]` with f32 statistics, `y = x / sqrt(mean(x^2) + eps)
//! * gamma` in `x`'s dtype, and its backward: what [`crate::MoeBackend::moe_rms_norm`] and
//! [`crate::MoeBackend::moe_rms_norm_grad`] must match.
//!
//! burn's `RmsNorm` with f32 statistics is about six tensor operations forward (casts, the
//! square, the mean, the root, the division, the scale) and, under `Autodiff`, about twelve
//! back; the model runs two per block, so one operation each way saves a few hundred
//! dispatches a training step.

use burn::tensor::{FloatDType, Tensor, backend::Backend};

/// `x / sqrt(mean(x^2) + epsilon) * gamma` over the rows of `x` `[rows, d]`, with the statistics
/// and the scale in f32, as burn's `RmsNorm` computes them; the result in `x`'s dtype.
pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, gamma: Tensor<B, 1>, epsilon: f64) -> Tensor<B, 2> {
    let dtype = x.dtype();
    let x = x.cast(FloatDType::F32);
    let rms = x.clone().square().mean_dim(1).add_scalar(epsilon).sqrt();
    (x / rms * gamma.cast(FloatDType::F32).unsqueeze::<2>()).cast(dtype)
}

/// The gradients of [`rms_norm`] with respect to `x` (in `x`'s dtype) and `gamma` (in
/// `gamma`'s) from the output's gradient `grad` `[rows, d]`. With `r = 1 / sqrt(mean(x^2) +
/// eps)`, `xh = x r` and `u = grad gamma`: `dx = r (u - xh mean(u xh))` per row and
/// `dgamma = sum over rows of grad xh`, all in f32.
pub fn rms_norm_grad<B: Backend>(
    x: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    grad: Tensor<B, 2>,
    epsilon: f64,
) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let (dtype, gamma_dtype) = (x.dtype(), gamma.dtype());
    let x = x.cast(FloatDType::F32);
    let grad = grad.cast(FloatDType::F32);
    let r = x.clone().square().mean_dim(1).add_scalar(epsilon).sqrt().recip();
    let normed = x * r.clone();
    let grad_gamma = (grad.clone() * normed.clone()).sum_dim(0).squeeze_dim::<1>(0);
    let u = grad * gamma.cast(FloatDType::F32).unsqueeze::<2>();
    let dot = (u.clone() * normed.clone()).mean_dim(1);
    let grad_x = (u - normed * dot) * r;
    (grad_x.cast(dtype), grad_gamma.cast(gamma_dtype))
}
