//! The dense weight gradient `x^T grad` split over row blocks (split-K): the blocks are the
//! segments of one grouped weight-gradient launch, whose `[parts, a, b]` partial products one
//! elementwise kernel sums in f32. Unsplit, an `a x b` output has a handful of tiles (8 for
//! 512 x 512 on the Hopper kernel), each walking every row while most of the GPU idles: 0.35 ms
//! for `small`'s 16k-row products on the H200, against 0.12 ms split.

use burn::tensor::Shape;
use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::cube::launch::{ROW_UNITS, flat_vector_size, row_cubes};

/// Tiles the blocks aim at: about two waves on a 132-SM GPU.
const TARGET_TILES: usize = 264;
/// The fewest rows a block keeps.
const MIN_PART_ROWS: usize = 256;

/// The row blocks of a dense weight gradient over `rows` rows with an `a x b` output: one block
/// when the output has tiles enough (or the rows are few).
pub(crate) fn dense_weight_grad_parts(rows: usize, a: usize, b: usize) -> Vec<usize> {
    let tiles = a.div_ceil(128) * b.div_ceil(128);
    let parts = TARGET_TILES.div_ceil(tiles).min(rows / MIN_PART_ROWS).max(1);
    let per_part = rows.div_ceil(parts);
    (0..parts).map(|i| per_part.min(rows.saturating_sub(i * per_part))).filter(|&r| r > 0).collect()
}

/// `x^T grad` `[a, b]` as the grouped weight gradient over the row blocks `parts` and the
/// sum of its partial products (no sum for one block).
pub(crate) fn dense_weight_grad<R: CubeRuntime>(
    x: CubeTensor<R>,
    grad: CubeTensor<R>,
    parts: &[usize],
) -> CubeTensor<R> {
    let partials = super::grouped_gemm_weight_grad(x, grad, parts);
    if parts.len() == 1 {
        let [a, b] = [partials.meta.shape()[1], partials.meta.shape()[2]];
        return burn_cubecl::ops::reshape(partials, Shape::new([a, b]));
    }
    launch_sum_parts(partials)
}

/// `out[i] = sum over p of partials[p, i]`, accumulated in f32; a vector of `N` a unit.
#[cube(launch)]
fn sum_parts<F: Float, N: Size>(
    partials: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    let n = out.len();
    if i >= n {
        terminate!();
    }
    let parts = partials.len() / n;
    let mut total = Vector::<f32, N>::new(0.0);
    for p in 0..parts {
        total += Vector::<f32, N>::cast_from(partials[p * n + i]);
    }
    out[i] = Vector::<F, N>::cast_from(total);
}

/// Sums the contiguous `[parts, a, b]` `partials` over the parts: `[a, b]` in their dtype.
pub(crate) fn launch_sum_parts<R: CubeRuntime>(partials: CubeTensor<R>) -> CubeTensor<R> {
    let shape = partials.meta.shape().clone();
    let (a, b) = (shape[1], shape[2]);
    let out = empty_device_contiguous_dtype(
        partials.client.clone(),
        partials.device.clone(),
        burn::tensor::Shape::new([a, b]),
        partials.dtype,
    );
    let elements = a * b;
    if elements == 0 {
        return out;
    }
    let vector = flat_vector_size(&[&out, &partials]);
    sum_parts::launch(
        &partials.client,
        row_cubes(elements / vector),
        CubeDim::new_1d(ROW_UNITS),
        vector,
        partials.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        partials.dtype.into(),
    );
    out
}
