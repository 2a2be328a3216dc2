//! The grouped GEMM: every expert's segment of the sorted rows in one launch, the segments
//! packed back to back (no row padded), each launch walking a host-built table of row tiles.
//! Three products cover training: rows x weights (forward), rows x weights^T (the row
//! gradient, the same kernel on a transposed view) and rows^T x gradient per segment (the
//! weight gradient).
//!
//! One place picks the kernel of a launch, [`GemmPath`]: Hopper's `wgmma` kernel
//! (`wgmma.rs`, feature `cuda`) where it runs, the pipelined tensor-core kernel
//! (`pipelined.rs`) for aligned half-precision operands on devices with asynchronous copies,
//! and the general kernel (`general.rs`: any widths, a tensor-core or a scalar tile product)
//! for the rest. `split_k.rs` splits a dense weight gradient into row blocks and sums them.

mod general;
mod pipelined;
pub(super) mod split_k;
#[cfg(feature = "cuda")]
mod wgmma;
#[cfg(feature = "cuda")]
mod wgmma_source;

#[cfg(feature = "cuda")]
pub use wgmma::{launch_rows_wgmma, launch_weight_grad_wgmma};

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::{StorageType, features::MmaConfig};
use cubecl::prelude::{ComputeClient, CubeCount, CubeDim};

use general::{MODE_ROWS, MODE_WEIGHTS, Tiling, grouped_gemm};
use pipelined::{CHUNK, Pipeline, grouped_gemm_pipelined};

use super::MoeCubeKernels;
use super::flush::hand_on_launches;
use super::launch::u32_tensor;
use super::settings::settings;

/// The kernel that runs one grouped product.
enum GemmPath {
    /// Hopper's `wgmma` kernel, with what its launch needs.
    #[cfg(feature = "cuda")]
    Wgmma(wgmma::WgmmaLaunch),
    /// The pipelined tensor-core kernel.
    Pipelined(Pipeline),
    /// The general kernel on this tiling (tensor-core or scalar tile product).
    General(Tiling),
}

impl GemmPath {
    /// The path of a product of `mode` on `lhs` and `rhs` (`[E, a, b]` weights in `MODE_ROWS`,
    /// the `[rows, b]` gradient in `MODE_WEIGHTS`): `wgmma` where it runs (and `wgmma` is set),
    /// then the pipelined kernel where the layouts and the device allow, then the general one;
    /// `cmma` picks the tensor-core tile product of the latter two.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn choose<R: CubeRuntime>(
        mode: u32,
        lhs: &CubeTensor<R>,
        rhs: &CubeTensor<R>,
        segment_rows: &[usize],
        cmma: bool,
        wgmma: bool,
    ) -> Self {
        #[cfg(feature = "cuda")]
        if wgmma && let Some(launch) = wgmma::WgmmaLaunch::new(mode, lhs, rhs, segment_rows) {
            return Self::Wgmma(launch);
        }
        let tiling = tiling(cmma);
        let (aligned, b_depth_contiguous, out_width) = if mode == MODE_ROWS {
            let RowsLayout { aligned, b_depth_contiguous } = rows_layout(lhs, rhs);
            (aligned, b_depth_contiguous, rhs.meta.shape()[2])
        } else {
            (weight_grad_aligned(lhs, rhs), false, rhs.meta.shape()[1])
        };
        match pipeline([lhs, rhs], tiling, aligned, mode, b_depth_contiguous, out_width) {
            Some(pipe) => Self::Pipelined(pipe),
            None => Self::General(tiling),
        }
    }
}

/// The backends' rows-times-weights product `[rows, a] x [E, a, b] -> [rows, b]`, segment by
/// segment, on the path [`GemmPath::choose`] picks.
pub(super) fn grouped_gemm_rows<R: CubeRuntime>(
    rows: CubeTensor<R>,
    weights: CubeTensor<R>,
    segment_rows: &[usize],
) -> CubeTensor<R> {
    let path = GemmPath::choose(MODE_ROWS, &rows, &weights, segment_rows, use_tensor_cores(&rows), true);
    launch_rows_on(path, rows, weights, segment_rows)
}

