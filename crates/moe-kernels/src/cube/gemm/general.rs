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
