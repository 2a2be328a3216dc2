//! The dispatch's glue kernels around the grouped GEMM: the plan's in-expert ranks and row
//! placement, the per-expert counts, the permute (a row gather), the combine (a gather per
//! token) and its weight gradient (a dot product per pair).

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::launch::{ROW_UNITS, cube_grid, row_cubes, row_vector_size};

/// Units of the rank kernel's cube; each scans `RANK_ITEMS` consecutive pairs.
const RANK_UNITS: u32 = 256;
const RANK_ITEMS: usize = 4;

/// The plan's scan of `ids` (contiguous, `summary.len() - 2` experts). Cube `e` ranks expert
/// `e`'s pairs: `rank[i]` = how many pairs before `i` chose the same expert (the order inside
/// its segment), and `summary[e]` = its pairs. It scans all `ids` in order, a block of
/// `RANK_UNITS * RANK_ITEMS` at a time, with a shared-memory prefix sum: deterministic, and no
/// sort (burn 0.21 sorts on the host). The last cube writes the smallest and the largest id
/// to `summary[E]` and `summary[E + 1]`, so one host read of `summary` sizes the layout and
/// validates the ids.
#[cube(launch)]
fn scan_experts<I: Int>(
    ids: &Tensor<I>,
    rank: &mut Tensor<I>,
    summary: &mut Tensor<I>,
    #[define(I)] _dtype: StorageType,
) {
    let experts = summary.len() - 2;
    if CUBE_POS_X as usize == experts {
        id_range(ids, summary, experts);
    } else {
        let expert = I::cast_from(CUBE_POS_X);
        let n = ids.len();
        let unit = UNIT_POS as usize;
        let units = RANK_UNITS as usize;
        let mut scan = SharedMemory::<u32>::new(RANK_UNITS as usize);
        let mut count = 0u32;
        let mut base = 0usize;
        while base < n {
            let first = base + unit * RANK_ITEMS;
            let mut hits = 0u32;
            for j in 0..RANK_ITEMS {
                let i = first + j;
                if i < n && ids[i] == expert {
                    hits += 1;
                }
            }
            scan[unit] = hits;
            sync_cube();
            // Inclusive Hillis-Steele scan over the units' hit counts.
            let mut offset = 1usize;
            while offset < units {
                let mut add = 0u32;
                if unit >= offset {
                    add = scan[unit - offset];
                }
                sync_cube();
                scan[unit] += add;
                sync_cube();
                offset *= 2;
            }
            let mut next = count + scan[unit] - hits;
            for j in 0..RANK_ITEMS {
                let i = first + j;
                if i < n && ids[i] == expert {
                    rank[i] = I::cast_from(next);
                    next += 1;
                }
            }
            count += scan[units - 1];
            sync_cube();
            base += units * RANK_ITEMS;
        }
        if unit == 0 {
            summary[CUBE_POS_X as usize] = I::cast_from(count);
        }
    }
}

/// `summary[experts]` = min of `ids`, `summary[experts + 1]` = max (`ids` non-empty): each
/// unit a strided share, then a tree in shared memory.
#[cube]
fn id_range<I: Int>(ids: &Tensor<I>, summary: &mut Tensor<I>, experts: usize) {
    let unit = UNIT_POS as usize;
    let units = RANK_UNITS as usize;
    let mut low = ids[0];
    let mut high = ids[0];
    let mut i = unit;
    while i < ids.len() {
        let id = ids[i];
        if id < low {
            low = id;
        }
        if id > high {
            high = id;
        }
        i += units;
    }
    let mut lows = SharedMemory::<I>::new(RANK_UNITS as usize);
    let mut highs = SharedMemory::<I>::new(RANK_UNITS as usize);
    lows[unit] = low;
    highs[unit] = high;
    sync_cube();
    let mut stride = 1usize;
    while stride < units {
        if unit & (2 * stride - 1) == 0 {
            if lows[unit + stride] < lows[unit] {
                lows[unit] = lows[unit + stride];
            }
            if highs[unit + stride] > highs[unit] {
                highs[unit] = highs[unit + stride];
            }
        }
        sync_cube();
        stride *= 2;
    }
    if unit == 0 {
        summary[experts] = lows[0];
        summary[experts + 1] = highs[0];
    }
}

