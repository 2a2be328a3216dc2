//! One AdamW update of a parameter tensor, with burn's per-tensor gradient clipping by norm,
//! as one operation: what [`crate::MoeBackend::moe_adamw`] must match.
//!
//! burn's `AdamW` with `GradientClipping::Norm` runs about 23 tensor operations per parameter
//! (a reduction, the moments, the bias corrections, the decay), each a host dispatch through
//! burn-fusion: on the `small` model's ~100 tensors that is most of the optimizer's time on a
//! GPU. The update here is the same arithmetic, so a backend can run it as one kernel.

use burn::tensor::{Tensor, backend::Backend};

/// One step's AdamW hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// The step's learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta_1: f32,
    /// Decay of the second moment.
    pub beta_2: f32,
    /// Added to the second moment's root.
    pub epsilon: f32,
    /// Decoupled weight decay (times `lr`).
    pub weight_decay: f32,
    /// Updates of this tensor so far, this one included (`>= 1`): the bias corrections.
    pub time: usize,
    /// The gradient's norm is clipped to this (burn's `GradientClipping::Norm`, per tensor);
    /// `None` leaves it.
    pub clip_norm: Option<f32>,
}

impl AdamWStep {
    /// `1 - beta_1^t` and `1 - beta_2^t`, in f32 as burn's AdamW computes them.
    pub fn bias_corrections(&self) -> (f32, f32) {
        let t = self.time.min(i32::MAX as usize) as i32;
        (1.0 - self.beta_1.powi(t), 1.0 - self.beta_2.powi(t))
    }
}

/// The clip coefficient `min(1, c / (||g|| + tiny))` from the gradient's sum of squares (as
/// burn's `clip_by_norm`, whose `tiny` is f32's smallest positive normal).
fn clip_coefficient<B: Backend>(sum_of_squares: Tensor<B, 1>, clip_norm: f32) -> Tensor<B, 1> {
    sum_of_squares.sqrt().add_scalar(f32::MIN_POSITIVE).recip().mul_scalar(clip_norm).clamp_max(1.0)
}

/// The update on tensor ops, on flat tensors of one length: returns the new parameter and
/// moments. With `g` the (clipped) gradient, `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
/// `p = p (1 - lr wd) - lr (m / c1) / (sqrt(v / c2) + eps)` with the bias corrections
/// `c1 = 1 - b1^t`, `c2 = 1 - b2^t`. Zero moments give burn's first step.
pub fn adamw<B: Backend>(
    param: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    moment_1: Tensor<B, 1>,
    moment_2: Tensor<B, 1>,
    step: &AdamWStep,
) -> [Tensor<B, 1>; 3] {
    let grad = match step.clip_norm {
        Some(clip) => {
            let coefficient = clip_coefficient(grad.clone().square().sum(), clip);
            grad * coefficient
        }
        None => grad,
    };
    let moment_1 = moment_1.mul_scalar(step.beta_1) + grad.clone().mul_scalar(1.0 - step.beta_1);
    let moment_2 = moment_2.mul_scalar(step.beta_2) + grad.square().mul_scalar(1.0 - step.beta_2);
    let (c1, c2) = step.bias_corrections();
    let delta = moment_1.clone().div_scalar(c1) / moment_2.clone().div_scalar(c2).sqrt().add_scalar(step.epsilon);
    let param = param.mul_scalar(1.0 - step.lr * step.weight_decay as f64) - delta.mul_scalar(step.lr);
    [param, moment_1, moment_2]
}