/// The backends' weight gradient `[rows, a], [rows, b] -> [E, a, b]`: each expert's
/// `rows_e^T grad_e` (zeros when empty), on the path [`GemmPath::choose`] picks.
pub(super) fn grouped_gemm_weight_grad<R: CubeRuntime>(
    rows: CubeTensor<R>,
    grad: CubeTensor<R>,
    segment_rows: &[usize],
) -> CubeTensor<R> {
    let path = GemmPath::choose(MODE_WEIGHTS, &rows, &grad, segment_rows, use_tensor_cores(&rows), true);
    launch_weight_grad_on(path, rows, grad, segment_rows)
}

/// The rows-times-weights product on the cube kernels (never `wgmma`); `tensor_cores` picks
/// the tile product (tests force either).
pub fn launch_rows<R: CubeRuntime>(
    rows: CubeTensor<R>,
    weights: CubeTensor<R>,
    segment_rows: &[usize],
    tensor_cores: impl Fn(&CubeTensor<R>) -> bool,
) -> CubeTensor<R> {
    let path = GemmPath::choose(MODE_ROWS, &rows, &weights, segment_rows, tensor_cores(&rows), false);
    launch_rows_on(path, rows, weights, segment_rows)
}

/// The weight gradient on the cube kernels (never `wgmma`); `tensor_cores` picks the tile
/// product.
pub fn launch_weight_grad<R: CubeRuntime>(
    rows: CubeTensor<R>,
    grad: CubeTensor<R>,
    segment_rows: &[usize],
    tensor_cores: impl Fn(&CubeTensor<R>) -> bool,
) -> CubeTensor<R> {
    let path = GemmPath::choose(MODE_WEIGHTS, &rows, &grad, segment_rows, tensor_cores(&rows), false);
    launch_weight_grad_on(path, rows, grad, segment_rows)
}

fn launch_rows_on<R: CubeRuntime>(
    path: GemmPath,
    rows: CubeTensor<R>,
    weights: CubeTensor<R>,
    segment_rows: &[usize],
) -> CubeTensor<R> {
    let total = rows.meta.shape()[0];
    let n = weights.meta.shape()[2];
    let out =
        empty_device_contiguous_dtype(rows.client.clone(), rows.device.clone(), Shape::new([total, n]), rows.dtype);
    let (tiling, pipe) = match &path {
        #[cfg(feature = "cuda")]
        GemmPath::Wgmma(launch) => {
            launch.rows(&rows, &weights, segment_rows, &out);
            return out;
        }
        GemmPath::Pipelined(pipe) => (pipe.tiling, Some(*pipe)),
        GemmPath::General(tiling) => (*tiling, None),
    };
    let table = row_tiles(segment_rows, tiling.tile_m);
    if table.is_empty() || n == 0 {
        return out;
    }
    let n_blocks = n.div_ceil(tiling.tile_n) as u32;
    // Row tiles run along y; a device's y limit (65535) splits very long tables.
    let max_y = rows.client.properties().hardware.max_cube_count.1 as usize;
    for chunk in table.chunks(max_y * 3) {
        let count = CubeCount::Static(n_blocks, (chunk.len() / 3) as u32, 1);
        launch_cube_gemm(MODE_ROWS, [&rows, &weights], u32_tensor(&rows, chunk), &out, count, tiling, pipe);
    }
    out
}

