//! The causal softmax of the attention's scores and its backward, one cube per row of
//! `[sequences * l, l]` scores (row `r` is query `r % l` of its sequence). Each kernel reads
//! the row in the scores' dtype once from memory (later passes hit the cache), works in f32,
//! and writes the row in the scores' dtype: the scale, the mask, the max, the exponentials,
//! the sum and the casts that were six or more burn ops, each a pass over `[b h l, l]` f32.

use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::launch::cube_grid;
use super::reduce::{cube_max, cube_sum};

/// Units per row.
const SOFTMAX_UNITS: u32 = 128;

/// The maximum of `scale * scores` over the keys the query sees (`0..=query`); every unit of
/// the cube gets it.
#[cube]
fn row_max<F: Float>(scores: &Tensor<F>, base: usize, query: usize, scale: f32, unit: usize) -> f32 {
    let mut maxima = SharedMemory::<f32>::new(SOFTMAX_UNITS as usize);
    // Key 0 is visible to every query: a start that needs no sentinel.
    let mut local = f32::cast_from(scores[base]) * scale;
    let mut i = unit;
    while i <= query {
        local = f32::max(local, f32::cast_from(scores[base + i]) * scale);
        i += SOFTMAX_UNITS as usize;
    }
    cube_max(&mut maxima, local, unit, SOFTMAX_UNITS as usize)
}

/// The sum of `exp(scale * scores - max)` over the keys `0..=query`; every unit gets it.
#[cube]
fn row_exp_sum<F: Float>(scores: &Tensor<F>, base: usize, query: usize, scale: f32, max: f32, unit: usize) -> f32 {
    let mut sums = SharedMemory::<f32>::new(SOFTMAX_UNITS as usize);
    let mut local = 0.0f32;
    let mut i = unit;
    while i <= query {
        local += f32::exp(f32::cast_from(scores[base + i]) * scale - max);
        i += SOFTMAX_UNITS as usize;
    }
    cube_sum(&mut sums, local, unit, SOFTMAX_UNITS as usize)
}

/// `probs = softmax(scale * scores)` over the keys `0..=query`, 0 past them.
#[cube(launch)]
fn causal_softmax_rows<F: Float>(
    scores: &Tensor<F>,
    probs: &mut Tensor<F>,
    scale: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row >= scores.shape(0) {
        terminate!();
    }
    let l = scores.shape(1);
    let base = row * l;
    let query = row % l;
    let unit = UNIT_POS as usize;
    let max = row_max::<F>(scores, base, query, scale, unit);
    let inverse = 1.0 / row_exp_sum::<F>(scores, base, query, scale, max, unit);
    let mut j = unit;
    while j < l {
        let mut p = 0.0f32;
        if j <= query {
            p = f32::exp(f32::cast_from(scores[base + j]) * scale - max) * inverse;
        }
        probs[base + j] = F::cast_from(p);
        j += SOFTMAX_UNITS as usize;
    }
}

/// The backward from the same `scores` and the probabilities' gradient `grad_probs`: the
/// probabilities again (`P`, for the values' gradient) and the raw scores' gradient
/// `scale * P (dP - sum(P dP))`.
#[cube(launch)]
fn causal_softmax_grad_rows<F: Float>(
    scores: &Tensor<F>,
    grad_probs: &Tensor<F>,
    probs: &mut Tensor<F>,
    grad_scores: &mut Tensor<F>,
    scale: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row >= scores.shape(0) {
        terminate!();
    }
    let l = scores.shape(1);
    let base = row * l;
    let query = row % l;
    let unit = UNIT_POS as usize;
    let max = row_max::<F>(scores, base, query, scale, unit);
    let inverse = 1.0 / row_exp_sum::<F>(scores, base, query, scale, max, unit);
    let mut dots = SharedMemory::<f32>::new(SOFTMAX_UNITS as usize);
    let mut local_dot = 0.0f32;
    let mut i = unit;
    while i <= query {
        let p = f32::exp(f32::cast_from(scores[base + i]) * scale - max) * inverse;
        local_dot += p * f32::cast_from(grad_probs[base + i]);
        i += SOFTMAX_UNITS as usize;
    }
    let dot = cube_sum(&mut dots, local_dot, unit, SOFTMAX_UNITS as usize);
    let mut j = unit;
    while j < l {
        let mut p = 0.0f32;
        let mut g = 0.0f32;
        if j <= query {
            p = f32::exp(f32::cast_from(scores[base + j]) * scale - max) * inverse;
            g = p * (f32::cast_from(grad_probs[base + j]) - dot) * scale;
        }
        probs[base + j] = F::cast_from(p);
        grad_scores[base + j] = F::cast_from(g);
        j += SOFTMAX_UNITS as usize;
    }
}

/// Launches [`causal_softmax_rows`] on `scores` `[sequences * l, l]`.
pub(crate) fn launch_causal_softmax<R: CubeRuntime>(scores: CubeTensor<R>, scale: f64) -> CubeTensor<R> {
    let scores = into_contiguous(scores);
    let shape = scores.meta.shape().clone();
    let probs =
        empty_device_contiguous_dtype(scores.client.clone(), scores.device.clone(), shape.clone(), scores.dtype);
    if shape.num_elements() == 0 {
        return probs;
    }
    causal_softmax_rows::launch(
        &scores.client,
        cube_grid(shape[0] as u32),
        CubeDim::new_1d(SOFTMAX_UNITS),
        scores.clone().into_tensor_arg(),
        probs.clone().into_tensor_arg(),
        scale as f32,
        scores.dtype.into(),
    );
    probs
}

/// Launches [`causal_softmax_grad_rows`]: (the probabilities, the scores' gradient), both in
/// the scores' dtype.
pub(crate) fn launch_causal_softmax_grad<R: CubeRuntime>(
    scores: CubeTensor<R>,
    grad_probs: CubeTensor<R>,
    scale: f64,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (scores, grad_probs) = (into_contiguous(scores), into_contiguous(grad_probs));
    let shape = scores.meta.shape().clone();
    let empty =
        || empty_device_contiguous_dtype(scores.client.clone(), scores.device.clone(), shape.clone(), scores.dtype);
    let (probs, grad_scores) = (empty(), empty());
    if shape.num_elements() == 0 {
        return (probs, grad_scores);
    }
    causal_softmax_grad_rows::launch(
        &scores.client,
        cube_grid(shape[0] as u32),
        CubeDim::new_1d(SOFTMAX_UNITS),
        scores.clone().into_tensor_arg(),
        grad_probs.into_tensor_arg(),
        probs.clone().into_tensor_arg(),
        grad_scores.clone().into_tensor_arg(),
        scale as f32,
        scores.dtype.into(),
    );
    (probs, grad_scores)
}
