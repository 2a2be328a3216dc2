//! Launch geometry shared by the row kernels: vector widths, cube counts, host tables.

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::CubeCount;

/// Units per cube of the row kernels (one output element or vector each).
pub(crate) const ROW_UNITS: u32 = 256;

/// Elements per vector of the row kernels over `[rows, width]` tensors: the most (up to 16
/// bytes) that divides every tensor's width and row stride, with contiguous rows and starts
/// on a vector boundary; 1 otherwise.
pub(crate) fn row_vector_size<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> usize {
    let bytes = tensors[0].dtype.size();
    [16 / bytes, 8 / bytes, 4 / bytes, 2 / bytes]
        .into_iter()
        .filter(|&v| v > 1)
        .find(|&v| {
            tensors.iter().all(|t| {
                let (shape, strides) = (t.meta.shape(), t.meta.strides());
                strides[1] == 1
                    && shape[1].is_multiple_of(v)
                    && strides[0].is_multiple_of(v)
                    && t.handle.offset_start.unwrap_or(0).is_multiple_of((v * bytes) as u64)
            })
        })
        .unwrap_or(1)
}

/// Elements per vector of contiguous `tensors` read as flat arrays of the first one's length
/// (or a multiple of it): the most (up to 16 bytes) that divides that length and every start.
pub(crate) fn flat_vector_size<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> usize {
    let bytes = tensors[0].dtype.size();
    let elements = tensors[0].meta.num_elements();
    [16 / bytes, 8 / bytes, 4 / bytes, 2 / bytes]
        .into_iter()
        .filter(|&v| v > 1)
        .find(|&v| {
            elements.is_multiple_of(v)
                && tensors.iter().all(|t| t.handle.offset_start.unwrap_or(0).is_multiple_of((v * bytes) as u64))
        })
        .unwrap_or(1)
}

/// Cubes for one unit per element of the row kernels.
pub(crate) fn row_cubes(elements: usize) -> CubeCount {
    cube_grid(elements.div_ceil(ROW_UNITS as usize) as u32)
}

/// `cubes` cubes, numbered `y * CUBE_COUNT_X + x`: a 2-D grid past the 65535 cubes a wgpu
/// dimension holds.
pub(crate) fn cube_grid(cubes: u32) -> CubeCount {
    let x = cubes.min(32768);
    CubeCount::Static(x, cubes.div_ceil(x), 1)
}

/// A small host table uploaded as a `u32` tensor on `like`'s device.
pub(crate) fn u32_tensor<R: CubeRuntime>(like: &CubeTensor<R>, values: &[u32]) -> CubeTensor<R> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let handle = like.client.create_from_slice(&bytes);
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), Shape::new([values.len()]), handle, DType::U32)
}