/// The weight-gradient launch: one cube per (column block, row block, expert).
fn launch_weight_grad_on<R: CubeRuntime>(
    path: GemmPath,
    rows: CubeTensor<R>,
    grad: CubeTensor<R>,
    segment_rows: &[usize],
) -> CubeTensor<R> {
    let a = rows.meta.shape()[1];
    let b = grad.meta.shape()[1];
    let experts = segment_rows.len();
    let out = empty_device_contiguous_dtype(
        rows.client.clone(),
        rows.device.clone(),
        Shape::new([experts, a, b]),
        rows.dtype,
    );
    if experts == 0 || a == 0 || b == 0 {
        return out;
    }
    let (tiling, pipe) = match &path {
        #[cfg(feature = "cuda")]
        GemmPath::Wgmma(launch) => {
            launch.weight_grad(&rows, &grad, &out);
            return out;
        }
        GemmPath::Pipelined(pipe) => (pipe.tiling, Some(*pipe)),
        GemmPath::General(tiling) => (*tiling, None),
    };
    let offsets: Vec<u32> = std::iter::once(0)
        .chain(segment_rows.iter().scan(0u32, |end, &count| {
            *end += count as u32;
            Some(*end)
        }))
        .collect();
    let count = CubeCount::Static(b.div_ceil(tiling.tile_n) as u32, a.div_ceil(tiling.tile_m) as u32, experts as u32);
    launch_cube_gemm(MODE_WEIGHTS, [&rows, &grad], u32_tensor(&rows, &offsets), &out, count, tiling, pipe);
    out
}

/// One launch of a cube kernel: the pipelined one when `pipe` is set, the general one on
/// `tiling` otherwise; then cubecl's queue is handed on (`FlushPolicy`), so the GEMM starts
/// while the host goes on.
fn launch_cube_gemm<R: CubeRuntime>(
    mode: u32,
    [lhs, rhs]: [&CubeTensor<R>; 2],
    tiles: CubeTensor<R>,
    out: &CubeTensor<R>,
    count: CubeCount,
    tiling: Tiling,
    pipe: Option<Pipeline>,
) {
    let client = &lhs.client;
    let (lhs_arg, rhs_arg) = (lhs.clone().into_tensor_arg(), rhs.clone().into_tensor_arg());
    let (tiles_arg, out_arg) = (tiles.into_array_arg(), out.clone().into_tensor_arg());
    match pipe {
        Some(pipe) => grouped_gemm_pipelined::launch(
            client,
            count,
            CubeDim::new_1d(pipe.tiling.units()),
            lhs_arg,
            rhs_arg,
            tiles_arg,
            out_arg,
            mode,
            pipe,
            lhs.dtype.into(),
        ),
        None => grouped_gemm::launch(
            client,
            count,
            CubeDim::new_1d(tiling.units()),
            lhs_arg,
            rhs_arg,
            tiles_arg,
            out_arg,
            mode,
            tiling,
            lhs.dtype.into(),
        ),
    }
    hand_on_launches::<R>(&lhs.device);
}

/// Whether the `cmma` path runs for this tensor's element type: half precision in, f32
/// accumulate, 16x16x16 fragments, planes of 32 (the kernel's 2x2 plane grid assumes it).
pub fn use_tensor_cores<R: CubeRuntime>(tensor: &CubeTensor<R>) -> bool {
    tensor_cores_for(&tensor.client, tensor.dtype)
}

/// [`use_tensor_cores`] for `dtype` on `client`'s device.
pub(super) fn tensor_cores_for<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType) -> bool {
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return false;
    }
    let props = client.properties();
    let elem: StorageType = dtype.into();
    let config = MmaConfig { a_type: elem, b_type: elem, cd_type: DType::F32.into(), m: 16, n: 16, k: 16 };
    props.hardware.plane_size_min == 32
        && props.hardware.plane_size_max == 32
        && props.features.matmul.cmma.contains(&config)
}

/// How the operands of a rows-times-weights product lie in memory.
struct RowsLayout {
    /// Every operand is copied whole in 8-element chunks along its contiguous axis: contiguous
    /// rows, widths and strides in multiples of 8.
    aligned: bool,
    /// The weights' depth is contiguous (the transposed view of the row gradient).
    b_depth_contiguous: bool,
}

