//! The backends that use the portable default. A backend with its own kernels gets its own
//! `impl` with overridden methods instead of a line here.

use crate::{DispatchLayout, MoeBackend};

#[cfg(feature = "ndarray")]
impl<E, I, Q> MoeBackend for burn::backend::NdArray<E, I, Q>
where
    E: burn::backend::ndarray::FloatNdArrayElement,
    I: burn::backend::ndarray::IntNdArrayElement,
    Q: burn::backend::ndarray::QuantElement,
    burn::backend::ndarray::NdArrayTensor:
        From<burn::backend::ndarray::SharedArray<E>> + From<burn::backend::ndarray::SharedArray<I>>,
{
    const LAYOUT: DispatchLayout = DispatchLayout::Segments;
}

#[cfg(feature = "flex")]
impl MoeBackend for burn::backend::Flex {
    const LAYOUT: DispatchLayout = DispatchLayout::Segments;
}

impl<B: MoeBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> MoeBackend
    for burn::backend::Autodiff<B, C>
{
    // Padded under autodiff, whatever the inner backend: burn differentiates `narrow` by
    // writing each slice's gradient into a zero tensor of the full shape, so the per-segment
    // matmuls would cost O(E * N * d) in the backward (12.5 s against 1.9 s on NdArray for
    // E 64, K 6, T 4096).
    const LAYOUT: DispatchLayout = DispatchLayout::Padded;
}

// burn-cuda does not re-export cubecl's element traits; the element types it supports are
// listed instead.
#[cfg(feature = "cuda")]
impl MoeBackend for burn::backend::Cuda<f32, i32> {}
#[cfg(feature = "cuda")]
impl MoeBackend for burn::backend::Cuda<half::f16, i32> {}
#[cfg(feature = "cuda")]
impl MoeBackend for burn::backend::Cuda<half::bf16, i32> {}

#[cfg(feature = "wgpu")]
impl<F, I, BT> MoeBackend for burn::backend::Wgpu<F, I, BT>
where
    F: burn::backend::wgpu::FloatElement,
    I: burn::backend::wgpu::IntElement,
    BT: burn::backend::wgpu::BoolElement,
{
}
