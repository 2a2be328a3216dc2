//! The general grouped GEMM kernel: one launch multiplies every expert's segment of the sorted
//! rows, for any widths and strides (the pipelined kernel in `pipelined.rs` takes the aligned
//! half-precision cases on devices with asynchronous copies).
//!
//! A cube computes one `tile_m x tile_n` output tile (multiples of 32, comptime). Operand tiles are
//! staged in shared memory with zeros outside the valid range, so segment sizes need not be
//! tile multiples and a tile never reads another expert's rows; the epilogue writes only the
//! valid part. The tile product runs on tensor cores (`cmma`, 16x16x16 fragments, f32
//! accumulators; one plane of 32 units per `warp_m x warp_n` block of the tile) where the
//! device has them for the element type, or as a register-blocked f32 loop otherwise (f32
//! models, and Vulkan drivers without cooperative matrices such as lavapipe in CI).

use cubecl::cmma;
use cubecl::prelude::*;

/// Reduction depth staged per step.
const TILE_K: usize = 32;

/// How a launch tiles its output (comptime): each cube computes `tile_m x tile_n`; on the
/// tensor-core path each plane of 32 units computes a `warp_m x warp_n` block of it
/// (multiples of 16), on the scalar path each unit 32 outputs of one column.
#[derive(CubeType, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Tiling {
    pub(crate) cmma: bool,
    pub(crate) tile_m: usize,
    pub(crate) tile_n: usize,
    pub(crate) warp_m: usize,
    pub(crate) warp_n: usize,
}

impl Tiling {
    /// Units per cube.
    pub(crate) fn units(&self) -> u32 {
        if self.cmma {
            (self.tile_m / self.warp_m * (self.tile_n / self.warp_n) * 32) as u32
        } else {
            (self.tile_m * self.tile_n / 32) as u32
        }
    }
}

/// `out[r] = lhs[r] rhs[e]` for the rows `r` of expert `e`'s segment. `tiles` holds three
/// numbers per cube row: the expert, the tile's first row and the end of its segment.
/// `rhs` is `[E, K, N]` with any strides (a transposed view gives the row gradient).
pub(crate) const MODE_ROWS: u32 = 0;
/// `out[e] = lhs_e^T rhs_e` over expert `e`'s segment (the weight gradient): `lhs` `[rows, M]`,
/// `rhs` `[rows, N]`, `out` `[E, M, N]`; `tiles` holds the `E + 1` segment offsets.
pub(crate) const MODE_WEIGHTS: u32 = 1;