fn rows_layout<R: CubeRuntime>(rows: &CubeTensor<R>, weights: &CubeTensor<R>) -> RowsLayout {
    let (rs, ws) = (rows.meta.strides(), weights.meta.strides());
    let (k, n) = (rows.meta.shape()[1], weights.meta.shape()[2]);
    let eighth = |v: usize| v.is_multiple_of(CHUNK);
    let b_depth_contiguous = ws[2] != 1;
    let b_ok = if b_depth_contiguous { ws[1] == 1 && eighth(ws[2]) } else { eighth(ws[1]) && eighth(n) };
    RowsLayout { aligned: rs[1] == 1 && eighth(rs[0]) && eighth(k) && eighth(ws[0]) && b_ok, b_depth_contiguous }
}

/// The weight gradient's operands are copied whole in 8-element chunks (as [`RowsLayout`]).
fn weight_grad_aligned<R: CubeRuntime>(rows: &CubeTensor<R>, grad: &CubeTensor<R>) -> bool {
    let (rs, gs) = (rows.meta.strides(), grad.meta.strides());
    let (a, b) = (rows.meta.shape()[1], grad.meta.shape()[1]);
    rs[1] == 1 && gs[1] == 1 && [rs[0], gs[0], a, b].iter().all(|s| s.is_multiple_of(CHUNK))
}

/// The row-tile table of packed segments: (expert, first row, segment end) per `tile_m` rows.
fn row_tiles(segment_rows: &[usize], tile_m: usize) -> Vec<u32> {
    let mut table = Vec::new();
    let mut start = 0;
    for (expert, &count) in segment_rows.iter().enumerate() {
        let end = start + count;
        table.extend((start..end).step_by(tile_m).flat_map(|first| [expert as u32, first as u32, end as u32]));
        start = end;
    }
    table
}

/// The pipelined kernel's shape for a launch whose operand layouts allow it (`aligned`) on
/// the tensor-core `tiling`, or `None` for the general kernel: the device must have
/// asynchronous copies and the shared memory for the stages, and both operands must start
/// on a 16-byte boundary. `out_width` is the output's row stride.
fn pipeline<R: CubeRuntime>(
    [lhs, rhs]: [&CubeTensor<R>; 2],
    tiling: Tiling,
    aligned: bool,
    mode: u32,
    b_depth_contiguous: bool,
    out_width: usize,
) -> Option<Pipeline> {
    let props = lhs.client.properties();
    let starts_aligned = [lhs, rhs].iter().all(|t| t.handle.offset_start.unwrap_or(0).is_multiple_of(16));
    if !tiling.cmma || !aligned || !starts_aligned || !props.features.copy_async || lhs.dtype.size() != 2 {
        return None;
    }
    let (depth, stages) = settings().gemm_pipeline;
    let pipe = Pipeline { tiling, depth, stages, b_depth_contiguous, store_whole: out_width.is_multiple_of(16) };
    (pipe.shared_bytes(mode) <= props.hardware.max_shared_memory_size).then_some(pipe)
}

/// The launch tiling for the tile product `cmma` picks. The scalar product keeps 64x64 tiles
/// (128 units): 128x128 would need 512 units a cube, more than many Vulkan devices allow.
fn tiling(cmma: bool) -> Tiling {
    let ((tile_m, tile_n), (warp_m, warp_n)) = if cmma { settings().gemm_tile } else { ((64, 64), (64, 64)) };
    Tiling { cmma, tile_m, tile_n, warp_m, warp_n }
}

/// Whether a dense product `[rows, inner] x [inner, cols]` runs on the grouped GEMM: not
/// decode-sized (a handful of rows, where burn's matrix-vector kernels do better), and either on
/// tensor cores or narrow (the router's `[T, d] x [d, E]` and its two gradients in f32). A
/// narrow product is a small share of a step's work, and burn's matmul autotunes each new shape:
/// the router's three cost 87 compiled candidates of a cold first step on the H200.
pub(super) fn dense_on_kernels<B: MoeCubeKernels>(
    rows: usize,
    inner: usize,
    cols: usize,
    dtype: DType,
    device: &B::Device,
) -> bool {
    const MIN_ROWS: usize = 64;
    const NARROW: usize = 128;
    settings().kernels && rows >= MIN_ROWS && (inner.min(cols) <= NARROW || B::tensor_cores(dtype, device))
}
