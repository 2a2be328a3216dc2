//! AdamW's update of one f32 parameter tensor as one elementwise kernel (the contract is
//! `crate::adamw::adamw`): each unit reads the parameter, gradient and both moments once and
//! writes the three results. With clipping, a first launch of [`SQUARE_CUBES`] cubes sums the
//! gradient's squares into as many partial sums, and every cube of the update adds them up
//! itself: two launches a tensor, and no value goes to the host.

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::launch::{ROW_UNITS, flat_vector_size, row_cubes};
use super::reduce::cube_sum;
use crate::AdamWStep;

/// Cubes of the sum-of-squares pass (each a strided share of the gradient), so partial sums the
/// update's cubes can add in shared memory.
const SQUARE_CUBES: u32 = 64;
/// Units per cube of the sum-of-squares pass.
const SQUARE_UNITS: u32 = 256;

/// `partials[c]` = the sum of squares of cube `c`'s strided share of `grad`.
#[cube(launch)]
fn square_partials(grad: &Tensor<f32>, partials: &mut Tensor<f32>) {
    let unit = UNIT_POS as usize;
    let units = SQUARE_UNITS as usize;
    let stride = (SQUARE_CUBES * SQUARE_UNITS) as usize;
    let mut total = 0.0f32;
    let mut i = CUBE_POS * units + unit;
    while i < grad.len() {
        let g = grad[i];
        total += g * g;
        i += stride;
    }
    let mut shared = SharedMemory::<f32>::new(SQUARE_UNITS as usize);
    let cube_total = cube_sum(&mut shared, total, unit, SQUARE_UNITS as usize);
    if unit == 0 {
        partials[CUBE_POS] = cube_total;
    }
}

/// One vector of `N` elements a unit, with `decay = 1 - lr * weight_decay` and the bias
/// corrections `1 - beta^t`; `clip` scales the gradient by
/// `min(1, clip_norm / (sqrt(sum of partials) + tiny))` first.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn adamw_update<N: Size>(
    param: &Tensor<Vector<f32, N>>,
    grad: &Tensor<Vector<f32, N>>,
    moment_1: &Tensor<Vector<f32, N>>,
    moment_2: &Tensor<Vector<f32, N>>,
    partials: &Tensor<f32>,
    new_param: &mut Tensor<Vector<f32, N>>,
    new_moment_1: &mut Tensor<Vector<f32, N>>,
    new_moment_2: &mut Tensor<Vector<f32, N>>,
    lr: f32,
    decay: f32,
    beta_1: f32,
    beta_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    clip_norm: f32,
    #[comptime] clip: bool,
) {
    let mut coefficient = 1.0f32;
    if clip {
        // Before any unit leaves: the whole cube meets in the tree.
        let unit = UNIT_POS as usize;
        let mut partial = 0.0f32;
        if unit < SQUARE_CUBES as usize {
            partial = partials[unit];
        }
        let mut shared = SharedMemory::<f32>::new(SQUARE_CUBES as usize);
        let norm = f32::sqrt(cube_sum(&mut shared, partial, unit, SQUARE_CUBES as usize)) + f32::MIN_POSITIVE;
        coefficient = f32::min(clip_norm / norm, 1.0);
    }
    let i = ABSOLUTE_POS;
    if i >= new_param.len() {
        terminate!();
    }
    let g = grad[i] * Vector::<f32, N>::new(coefficient);
    let one = Vector::<f32, N>::new(1.0);
    let (b1, b2) = (Vector::<f32, N>::new(beta_1), Vector::<f32, N>::new(beta_2));
    let m = moment_1[i] * b1 + g * (one - b1);
    let v = moment_2[i] * b2 + g * g * (one - b2);
    let m_hat = m / Vector::<f32, N>::new(correction_1);
    let v_hat = v / Vector::<f32, N>::new(correction_2);
    let delta = m_hat / (Vector::<f32, N>::sqrt(v_hat) + Vector::<f32, N>::new(epsilon));
    new_param[i] = param[i] * Vector::<f32, N>::new(decay) - delta * Vector::<f32, N>::new(lr);
    new_moment_1[i] = m;
    new_moment_2[i] = v;
}

/// Launches [`adamw_update`] on flat f32 tensors of one length, after [`square_partials`] when
/// `step.clip_norm` is set. Returns the new parameter and moments.
pub(crate) fn launch_adamw<R: CubeRuntime>(
    param: CubeTensor<R>,
    grad: CubeTensor<R>,
    moment_1: CubeTensor<R>,
    moment_2: CubeTensor<R>,
    step: &AdamWStep,
) -> [CubeTensor<R>; 3] {
    let [param, grad, moment_1, moment_2] = [param, grad, moment_1, moment_2].map(into_contiguous);
    let elements = param.meta.num_elements();
    let empty = || {
        empty_device_contiguous_dtype(param.client.clone(), param.device.clone(), Shape::new([elements]), DType::F32)
    };
    let outputs = [empty(), empty(), empty()];
    if elements == 0 {
        return outputs;
    }
    // Without clipping the update never reads the partials; the gradient stands in.
    let partials = match step.clip_norm {
        Some(_) => {
            let partials = empty_device_contiguous_dtype(
                param.client.clone(),
                param.device.clone(),
                Shape::new([SQUARE_CUBES as usize]),
                DType::F32,
            );
            square_partials::launch(
                &param.client,
                CubeCount::Static(SQUARE_CUBES, 1, 1),
                CubeDim::new_1d(SQUARE_UNITS),
                grad.clone().into_tensor_arg(),
                partials.clone().into_tensor_arg(),
            );
            partials
        }
        None => grad.clone(),
    };
    let vector = flat_vector_size(&[&param, &grad, &moment_1, &moment_2, &outputs[0], &outputs[1], &outputs[2]]);
    let (c1, c2) = step.bias_corrections();
    adamw_update::launch(
        &param.client,
        row_cubes(elements / vector),
        CubeDim::new_1d(ROW_UNITS),
        vector,
        param.clone().into_tensor_arg(),
        grad.into_tensor_arg(),
        moment_1.into_tensor_arg(),
        moment_2.into_tensor_arg(),
        partials.into_tensor_arg(),
        outputs[0].clone().into_tensor_arg(),
        outputs[1].clone().into_tensor_arg(),
        outputs[2].clone().into_tensor_arg(),
        step.lr as f32,
        (1.0 - step.lr * step.weight_decay as f64) as f32,
        step.beta_1,
        step.beta_2,
        c1,
        c2,
        step.epsilon,
        step.clip_norm.unwrap_or(f32::INFINITY),
        step.clip_norm.is_some(),
    );
    outputs
}
