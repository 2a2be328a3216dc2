//! The runner's AdamW: burn's optimizer adaptor (the walk over the parameters, the records)
//! around one [`MoeBackend::moe_adamw`] per parameter tensor, which the cube backends run as
//! one kernel. Its state is burn's `AdamWState`, so checkpoints written with burn's `AdamW`
//! load unchanged, and its arithmetic is burn's AdamW with `GradientClipping::Norm` (tests).

use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::Tensor;
use moe_kernels::{AdamWStep, MoeBackend};

/// AdamW's hyperparameters; the learning rate comes with each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedAdamW {
    /// Decay of the first moment.
    pub beta_1: f32,
    /// Decay of the second moment.
    pub beta_2: f32,
    /// Added to the second moment's root.
    pub epsilon: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Each gradient tensor's norm is clipped to this; `None` leaves it.
    pub clip_norm: Option<f32>,
}

impl<B: MoeBackend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let shape = tensor.shape();
        let flat = |t: Tensor<B, D>| t.reshape([shape.num_elements()]);
        // Zero moments make the first update burn's first step.
        let (time, moment_1, moment_2) = match state {
            Some(state) => (state.momentum.time + 1, flat(state.momentum.moment_1), flat(state.momentum.moment_2)),
            None => {
                let zeros = flat(tensor.zeros_like());
                (1, zeros.clone(), zeros)
            }
        };
        let step = AdamWStep {
            lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            time,
            clip_norm: self.clip_norm,
        };
        let [tensor, moment_1, moment_2] =
            B::moe_adamw(flat(tensor), flat(grad), moment_1, moment_2, &step).map(|t| t.reshape(shape.clone()));
        let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
        (tensor, Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}
