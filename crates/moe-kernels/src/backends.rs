//! The backends that use the portable default. A backend with its own kernels gets its own
//! `impl` with overridden methods instead of a line here.

use crate::MoeBackend;

#[cfg(feature = "ndarray")]
impl<E, I, Q> MoeBackend for burn::backend::NdArray<E, I, Q>
where
    E: burn::backend::ndarray::FloatNdArrayElement,
    I: burn::backend::ndarray::IntNdArrayElement,
    Q: burn::backend::ndarray::QuantElement,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<E>>
        + From<burn::backend::ndarray::SharedArray<I>>,
{
}

#[cfg(feature = "flex")]
impl MoeBackend for burn::backend::Flex {}

impl<B: MoeBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> MoeBackend
    for burn::backend::Autodiff<B, C>
{
}

#[cfg(feature = "cuda")]
impl<F: burn::tensor::FloatElement, I: burn::tensor::IntElement> MoeBackend
    for burn::backend::Cuda<F, I>
{
}

#[cfg(feature = "wgpu")]
impl<F: burn::tensor::FloatElement, I: burn::tensor::IntElement, BT: burn::tensor::BoolElement>
    MoeBackend for burn::backend::Wgpu<F, I, BT>
{
}