#[cube(launch)]
pub(crate) fn grouped_gemm<F: Float>(
    lhs: &Tensor<F>,
    rhs: &Tensor<F>,
    tiles: &Array<u32>,
    out: &mut Tensor<F>,
    #[comptime] mode: u32,
    #[comptime] tiling: Tiling,
    #[define(F)] _dtype: StorageType,
) {
    let tile_m = comptime!(tiling.tile_m);
    let tile_n = comptime!(tiling.tile_n);
    let (expert, m0, m_end, k_begin, k_end, n0) = tile_position::<F>(lhs, tiles, mode, tile_m, tile_n);
    let n_end = out.shape(out.rank() - 1);
    let bounds = TileBounds { expert, m0, m_end, n0, n_end };

    let mut stage_a = SharedMemory::<F>::new_aligned(tile_m * TILE_K, 32usize);
    let mut stage_b = SharedMemory::<F>::new_aligned(TILE_K * tile_n, 32usize);

    if comptime!(tiling.cmma) {
        let (fm, fnn) = comptime!((tiling.warp_m / 16, tiling.warp_n / 16));
        let (pm, pn) = plane_origin(tiling);
        let acc = zero_accumulators(fm * fnn);
        let mut k0 = k_begin;
        while k0 < k_end {
            stage_operands::<F>(lhs, rhs, &mut stage_a, &mut stage_b, &bounds, k0, k_end, mode, tiling);
            sync_cube();
            #[unroll]
            for ks in 0..TILE_K / 16 {
                let a = shared_fragments::<F>(
                    &stage_a,
                    pm * TILE_K + ks * 16,
                    16usize * TILE_K,
                    fm,
                    TILE_K,
                    cmma::MatrixIdent::A,
                    false,
                );
                let b = shared_fragments::<F>(
                    &stage_b,
                    ks * 16 * tile_n + pn,
                    16usize,
                    fnn,
                    tile_n,
                    cmma::MatrixIdent::B,
                    false,
                );
                multiply_accumulate::<F>(&a, &b, &acc, fm, fnn);
            }
            sync_cube();
            k0 += TILE_K;
        }
        write_fragments::<F>(out, &acc, expert, m0 + pm, m_end, n0 + pn, n_end, tiling, mode);
    } else {
        // Unit u owns column u % tile_n and 32 consecutive rows: the rows' operands are
        // broadcast reads across a plane, the column's a distinct bank per unit.
        let n = UNIT_POS as usize % tile_n;
        let mr = (UNIT_POS as usize / tile_n) * 32;
        let mut acc = Array::<f32>::new(32usize);
        #[unroll]
        for i in 0..32usize {
            acc[i] = 0.0;
        }
        let mut k0 = k_begin;
        while k0 < k_end {
            stage_operands::<F>(lhs, rhs, &mut stage_a, &mut stage_b, &bounds, k0, k_end, mode, tiling);
            sync_cube();
            for k in 0..TILE_K {
                let b = f32::cast_from(stage_b[k * tile_n + n]);
                #[unroll]
                for i in 0..32usize {
                    acc[i] += f32::cast_from(stage_a[(mr + i) * TILE_K + k]) * b;
                }
            }
            sync_cube();
            k0 += TILE_K;
        }
        #[unroll]
        for i in 0..32usize {
            write_output::<F>(out, acc[i], expert, m0 + mr + i, m_end, n0 + n, n_end, mode);
        }
    }
}

/// Where a grouped-GEMM cube's tile lies, as `(expert, m0, m_end, k_begin, k_end, n0)`: its
/// expert, first output row and the end of its rows, the reduction range, and its first
/// column. Row tiles: column blocks run along x and row tiles along y, so the cubes running at
/// once share a few row tiles' `A` through L2 (with row tiles along x, every column block
/// re-read each `A` tile from memory: 15 GB a dsv3 projection at T 8192). Weight-gradient
/// tiles are (column block, row block, expert).
#[cube]
pub(crate) fn tile_position<F: Float>(
    lhs: &Tensor<F>,
    tiles: &Array<u32>,
    #[comptime] mode: u32,
    #[comptime] tile_m: usize,
    #[comptime] tile_n: usize,
) -> (usize, usize, usize, usize, usize, usize) {
    if comptime!(mode == MODE_ROWS) {
        let t = CUBE_POS_Y as usize * 3;
        (
            tiles[t] as usize,
            tiles[t + 1] as usize,
            tiles[t + 2] as usize,
            0usize,
            lhs.shape(1),
            CUBE_POS_X as usize * tile_n,
        )
    } else {
        let e = CUBE_POS_Z as usize;
        (
            e,
            CUBE_POS_Y as usize * tile_m,
            lhs.shape(1),
            tiles[e] as usize,
            tiles[e + 1] as usize,
            CUBE_POS_X as usize * tile_n,
        )
    }
}

/// `acc[i][j] += a[i] b[j]` over the plane's `fm x fnn` fragments.
#[cube]
pub(crate) fn multiply_accumulate<F: Float>(
    a: &Sequence<cmma::Matrix<F>>,
    b: &Sequence<cmma::Matrix<F>>,
    acc: &Sequence<cmma::Matrix<f32>>,
    #[comptime] fm: usize,
    #[comptime] fnn: usize,
) {
    #[unroll]
    for i in 0..fm {
        #[unroll]
        for j in 0..fnn {
            let c = acc.index(i * fnn + j);
            cmma::execute::<F, F, f32, f32>(a.index(i), b.index(j), c, c);
        }
    }
}

/// The first output row and column of this unit's plane in its cube's tile (tensor-core path).
#[cube]
pub(crate) fn plane_origin(#[comptime] tiling: Tiling) -> (usize, usize) {
    let plane = UNIT_POS as usize / 32;
    let planes_n = comptime!(tiling.tile_n / tiling.warp_n);
    ((plane / planes_n) * comptime!(tiling.warp_m), (plane % planes_n) * comptime!(tiling.warp_n))
}