/// The plan's rows, one unit per pair `p` of `ids` `[T, K]` (ids all in range): a pair ranked
/// below `kept` in its expert goes to row `start[ids[p]] + rank[p]`, and that row reads token
/// `p / K` (`source_of_row` holds token + 1, so rows no pair fills keep the 0 of padding); a
/// dropped pair points at row `source_of_row.len()`, the zero row after the last segment.
#[cube(launch)]
fn place_rows<I: Int>(
    ids: &Tensor<I>,
    rank: &Tensor<I>,
    start: &Tensor<I>,
    row_of_pair: &mut Tensor<I>,
    source_of_row: &mut Tensor<I>,
    kept: u32,
    #[define(I)] _dtype: StorageType,
) {
    let p = ABSOLUTE_POS;
    if p >= row_of_pair.len() {
        terminate!();
    }
    let r = u32::cast_from(rank[p]);
    let mut row = source_of_row.len();
    if r < kept {
        row = usize::cast_from(start[usize::cast_from(ids[p])]) + r as usize;
        source_of_row[row] = I::cast_from(p / ids.shape(1) + 1);
    }
    row_of_pair[p] = I::cast_from(row);
}

/// `out[r] = x[source[r] - 1]`, a zero row where `source[r]` is 0 (padding): the permute. Each
/// unit moves one vector of `N` elements (16 bytes where the widths allow, see
/// `row_vector_size`); rows are contiguous when `N > 1`.
#[cube(launch)]
fn gather_rows<F: Float, I: Int, N: Size>(
    x: &Tensor<Vector<F, N>>,
    source: &Tensor<I>,
    out: &mut Tensor<Vector<F, N>>,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let idx = ABSOLUTE_POS;
    if idx >= out.len() {
        terminate!();
    }
    let width = out.vector_size();
    let vectors = out.shape(1) / width;
    let r = idx / vectors;
    let j = idx % vectors;
    let s = usize::cast_from(source[r]);
    let mut value = Vector::<F, N>::new(F::new(0.0));
    if s > 0 {
        value = x[((s - 1) * x.stride(0) + j * width * x.stride(1)) / width];
    }
    out[idx] = value;
}

/// `out[t] = sum_k weights[t, k] * rows[row_of_pair[t K + k]]`, skipping dropped pairs (rows
/// past the end), accumulated in f32: the combine as a gather, so no atomics and a fixed
/// summation order. With unit weights it is the permute's backward. Vectors of `N` as in
/// [`gather_rows`]; the weights may be of another float type (the router's f32).
#[cube(launch)]
fn combine_rows<F: Float, I: Int, W: Float, N: Size>(
    rows: &Tensor<Vector<F, N>>,
    row_of_pair: &Tensor<I>,
    weights: &Tensor<W>,
    out: &mut Tensor<Vector<F, N>>,
    #[define(F, I, W)] _dtypes: [StorageType; 3],
) {
    let idx = ABSOLUTE_POS;
    if idx >= out.len() {
        terminate!();
    }
    let width = out.vector_size();
    let vectors = out.shape(1) / width;
    let t = idx / vectors;
    let j = idx % vectors;
    let top_k = weights.shape(1);
    let total = rows.shape(0);
    let mut acc = Vector::<f32, N>::new(0.0);
    for k in 0..top_k {
        let r = usize::cast_from(row_of_pair[t * top_k + k]);
        if r < total {
            let w = f32::cast_from(weights[t * weights.stride(0) + k * weights.stride(1)]);
            let row = Vector::<f32, N>::cast_from(rows[(r * rows.stride(0) + j * width * rows.stride(1)) / width]);
            acc += row * Vector::<f32, N>::new(w);
        }
    }
    out[idx] = Vector::<F, N>::cast_from(acc);
}

