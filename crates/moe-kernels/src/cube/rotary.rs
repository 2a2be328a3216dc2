//! The rotary embedding as one kernel (the contract is `crate::rotary`): a unit per rotated
//! pair reads both entries of `x` through its strides (a transposed or sliced view costs no
//! copy), turns them in f32 and writes the contiguous `[b, h, l, r]` output.

use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::launch::ROW_UNITS;
use super::launch::row_cubes;

/// `out[.., 2i], out[.., 2i + 1]` (`interleave`) or `out[.., i], out[.., i + r/2]` from the same
/// entries of `x` turned by `cos[p, i]`, `sin[p, i]` at position `p`.
#[cube(launch)]
fn rotary_pairs<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<f32>,
    sin: &Tensor<f32>,
    out: &mut Tensor<F>,
    #[comptime] interleave: bool,
    #[define(F)] _dtype: StorageType,
) {
    let pair = ABSOLUTE_POS;
    let (heads, len, r) = (out.shape(1), out.shape(2), out.shape(3));
    let half = r / 2;
    if pair >= out.len() / 2 {
        terminate!();
    }
    let i = pair % half;
    let p = (pair / half) % len;
    let head = (pair / (half * len)) % heads;
    let batch = pair / (half * len * heads);
    let (first, second) = if interleave { (2 * i, 2 * i + 1) } else { (i, i + half) };
    let row = batch * x.stride(0) + head * x.stride(1) + p * x.stride(2);
    let x0 = f32::cast_from(x[row + first * x.stride(3)]);
    let x1 = f32::cast_from(x[row + second * x.stride(3)]);
    let (c, s) = (cos[p * half + i], sin[p * half + i]);
    let base = ((batch * heads + head) * len + p) * r;
    out[base + first] = F::cast_from(x0 * c - x1 * s);
    out[base + second] = F::cast_from(x0 * s + x1 * c);
}

/// Launches [`rotary_pairs`] on `x` `[b, h, l, r]` (`r` even) and `cos`, `sin` `[l, r / 2]` (f32).
pub(crate) fn launch_rotary<R: CubeRuntime>(
    x: CubeTensor<R>,
    cos: CubeTensor<R>,
    sin: CubeTensor<R>,
    interleave: bool,
) -> CubeTensor<R> {
    let (cos, sin) = (into_contiguous(cos), into_contiguous(sin));
    let shape = x.meta.shape().clone();
    let out = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), shape.clone(), x.dtype);
    let pairs = shape.num_elements() / 2;
    if pairs == 0 {
        return out;
    }
    rotary_pairs::launch(
        &x.client,
        row_cubes(pairs),
        CubeDim::new_1d(ROW_UNITS),
        x.clone().into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        interleave,
        x.dtype.into(),
    );
    out
}
