//! Rotary position embedding of `x` `[b, h, l, r]` by per-position `cos` and `sin` `[l, r / 2]`:
//! what [`crate::MoeBackend::moe_rotary`] must match. Pairs are `(2i, 2i + 1)` (`interleave`)
//! or `(i, i + r / 2)`; pair `i` at position `p` turns by the angle whose cosine and sine are
//! `cos[p, i]` and `sin[p, i]`. The rotation is linear, so its backward is the same rotation
//! with `-sin`.
//!
//! On tensor ops this is two slices, four products, two sums and a concatenation forward (and
//! as many back) per application, and a copy when `x` is a transposed view; the model applies
//! it to every block's queries and keys, so the cube backends run it as one kernel that reads
//! `x` through its strides.

use burn::tensor::{Tensor, backend::Backend};

/// The rotation on tensor ops, in `x`'s dtype.
pub fn rotary<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 2>, sin: Tensor<B, 2>, interleave: bool) -> Tensor<B, 4> {
    let [b, h, l, r] = x.dims();
    let half = r / 2;
    let dtype = x.dtype();
    let cos = cos.reshape([1, 1, l, half]).cast(dtype);
    let sin = sin.reshape([1, 1, l, half]).cast(dtype);
    let rotate = |x0: Tensor<B, 4>, x1: Tensor<B, 4>| {
        (x0.clone() * cos.clone() - x1.clone() * sin.clone(), x0 * sin.clone() + x1 * cos.clone())
    };
    if interleave {
        let pairs = x.reshape([b, h, l, half, 2]);
        let x0 = pairs.clone().narrow(4, 0, 1).reshape([b, h, l, half]);
        let x1 = pairs.narrow(4, 1, 1).reshape([b, h, l, half]);
        let (y0, y1) = rotate(x0, x1);
        Tensor::stack::<5>(vec![y0, y1], 4).reshape([b, h, l, r])
    } else {
        let (y0, y1) = rotate(x.clone().narrow(3, 0, half), x.narrow(3, half, half));
        Tensor::cat(vec![y0, y1], 3)
    }
}
