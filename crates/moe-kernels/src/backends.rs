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
    fn layout() -> DispatchLayout {
        DispatchLayout::Segments
    }
}

#[cfg(feature = "flex")]
impl MoeBackend for burn::backend::Flex {
    fn layout() -> DispatchLayout {
        DispatchLayout::Segments
    }
}

// burn-cuda and burn-wgpu (cube backends, with or without fusion) have their own kernels: see
// `crate::cube`.