/// Units that share one pair's dot product in [`pair_dots`].
const DOT_UNITS: u32 = 32;
/// Pairs per cube of [`pair_dots`].
const DOT_PAIRS: u32 = 8;

/// `out[p] = <rows[row_of_pair[p]], grad[p / K]>` summed in f32, 0 for a dropped pair (a row
/// past the end): the combine's weight gradient (`out`, `row_of_pair` `[T, K]`). One group of
/// [`DOT_UNITS`] units per pair, each a strided share of the width in vectors of `N`, then a
/// tree sum in shared memory: one read of each row, where burn ops gathered, cast,
/// multiplied and reduced `[T K, d]` copies.
#[cube(launch)]
fn pair_dots<F: Float, I: Int, W: Float, N: Size>(
    rows: &Tensor<Vector<F, N>>,
    row_of_pair: &Tensor<I>,
    grad: &Tensor<Vector<F, N>>,
    out: &mut Tensor<W>,
    #[define(F, I, W)] _dtypes: [StorageType; 3],
) {
    let units = DOT_UNITS as usize;
    let unit = UNIT_POS as usize;
    let lane = unit % units;
    let p = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * DOT_PAIRS as usize + unit / units;
    let pairs = out.len();
    let width = grad.vector_size();
    let vectors = grad.shape(1) / width;
    let mut acc = Vector::<f32, N>::new(0.0);
    // No early exit: every unit takes part in the cube's syncs below.
    if p < pairs {
        let r = usize::cast_from(row_of_pair[p]);
        if r < rows.shape(0) {
            let t = p / out.shape(1);
            let mut j = lane;
            while j < vectors {
                let a = Vector::<f32, N>::cast_from(rows[(r * rows.stride(0) + j * width * rows.stride(1)) / width]);
                let b = Vector::<f32, N>::cast_from(grad[(t * grad.stride(0) + j * width * grad.stride(1)) / width]);
                acc += a * b;
                j += units;
            }
        }
    }
    let mut total = 0.0f32;
    #[unroll]
    for i in 0..width {
        total += acc[i];
    }
    let mut sum = SharedMemory::<f32>::new((DOT_UNITS * DOT_PAIRS) as usize);
    sum[unit] = total;
    sync_cube();
    let mut stride = 1usize;
    while stride < units {
        if lane & (2 * stride - 1) == 0 {
            sum[unit] += sum[unit + stride];
        }
        sync_cube();
        stride *= 2;
    }
    if lane == 0 && p < pairs {
        out[p] = W::cast_from(sum[unit]);
    }
}

/// Units of the count kernel's cube.
const COUNT_UNITS: u32 = 256;

/// `counts[e]` = how many of `ids` (contiguous) equal `e`. One cube per expert; each unit
/// counts a strided share, then a tree sum in shared memory: no atomics, and no 1-D scatter
/// (burn 0.21 runs a 1-D scatter on a single GPU thread).
#[cube(launch)]
fn count_experts<I: Int>(ids: &Tensor<I>, counts: &mut Tensor<I>, #[define(I)] _dtype: StorageType) {
    let expert = I::cast_from(CUBE_POS_X);
    let n = ids.len();
    let unit = UNIT_POS as usize;
    let units = COUNT_UNITS as usize;
    let mut hits = 0u32;
    let mut i = unit;
    while i < n {
        if ids[i] == expert {
            hits += 1;
        }
        i += units;
    }
    let mut sum = SharedMemory::<u32>::new(COUNT_UNITS as usize);
    sum[unit] = hits;
    sync_cube();
    let mut stride = 1usize;
    while stride < units {
        if unit & (2 * stride - 1) == 0 {
            sum[unit] += sum[unit + stride];
        }
        sync_cube();
        stride *= 2;
    }
    if unit == 0 {
        counts[CUBE_POS_X as usize] = I::cast_from(sum[0]);
    }
}