/// `count` 16x16 f32 accumulator fragments filled with zeros.
#[cube]
pub(crate) fn zero_accumulators(#[comptime] count: usize) -> Sequence<cmma::Matrix<f32>> {
    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..count {
        acc.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }
    acc
}

/// `count` 16x16x16 input fragments of `smem`, the `i`-th starting at element
/// `start + i * step`, with leading dimension `pitch` (row- or column-major).
#[cube]
pub(crate) fn shared_fragments<F: Float>(
    smem: &SharedMemory<F>,
    start: usize,
    #[comptime] step: usize,
    #[comptime] count: usize,
    #[comptime] pitch: usize,
    #[comptime] ident: cmma::MatrixIdent,
    #[comptime] col_major: bool,
) -> Sequence<cmma::Matrix<F>> {
    let end = smem.len();
    let layout = comptime!(if col_major { cmma::MatrixLayout::ColMajor } else { cmma::MatrixLayout::RowMajor });
    let mut fragments = Sequence::<cmma::Matrix<F>>::new();
    #[unroll]
    for i in 0..count {
        let slice = smem.slice(start + i * step, end);
        fragments.push(cmma::Matrix::<F>::from_slice(ident, 16usize, 16usize, 16usize, layout, &slice, pitch as u32));
    }
    fragments
}

/// Stores a whole 16x16 accumulator fragment at output `(m, n)`, cast to `F`.
#[cube]
pub(crate) fn store_direct<F: Float>(
    out: &mut Tensor<F>,
    acc: &cmma::Matrix<f32>,
    expert: usize,
    m: usize,
    n: usize,
    #[comptime] mode: u32,
) {
    let len = out.len();
    let values = cmma::cast::<f32, F>(acc);
    let mut start = m * out.stride(0) + n;
    let mut stride = out.stride(0);
    if comptime!(mode == MODE_WEIGHTS) {
        stride = out.stride(1);
        start = expert * out.stride(0) + m * stride + n;
    }
    cmma::store(&mut out.slice_mut(start, len), &values, stride as u32, cmma::MatrixLayout::RowMajor);
}

/// Where a cube's output tile lies: the expert, its rows `m0..m_end` and columns `n0..n_end`.
#[derive(CubeType)]
struct TileBounds {
    expert: usize,
    m0: usize,
    m_end: usize,
    n0: usize,
    n_end: usize,
}

/// Stages `A` (`tile_m x TILE_K`, row-major) and `B` (`TILE_K x tile_n`, row-major) for the
/// reduction step at `k0`, with zeros outside the valid rows, columns and depth.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_operands<F: Float>(
    lhs: &Tensor<F>,
    rhs: &Tensor<F>,
    stage_a: &mut SharedMemory<F>,
    stage_b: &mut SharedMemory<F>,
    bounds: &TileBounds,
    k0: usize,
    k_end: usize,
    #[comptime] mode: u32,
    #[comptime] tiling: Tiling,
) {
    let (tile_m, tile_n) = comptime!((tiling.tile_m, tiling.tile_n));
    let units = comptime!(tiling.units() as usize);
    let unit = UNIT_POS as usize;
    let (expert, m0, m_end, n0, n_end) = (bounds.expert, bounds.m0, bounds.m_end, bounds.n0, bounds.n_end);
    let a_per_unit = tile_m * TILE_K / units;
    let b_per_unit = TILE_K * tile_n / units;
    if comptime!(mode == MODE_ROWS) {
        // A: rows of the segment, depth contiguous in memory.
        for i in 0..a_per_unit {
            let idx = i * units + unit;
            let m = idx / TILE_K;
            let k = idx % TILE_K;
            let mut value = F::new(0.0);
            if m0 + m < m_end && k0 + k < k_end {
                value = lhs[(m0 + m) * lhs.stride(0) + (k0 + k) * lhs.stride(1)];
            }
            stage_a[m * TILE_K + k] = value;
        }
        // B: the expert's matrix; walk whichever of its axes is contiguous so the reads
        // coalesce (a transposed view has unit stride along the depth).
        let base = expert * rhs.stride(0);
        let walk_depth = rhs.stride(1) == 1;
        for i in 0..b_per_unit {
            let idx = i * units + unit;
            let mut k = idx / tile_n;
            let mut n = idx % tile_n;
            if walk_depth {
                k = idx % TILE_K;
                n = idx / TILE_K;
            }
            let mut value = F::new(0.0);
            if k0 + k < k_end && n0 + n < n_end {
                value = rhs[base + (k0 + k) * rhs.stride(1) + (n0 + n) * rhs.stride(2)];
            }
            stage_b[k * tile_n + n] = value;
        }
    } else {
        // A = lhs^T: walk the output rows (lhs columns), contiguous in memory.
        for i in 0..a_per_unit {
            let idx = i * units + unit;
            let m = idx % tile_m;
            let k = idx / tile_m;
            let mut value = F::new(0.0);
            if m0 + m < m_end && k0 + k < k_end {
                value = lhs[(k0 + k) * lhs.stride(0) + (m0 + m) * lhs.stride(1)];
            }
            stage_a[m * TILE_K + k] = value;
        }
        for i in 0..b_per_unit {
            let idx = i * units + unit;
            let k = idx / tile_n;
            let n = idx % tile_n;
            let mut value = F::new(0.0);
            if k0 + k < k_end && n0 + n < n_end {
                value = rhs[(k0 + k) * rhs.stride(0) + (n0 + n) * rhs.stride(1)];
            }
            stage_b[k * tile_n + n] = value;
        }
    }
}

