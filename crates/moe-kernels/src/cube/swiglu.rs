//! The SwiGLU's activation `silu(gate) * up` and its backward, one elementwise kernel each.
//! burn's `silu` is `x * sigmoid(x)` with the sigmoid as eight operations (a cast to f32, two
//! exponentials, a logarithm, ...), each a host dispatch through burn-fusion, and autodiff
//! tracks them all; these read each operand once and compute in f32.

use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::launch::ROW_UNITS;
use super::launch::{row_cubes, row_vector_size};

/// `sigmoid(g)` in f32.
#[cube]
fn sigmoid<N: Size>(g: Vector<f32, N>) -> Vector<f32, N> {
    let one = Vector::<f32, N>::new(1.0);
    one / (one + Vector::<f32, N>::exp(Vector::<f32, N>::new(0.0) - g))
}

/// `out = silu(gate) * up`, one vector of `N` elements a unit (contiguous operands).
#[cube(launch)]
fn silu_mul<F: Float, N: Size>(
    gate: &Tensor<Vector<F, N>>,
    up: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let g = Vector::<f32, N>::cast_from(gate[i]);
    let u = Vector::<f32, N>::cast_from(up[i]);
    out[i] = Vector::<F, N>::cast_from(g * sigmoid(g) * u);
}

/// The gradients of [`silu_mul`] from the output's `grad`: `grad up silu'(gate)` with
/// `silu'(g) = s (1 + g (1 - s))`, `s = sigmoid(g)`, and `grad silu(gate)`.
#[cube(launch)]
fn silu_mul_grad<F: Float, N: Size>(
    gate: &Tensor<Vector<F, N>>,
    up: &Tensor<Vector<F, N>>,
    grad: &Tensor<Vector<F, N>>,
    grad_gate: &mut Tensor<Vector<F, N>>,
    grad_up: &mut Tensor<Vector<F, N>>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= grad_gate.len() {
        terminate!();
    }
    let g = Vector::<f32, N>::cast_from(gate[i]);
    let u = Vector::<f32, N>::cast_from(up[i]);
    let dy = Vector::<f32, N>::cast_from(grad[i]);
    let s = sigmoid(g);
    let one = Vector::<f32, N>::new(1.0);
    grad_gate[i] = Vector::<F, N>::cast_from(dy * u * s * (one + g * (one - s)));
    grad_up[i] = Vector::<F, N>::cast_from(dy * g * s);
}

/// An empty contiguous tensor shaped and typed as `like`.
fn empty_like<R: CubeRuntime>(like: &CubeTensor<R>) -> CubeTensor<R> {
    let shape = like.meta.shape().clone();
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, like.dtype)
}

/// Launches [`silu_mul`] on `gate` and `up` (`[n, h]`, one float type).
pub(crate) fn launch_silu_mul<R: CubeRuntime>(gate: CubeTensor<R>, up: CubeTensor<R>) -> CubeTensor<R> {
    let (gate, up) = (into_contiguous(gate), into_contiguous(up));
    let out = empty_like(&gate);
    let elements = out.meta.num_elements();
    if elements == 0 {
        return out;
    }
    let vector = row_vector_size(&[&gate, &up, &out]);
    silu_mul::launch(
        &gate.client,
        row_cubes(elements / vector),
        CubeDim::new_1d(ROW_UNITS),
        vector,
        gate.clone().into_tensor_arg(),
        up.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        gate.dtype.into(),
    );
    out
}

/// Launches [`silu_mul_grad`]: (gradient of `gate`, gradient of `up`).
pub(crate) fn launch_silu_mul_grad<R: CubeRuntime>(
    gate: CubeTensor<R>,
    up: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (gate, up, grad) = (into_contiguous(gate), into_contiguous(up), into_contiguous(grad));
    let (grad_gate, grad_up) = (empty_like(&gate), empty_like(&gate));
    let elements = grad_gate.meta.num_elements();
    if elements == 0 {
        return (grad_gate, grad_up);
    }
    let vector = row_vector_size(&[&gate, &up, &grad, &grad_gate]);
    silu_mul_grad::launch(
        &gate.client,
        row_cubes(elements / vector),
        CubeDim::new_1d(ROW_UNITS),
        vector,
        gate.clone().into_tensor_arg(),
        up.into_tensor_arg(),
        grad.into_tensor_arg(),
        grad_gate.clone().into_tensor_arg(),
        grad_up.clone().into_tensor_arg(),
        gate.dtype.into(),
    );
    (grad_gate, grad_up)
}
