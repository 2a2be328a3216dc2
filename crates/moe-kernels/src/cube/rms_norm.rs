//! RMSNorm forward and backward, one cube per row (the contract is `crate::rms_norm`): the
//! units stride over the row (coalesced), sum in f32 and meet in a shared-memory tree; the
//! second pass writes the row. The backward also writes `grad * x_hat` in f32, whose column
//! sum (a burn reduction after the launch) is `gamma`'s gradient.

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::launch::cube_grid;
use super::reduce::cube_sum;

/// Units per row.
const NORM_UNITS: u32 = 128;

/// One row of `out = x / sqrt(mean(x^2) + epsilon) * gamma` a cube (contiguous `x`, `out`).
#[cube(launch)]
fn rms_norm_rows<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<f32>,
    out: &mut Tensor<F>,
    epsilon: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row >= x.shape(0) {
        terminate!();
    }
    let d = x.shape(1);
    let unit = UNIT_POS as usize;
    let base = row * d;
    let mut shared = SharedMemory::<f32>::new(NORM_UNITS as usize);
    let mut sum = 0.0f32;
    let mut i = unit;
    while i < d {
        let v = f32::cast_from(x[base + i]);
        sum += v * v;
        i += NORM_UNITS as usize;
    }
    let total = cube_sum(&mut shared, sum, unit, NORM_UNITS as usize);
    let rms = f32::sqrt(total / f32::cast_from(d) + epsilon);
    let mut j = unit;
    while j < d {
        out[base + j] = F::cast_from(f32::cast_from(x[base + j]) / rms * gamma[j]);
        j += NORM_UNITS as usize;
    }
}

/// The backward of [`rms_norm_rows`], a row a cube: `grad_x = r (u - x_hat mean(u x_hat))` with
/// `u = grad gamma`, `r = 1 / sqrt(mean(x^2) + epsilon)`, `x_hat = x r`; and
/// `grad_normed = grad x_hat` (f32).
#[cube(launch)]
fn rms_norm_grad_rows<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<f32>,
    grad: &Tensor<F>,
    grad_x: &mut Tensor<F>,
    grad_normed: &mut Tensor<f32>,
    epsilon: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row >= x.shape(0) {
        terminate!();
    }
    let d = x.shape(1);
    let unit = UNIT_POS as usize;
    let base = row * d;
    let mut squares = SharedMemory::<f32>::new(NORM_UNITS as usize);
    let mut dots = SharedMemory::<f32>::new(NORM_UNITS as usize);
    let mut sum = 0.0f32;
    let mut dot = 0.0f32;
    let mut i = unit;
    while i < d {
        let v = f32::cast_from(x[base + i]);
        sum += v * v;
        dot += f32::cast_from(grad[base + i]) * gamma[i] * v;
        i += NORM_UNITS as usize;
    }
    let total = cube_sum(&mut squares, sum, unit, NORM_UNITS as usize);
    let total_dot = cube_sum(&mut dots, dot, unit, NORM_UNITS as usize);
    let r = 1.0 / f32::sqrt(total / f32::cast_from(d) + epsilon);
    // mean(u x_hat) = r * sum(u x) / d
    let mean_u_normed = r * total_dot / f32::cast_from(d);
    let mut j = unit;
    while j < d {
        let normed = f32::cast_from(x[base + j]) * r;
        let g = f32::cast_from(grad[base + j]);
        grad_x[base + j] = F::cast_from(r * (g * gamma[j] - normed * mean_u_normed));
        grad_normed[base + j] = g * normed;
        j += NORM_UNITS as usize;
    }
}

/// Launches [`rms_norm_rows`] on `x` `[rows, d]` and `gamma` `[d]` (f32).
pub(crate) fn launch_rms_norm<R: CubeRuntime>(x: CubeTensor<R>, gamma: CubeTensor<R>, epsilon: f64) -> CubeTensor<R> {
    let (x, gamma) = (into_contiguous(x), into_contiguous(gamma));
    let shape = x.meta.shape().clone();
    let out = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), shape.clone(), x.dtype);
    if shape.num_elements() == 0 {
        return out;
    }
    rms_norm_rows::launch(
        &x.client,
        cube_grid(shape[0] as u32),
        CubeDim::new_1d(NORM_UNITS),
        x.clone().into_tensor_arg(),
        gamma.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        epsilon as f32,
        x.dtype.into(),
    );
    out
}

/// Launches [`rms_norm_grad_rows`]: (`x`'s gradient in `x`'s dtype, `grad * x_hat` in f32).
pub(crate) fn launch_rms_norm_grad<R: CubeRuntime>(
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    grad: CubeTensor<R>,
    epsilon: f64,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (x, gamma, grad) = (into_contiguous(x), into_contiguous(gamma), into_contiguous(grad));
    let shape = x.meta.shape().clone();
    let empty = |dtype: DType| empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), shape.clone(), dtype);
    let (grad_x, grad_normed) = (empty(x.dtype), empty(DType::F32));
    if shape.num_elements() == 0 {
        return (grad_x, grad_normed);
    }
    rms_norm_grad_rows::launch(
        &x.client,
        cube_grid(shape[0] as u32),
        CubeDim::new_1d(NORM_UNITS),
        x.clone().into_tensor_arg(),
        gamma.into_tensor_arg(),
        grad.into_tensor_arg(),
        grad_x.clone().into_tensor_arg(),
        grad_normed.clone().into_tensor_arg(),
        epsilon as f32,
        x.dtype.into(),
    );
    (grad_x, grad_normed)
}