/// Writes the plane's `fm x fnn` accumulator fragments, the first at output `(m, n)`, through
/// shared memory one 16x16 fragment at a time, because fragments have no per-element
/// addressing to mask the rows of the next segment: only elements inside `m_end` and `n_end`
/// are written.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_fragments<F: Float>(
    out: &mut Tensor<F>,
    acc: &Sequence<cmma::Matrix<f32>>,
    expert: usize,
    m: usize,
    m_end: usize,
    n: usize,
    n_end: usize,
    #[comptime] tiling: Tiling,
    #[comptime] mode: u32,
) {
    let (fm, fnn) = comptime!((tiling.warp_m / 16, tiling.warp_n / 16));
    let planes = comptime!(tiling.units() as usize / 32);
    let mut stage = SharedMemory::<f32>::new_aligned(planes * 256, 32usize);
    let own = (UNIT_POS as usize / 32) * 256;
    let lane = UNIT_POS as usize % 32;
    #[unroll]
    for i in 0..fm {
        #[unroll]
        for j in 0..fnn {
            cmma::store(
                &mut stage.slice_mut(own, own + 256),
                acc.index(i * fnn + j),
                16u32,
                cmma::MatrixLayout::RowMajor,
            );
            sync_cube();
            #[unroll]
            for e in 0..8usize {
                let idx = e * 32 + lane;
                let (r, c) = (m + i * 16 + idx / 16, n + j * 16 + idx % 16);
                write_output::<F>(out, stage[own + idx], expert, r, m_end, c, n_end, mode);
            }
            sync_cube();
        }
    }
}

/// Writes one accumulated element if it lies inside the output (and, for row tiles, inside
/// the tile's segment).
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_output<F: Float>(
    out: &mut Tensor<F>,
    value: f32,
    expert: usize,
    m: usize,
    m_end: usize,
    n: usize,
    n_end: usize,
    #[comptime] mode: u32,
) {
    if m < m_end && n < n_end {
        if comptime!(mode == MODE_ROWS) {
            out[m * out.stride(0) + n * out.stride(1)] = F::cast_from(value);
        } else {
            out[expert * out.stride(0) + m * out.stride(1) + n * out.stride(2)] = F::cast_from(value);
        }
    }
}

/// Units of the rank kernel's cube; each scans `RANK_ITEMS` consecutive pairs.
pub(crate) const RANK_UNITS: u32 = 256;
const RANK_ITEMS: usize = 4;