/// `out[row_of_pair[t, k]] = values[t, k]` for every pair placed at a row inside `out` (dropped
/// pairs point past it), one unit per pair; rows no pair fills keep the zeros `out` starts with.
/// With `values` = token + 1 it is the plan's row-to-token map; with the pair weights, each
/// row's weight (the combine's row gradient scales by it). `values` may be a broadcast view.
#[cube(launch)]
fn place_pair_values<T: Numeric, I: Int>(
    row_of_pair: &Tensor<I>,
    values: &Tensor<T>,
    out: &mut Tensor<T>,
    #[define(T, I)] _dtypes: [StorageType; 2],
) {
    let p = ABSOLUTE_POS;
    if p >= row_of_pair.len() {
        terminate!();
    }
    let r = usize::cast_from(row_of_pair[p]);
    if r < out.len() {
        let top_k = row_of_pair.shape(1);
        out[r] = values[(p / top_k) * values.stride(0) + (p % top_k) * values.stride(1)];
    }
}

pub(super) fn launch_scan_experts<R: CubeRuntime>(
    ids: CubeTensor<R>,
    num_experts: usize,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let ids = into_contiguous(ids);
    let pairs = ids.meta.num_elements();
    let (client, device) = (ids.client.clone(), ids.device.clone());
    let ranks = empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new([pairs]), ids.dtype);
    let summary_shape = Shape::new([num_experts + 2]);
    if pairs == 0 {
        return (ranks, zeros_client(client, device, summary_shape, ids.dtype));
    }
    // Every slot of the summary is written by one cube: no zero fill.
    let summary = empty_device_contiguous_dtype(client, device, summary_shape, ids.dtype);
    scan_experts::launch(
        &ids.client,
        CubeCount::Static(num_experts as u32 + 1, 1, 1),
        CubeDim::new_1d(RANK_UNITS),
        ids.clone().into_tensor_arg(),
        ranks.clone().into_tensor_arg(),
        summary.clone().into_tensor_arg(),
        ids.dtype.into(),
    );
    (ranks, summary)
}

pub(super) fn launch_place_rows<R: CubeRuntime>(
    ids: CubeTensor<R>,
    ranks: CubeTensor<R>,
    starts: CubeTensor<R>,
    kept: usize,
    rows: usize,
    padded: bool,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [ids, ranks, starts] = [ids, ranks, starts].map(into_contiguous);
    let pairs = ids.meta.num_elements();
    let (client, device) = (ids.client.clone(), ids.device.clone());
    let row_of_pair = empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new([pairs]), ids.dtype);
    // Only padding rows are left for the zero fill to set.
    let source_of_row = if padded {
        zeros_client(client, device, Shape::new([rows]), ids.dtype)
    } else {
        empty_device_contiguous_dtype(client, device, Shape::new([rows]), ids.dtype)
    };
    if pairs > 0 {
        place_rows::launch(
            &ids.client,
            row_cubes(pairs),
            CubeDim::new_1d(ROW_UNITS),
            ids.clone().into_tensor_arg(),
            ranks.into_tensor_arg(),
            starts.into_tensor_arg(),
            row_of_pair.clone().into_tensor_arg(),
            source_of_row.clone().into_tensor_arg(),
            // A limit past u32 keeps every pair, as `kept` does.
            kept.min(u32::MAX as usize) as u32,
            ids.dtype.into(),
        );
    }
    (row_of_pair, source_of_row)
}

pub(super) fn launch_count_experts<R: CubeRuntime>(ids: CubeTensor<R>, num_experts: usize) -> CubeTensor<R> {
    let ids = into_contiguous(ids);
    let (client, device, shape) = (ids.client.clone(), ids.device.clone(), Shape::new([num_experts]));
    if num_experts == 0 || ids.meta.num_elements() == 0 {
        return zeros_client(client, device, shape, ids.dtype);
    }
    // Each expert's cube writes its slot: no zero fill (a launch saved).
    let out = empty_device_contiguous_dtype(client, device, shape, ids.dtype);
    count_experts::launch(
        &ids.client,
        CubeCount::Static(num_experts as u32, 1, 1),
        CubeDim::new_1d(COUNT_UNITS),
        ids.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        ids.dtype.into(),
    );
    out
}

pub(super) fn launch_place_pair_values<R: CubeRuntime>(
    row_of_pair: CubeTensor<R>,
    values: CubeTensor<R>,
    rows: usize,
) -> CubeTensor<R> {
    let row_of_pair = into_contiguous(row_of_pair);
    let out = zeros_client(values.client.clone(), values.device.clone(), Shape::new([rows]), values.dtype);
    let pairs = row_of_pair.meta.num_elements();
    if rows == 0 || pairs == 0 {
        return out;
    }
    let dtypes = [values.dtype.into(), row_of_pair.dtype.into()];
    place_pair_values::launch(
        &row_of_pair.client,
        row_cubes(pairs),
        CubeDim::new_1d(ROW_UNITS),
        row_of_pair.clone().into_tensor_arg(),
        values.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtypes,
    );
    out
}

pub(super) fn launch_gather_rows<R: CubeRuntime>(x: CubeTensor<R>, source: CubeTensor<R>) -> CubeTensor<R> {
    let shape = Shape::new([source.meta.shape()[0], x.meta.shape()[1]]);
    let out = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), shape, x.dtype);
    let elements = out.meta.num_elements();
    if elements == 0 {
        return out;
    }
    let source = into_contiguous(source);
    let dtypes = [x.dtype.into(), source.dtype.into()];
    let vector = row_vector_size(&[&x, &out]);
    gather_rows::launch(
        &x.client,
        row_cubes(elements / vector),
        CubeDim::new_1d(ROW_UNITS),
        vector,
        x.clone().into_tensor_arg(),
        source.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtypes,
    );
    out
}

pub(super) fn launch_combine_rows<R: CubeRuntime>(
    rows: CubeTensor<R>,
    row_of_pair: CubeTensor<R>,
    weights: CubeTensor<R>,
) -> CubeTensor<R> {
    let shape = Shape::new([weights.meta.shape()[0], rows.meta.shape()[1]]);
    let out = empty_device_contiguous_dtype(rows.client.clone(), rows.device.clone(), shape, rows.dtype);
    let elements = out.meta.num_elements();
    if elements == 0 {
        return out;
    }
    let row_of_pair = into_contiguous(row_of_pair);
    let dtypes = [rows.dtype.into(), row_of_pair.dtype.into(), weights.dtype.into()];
    let vector = row_vector_size(&[&rows, &out]);
    combine_rows::launch(
        &rows.client,
        row_cubes(elements / vector),
        CubeDim::new_1d(ROW_UNITS),
        vector,
        rows.clone().into_tensor_arg(),
        row_of_pair.into_tensor_arg(),
        weights.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtypes,
    );
    out
}

pub(super) fn launch_pair_dots<R: CubeRuntime>(
    rows: CubeTensor<R>,
    row_of_pair: CubeTensor<R>,
    grad: CubeTensor<R>,
    dtype: DType,
) -> CubeTensor<R> {
    let shape = row_of_pair.meta.shape().clone();
    let out = empty_device_contiguous_dtype(rows.client.clone(), rows.device.clone(), shape, dtype);
    let pairs = out.meta.num_elements();
    if pairs == 0 {
        return out;
    }
    let row_of_pair = into_contiguous(row_of_pair);
    let dtypes = [rows.dtype.into(), row_of_pair.dtype.into(), dtype.into()];
    let vector = row_vector_size(&[&rows, &grad]);
    pair_dots::launch(
        &rows.client,
        cube_grid(pairs.div_ceil(DOT_PAIRS as usize) as u32),
        CubeDim::new_1d(DOT_UNITS * DOT_PAIRS),
        vector,
        rows.clone().into_tensor_arg(),
        row_of_pair.into_tensor_arg(),
        grad.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtypes,
    );
    out
}