/// The plan's scan of `ids` (contiguous, `summary.len() - 2` experts). Cube `e` ranks expert
/// `e`'s pairs: `rank[i]` = how many pairs before `i` chose the same expert (the order inside
/// its segment), and `summary[e]` = its pairs. It scans all `ids` in order, a block of
/// `RANK_UNITS * RANK_ITEMS` at a time, with a shared-memory prefix sum: deterministic, and no
/// sort (burn 0.21 sorts on the host). The last cube writes the smallest and the largest id
/// to `summary[E]` and `summary[E + 1]`, so one host read of `summary` sizes the layout and
/// validates the ids.
#[cube(launch)]
pub(crate) fn scan_experts<I: Int>(
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
pub(crate) fn place_rows<I: Int>(
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

/// Units per cube of the row kernels (one output element each).
pub(crate) const ROW_UNITS: u32 = 256;

/// The sum of `value` over the cube's first `count` units (`count` a power of two, at most the
/// cube's size), through `shared` (`count` entries) as a tree; every unit of the cube gets it,
/// so every unit must call it. The stride grows from a literal: cubecl keeps a variable made
/// from a constant immutable.
#[cube]
#[allow(clippy::manual_is_multiple_of)] // the cube macro expands operators, not `is_multiple_of`
pub(crate) fn cube_sum(shared: &mut SharedMemory<f32>, value: f32, unit: usize, #[comptime] count: usize) -> f32 {
    if unit < count {
        shared[unit] = value;
    }
    sync_cube();
    let mut stride = 1usize;
    while stride < count {
        if unit % (2 * stride) == 0 && unit < count {
            let other = shared[unit + stride];
            shared[unit] += other;
        }
        sync_cube();
        stride *= 2;
    }
    shared[0]
}

/// [`cube_sum`]'s tree with the maximum in place of the sum.
#[cube]
#[allow(clippy::manual_is_multiple_of)] // the cube macro expands operators, not `is_multiple_of`
pub(crate) fn cube_max(shared: &mut SharedMemory<f32>, value: f32, unit: usize, #[comptime] count: usize) -> f32 {
    if unit < count {
        shared[unit] = value;
    }
    sync_cube();
    let mut stride = 1usize;
    while stride < count {
        if unit % (2 * stride) == 0 && unit < count {
            let other = shared[unit + stride];
            shared[unit] = f32::max(shared[unit], other);
        }
        sync_cube();
        stride *= 2;
    }
    shared[0]
}

/// `out[r] = x[source[r] - 1]`, a zero row where `source[r]` is 0 (padding): the permute. Each
/// unit moves one vector of `N` elements (16 bytes where the widths allow, see
/// `row_vector_size`); rows are contiguous when `N > 1`.
#[cube(launch)]
pub(crate) fn gather_rows<F: Float, I: Int, N: Size>(
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
pub(crate) fn combine_rows<F: Float, I: Int, W: Float, N: Size>(
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
pub(crate) const DOT_UNITS: u32 = 32;
/// Pairs per cube of [`pair_dots`].
pub(crate) const DOT_PAIRS: u32 = 8;

/// `out[p] = <rows[row_of_pair[p]], grad[p / K]>` summed in f32, 0 for a dropped pair (a row
/// past the end): the combine's weight gradient (`out`, `row_of_pair` `[T, K]`). One group of
/// [`DOT_UNITS`] units per pair, each a strided share of the width in vectors of `N`, then a
/// tree sum in shared memory: one read of each row, where burn ops gathered, cast,
/// multiplied and reduced `[T K, d]` copies.
#[cube(launch)]
pub(crate) fn pair_dots<F: Float, I: Int, W: Float, N: Size>(
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
pub(crate) const COUNT_UNITS: u32 = 256;

/// `counts[e]` = how many of `ids` (contiguous) equal `e`. One cube per expert; each unit
/// counts a strided share, then a tree sum in shared memory: no atomics, and no 1-D scatter
/// (burn 0.21 runs a 1-D scatter on a single GPU thread).
#[cube(launch)]
pub(crate) fn count_experts<I: Int>(ids: &Tensor<I>, counts: &mut Tensor<I>, #[define(I)] _dtype: StorageType) {
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
pub(crate) fn place_pairs<T: Numeric, I: Int>(
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
