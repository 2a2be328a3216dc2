//! The pipelined tensor-core grouped GEMM: the fast path of the grouped products, for
//! half-precision operands whose contiguous widths are multiples of 8 on devices with
//! asynchronous global-to-shared copies (`cp.async` on CUDA).
//!
//! Operand tiles stream into shared memory in 16-byte copies, `stages` reduction steps in
//! flight, each step's copies tracked by its own barrier, so the tensor cores work on one step
//! while the next ones load. A copy outside the valid rows, columns or depth fills its 16 bytes
//! with zeros: segments need not be tile multiples, a row tile never reads past its segment
//! (and skips the products of 16-row fragments past it), and a weight-gradient tile never sums
//! another expert's rows. Each shared-memory row is padded by 8 elements so that a fragment's 16
//! rows do not all fall in the same banks.
//!
//! Shared memory keeps each operand's contiguous axis: `A` is `[m][depth]` for row tiles
//! (the rows' features are contiguous) and `[depth][m]` for the weight gradient (`lhs^T`); `B`
//! is `[depth][n]`, or `[n][depth]` for the transposed weights of the row gradient. The
//! fragment loads read them row- or column-major accordingly, so no copy transposes.

use cubecl::cmma;
use cubecl::prelude::barrier::{Barrier, copy_async_checked};
use cubecl::prelude::*;

use super::general::{
    MODE_ROWS, Tiling, multiply_accumulate, plane_origin, shared_fragments, store_direct, tile_position,
    write_fragments, zero_accumulators,
};

/// Elements per asynchronous copy: 16 bytes of a 2-byte type.
pub(crate) const CHUNK: usize = 8;
/// Padding at the end of each shared-memory row, in elements (16 bytes keeps rows aligned).
const PAD: usize = 8;

/// How a pipelined launch tiles and streams (comptime).
#[derive(CubeType, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Pipeline {
    /// The output tiling, as the general kernel's tensor-core path takes it.
    pub(crate) tiling: Tiling,
    /// Reduction depth of one step (a multiple of 16).
    pub(crate) depth: usize,
    /// Steps in flight (at least 2).
    pub(crate) stages: usize,
    /// `B` has its depth contiguous in memory (the transposed weights of the row gradient).
    pub(crate) b_depth_contiguous: bool,
    /// Whole 16x16 output fragments may be stored straight to global memory (the output's row
    /// stride is a multiple of 16 elements).
    pub(crate) store_whole: bool,
}

impl Pipeline {
    /// Bytes of shared memory a cube uses with 2-byte elements (the pipeline and the
    /// epilogue's per-plane f32 fragment).
    pub(crate) fn shared_bytes(&self, mode: u32) -> usize {
        let a = stage_len(self.tiling.tile_m, self.depth, mode == MODE_ROWS);
        let b = stage_len(self.tiling.tile_n, self.depth, self.b_depth_contiguous);
        (a + b) * self.stages * 2 + self.tiling.units() as usize / 32 * 256 * 4
    }
}

/// Elements of one operand's stage: `extent` rows or columns of the tile by `depth`, with the
/// contiguous axis padded.
fn stage_len(extent: usize, depth: usize, depth_contiguous: bool) -> usize {
    if depth_contiguous { extent * (depth + PAD) } else { depth * (extent + PAD) }
}

/// Row tiles: `out[r] = lhs[r] rhs[e]` for the rows `r` of expert `e`'s segment (`tiles` holds
/// the expert, the tile's first row and its segment's end per cube row). Weight gradient:
/// `out[e] = lhs_e^T rhs_e` (`tiles` holds the `E + 1` segment offsets). As `grouped_gemm`.
#[cube(launch)]
pub(crate) fn grouped_gemm_pipelined<F: Float>(
    lhs: &Tensor<F>,
    rhs: &Tensor<F>,
    tiles: &Array<u32>,
    out: &mut Tensor<F>,
    #[comptime] mode: u32,
    #[comptime] pipe: Pipeline,
    #[define(F)] _dtype: StorageType,
) {
    let (tile_m, tile_n, depth, stages) = comptime!((pipe.tiling.tile_m, pipe.tiling.tile_n, pipe.depth, pipe.stages));
    let rows_mode = comptime!(mode == MODE_ROWS);
    let (expert, m0, m_end, k_begin, k_end, n0) = tile_position::<F>(lhs, tiles, mode, tile_m, tile_n);
    let n_end = out.shape(out.rank() - 1);
    // Where each operand's tile lies. Rows past the segment's end are zero-filled, never
    // read (no product uses them).
    let a = Operand { base: 0, stride: lhs.stride(0), outer0: m0, outer_end: m_end };
    let mut b = Operand { base: 0, stride: rhs.stride(0), outer0: n0, outer_end: n_end };
    if rows_mode {
        b.base = expert * rhs.stride(0);
        b.stride = rhs.stride(1);
        if comptime!(pipe.b_depth_contiguous) {
            b.stride = rhs.stride(2);
        }
    }

    let a_len = comptime!(stage_len(tile_m, depth, mode == MODE_ROWS));
    let b_len = comptime!(stage_len(tile_n, depth, pipe.b_depth_contiguous));
    let mut smem_a = SharedMemory::<F>::new_aligned(a_len * stages, 32usize);
    let mut smem_b = SharedMemory::<F>::new_aligned(b_len * stages, 32usize);
    let mut bars = Sequence::<Shared<Barrier>>::new();
    #[unroll]
    for _ in 0..stages {
        bars.push(Barrier::shared(CUBE_DIM, UNIT_POS == 0));
    }

    let (fm, fnn) = comptime!((pipe.tiling.warp_m / 16, pipe.tiling.warp_n / 16));
    let (pm, pn) = plane_origin(pipe.tiling);
    let acc = zero_accumulators(fm * fnn);

    // 16-row fragment rows of this plane's block that hold valid rows: the last row tile of a
    // segment skips the products of rows past its end (zeros), freeing the tensor cores for
    // the other cubes on the SM.
    let mut live = 0usize;
    if m_end > m0 + pm {
        live = (m_end - m0 - pm).div_ceil(16usize);
    }

    let steps = (k_end - k_begin).div_ceil(depth);
    // Prologue: the first `stages - 1` steps.
    #[unroll]
    for s in 0..stages - 1 {
        if s < steps {
            let k0 = k_begin + s * depth;
            issue_step::<F>(lhs, rhs, &a, &b, k0, k_end, &mut smem_a, &mut smem_b, bars.index(s), s, pipe, mode);
        }
    }
    // Step `i` lives in stage `i % stages`; a stage's barrier completes one phase per use,
    // so round `r` of the loop waits for parity `r % 2` on every stage.
    let mut step = 0usize;
    let mut phase = 0u32;
    while step < steps {
        #[unroll]
        for s in 0..stages {
            let current = step + s;
            if current < steps {
                // Refill the stage the previous step read (every unit left it at the
                // barrier that ended that step).
                let next = current + stages - 1;
                let ns = comptime!((s + stages - 1) % stages);
                if next < steps {
                    let k0 = k_begin + next * depth;
                    issue_step::<F>(
                        lhs,
                        rhs,
                        &a,
                        &b,
                        k0,
                        k_end,
                        &mut smem_a,
                        &mut smem_b,
                        bars.index(ns),
                        ns,
                        pipe,
                        mode,
                    );
                }
                bars.index(s).wait_parity(phase);
                step_product::<F>(&smem_a, &smem_b, s * a_len, s * b_len, pm, pn, live, &acc, pipe, mode);
                sync_cube();
            }
        }
        step += stages;
        phase ^= 1;
    }

    let (m, n) = (m0 + pm, n0 + pn);
    if comptime!(pipe.store_whole) && m0 + tile_m <= m_end && n0 + tile_n <= n_end {
        #[unroll]
        for i in 0..fm {
            #[unroll]
            for j in 0..fnn {
                store_direct::<F>(out, acc.index(i * fnn + j), expert, m + i * 16, n + j * 16, mode);
            }
        }
        terminate!();
    }
    write_fragments::<F>(out, &acc, expert, m, m_end, n, n_end, pipe.tiling, mode);
}

/// The plane's `fm x fnn` products of one step: every load ahead of the products in one
/// branch-free block, as the compiler schedules it best.
#[cube]
#[allow(clippy::too_many_arguments)]
fn full_product<F: Float>(
    smem_a: &SharedMemory<F>,
    smem_b: &SharedMemory<F>,
    a_offset: usize,
    b_offset: usize,
    pm: usize,
    pn: usize,
    acc: &Sequence<cmma::Matrix<f32>>,
    #[comptime] pipe: Pipeline,
    #[comptime] mode: u32,
) {
    let (tile_m, tile_n, depth) = comptime!((pipe.tiling.tile_m, pipe.tiling.tile_n, pipe.depth));
    let (fm, fnn) = comptime!((pipe.tiling.warp_m / 16, pipe.tiling.warp_n / 16));
    let (rows_mode, b_contiguous) = comptime!((mode == MODE_ROWS, pipe.b_depth_contiguous));
    #[unroll]
    for ks in 0..depth / 16 {
        let fa = stage_fragments::<F>(smem_a, a_offset, pm, ks * 16, fm, tile_m, depth, rows_mode, true);
        let fb = stage_fragments::<F>(smem_b, b_offset, pn, ks * 16, fnn, tile_n, depth, b_contiguous, false);
        multiply_accumulate::<F>(&fa, &fb, acc, fm, fnn);
    }
}

/// One pipeline step's products on the stages at `a_offset` and `b_offset`: the plane's `fm x
/// fnn` fragments, or only its first `live` fragment rows where fewer hold rows of the
/// segment. On the H200 the test inside the step cost the dsv3 row GEMM nothing measurable
/// (a copy of the main loop per case cost it 9%) but the small shape's weight gradient 15%, so
/// the weight gradient, whose tiles are full along the rows, has no test.
#[cube]
#[allow(clippy::too_many_arguments)]
fn step_product<F: Float>(
    smem_a: &SharedMemory<F>,
    smem_b: &SharedMemory<F>,
    a_offset: usize,
    b_offset: usize,
    pm: usize,
    pn: usize,
    live: usize,
    acc: &Sequence<cmma::Matrix<f32>>,
    #[comptime] pipe: Pipeline,
    #[comptime] mode: u32,
) {
    let (tile_m, tile_n, depth) = comptime!((pipe.tiling.tile_m, pipe.tiling.tile_n, pipe.depth));
    let (fm, fnn) = comptime!((pipe.tiling.warp_m / 16, pipe.tiling.warp_n / 16));
    let rows_mode = comptime!(mode == MODE_ROWS);
    let b_contiguous = comptime!(pipe.b_depth_contiguous);
    if comptime!(rows_mode) {
        if live >= fm {
            full_product::<F>(smem_a, smem_b, a_offset, b_offset, pm, pn, acc, pipe, mode);
        } else if live > 0usize {
            #[unroll]
            for ks in 0..depth / 16 {
                let fb = stage_fragments::<F>(smem_b, b_offset, pn, ks * 16, fnn, tile_n, depth, b_contiguous, false);
                #[unroll]
                for i in 0..fm {
                    if i < live {
                        let fa = stage_fragments::<F>(
                            smem_a,
                            a_offset,
                            pm + i * 16,
                            ks * 16,
                            1usize,
                            tile_m,
                            depth,
                            rows_mode,
                            true,
                        );
                        #[unroll]
                        for j in 0..fnn {
                            let c = acc.index(i * fnn + j);
                            cmma::execute::<F, F, f32, f32>(fa.index(0usize), fb.index(j), c, c);
                        }
                    }
                }
            }
        }
    } else {
        full_product::<F>(smem_a, smem_b, a_offset, b_offset, pm, pn, acc, pipe, mode);
    }
}

/// Where one operand's tile lies in its tensor: the tensor starts at `base` with row stride
/// `stride`; the tile covers `outer0..outer_end` along the axis that is not the depth.
#[derive(CubeType)]
struct Operand {
    base: usize,
    stride: usize,
    outer0: usize,
    outer_end: usize,
}

/// Starts the copies of both operands' step at depth `k0` into `stage`, and tracks them on
/// that stage's barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
fn issue_step<F: Float>(
    lhs: &Tensor<F>,
    rhs: &Tensor<F>,
    a: &Operand,
    b: &Operand,
    k0: usize,
    k_end: usize,
    smem_a: &mut SharedMemory<F>,
    smem_b: &mut SharedMemory<F>,
    bar: &Shared<Barrier>,
    #[comptime] stage: usize,
    #[comptime] pipe: Pipeline,
    #[comptime] mode: u32,
) {
    let (tile_m, tile_n, depth) = comptime!((pipe.tiling.tile_m, pipe.tiling.tile_n, pipe.depth));
    let units = comptime!(pipe.tiling.units() as usize);
    let a_offset = comptime!(stage * stage_len(tile_m, depth, mode == MODE_ROWS));
    let b_offset = comptime!(stage * stage_len(tile_n, depth, pipe.b_depth_contiguous));
    issue::<F>(lhs, a, k0, k_end, smem_a, a_offset, tile_m, depth, mode == MODE_ROWS, units);
    issue::<F>(rhs, b, k0, k_end, smem_b, b_offset, tile_n, depth, pipe.b_depth_contiguous, units);
    bar.commit_copy_async();
    bar.arrive();
}

/// Starts the asynchronous copies of one operand's step into `smem` at `offset`: `extent`
/// indices from `op.outer0` along the non-depth axis by `depth` from `k0`, from `t` at
/// `op.base + row * op.stride + column` (row and column being whichever of the two axes is
/// contiguous). Chunks at `outer >= op.outer_end` or `k >= k_end` are zero-filled.
#[cube]
#[allow(clippy::too_many_arguments)]
fn issue<F: Float>(
    t: &Tensor<F>,
    op: &Operand,
    k0: usize,
    k_end: usize,
    smem: &mut SharedMemory<F>,
    offset: usize,
    #[comptime] extent: usize,
    #[comptime] depth: usize,
    #[comptime] depth_contiguous: bool,
    #[comptime] units: usize,
) {
    let (rows, cols) = comptime!(if depth_contiguous { (extent, depth) } else { (depth, extent) });
    let pitch = comptime!(cols + PAD);
    let per_row = comptime!(cols / CHUNK);
    let chunks = comptime!(rows * per_row);
    #[unroll]
    for i in 0..comptime!(chunks.div_ceil(units)) {
        let idx = i * units + UNIT_POS as usize;
        if comptime!(chunks.is_multiple_of(units)) || idx < chunks {
            let r = idx / per_row;
            let c = (idx % per_row) * CHUNK;
            let mut valid = op.outer0 + c < op.outer_end && k0 + r < k_end;
            let mut row = k0 + r;
            let mut col = op.outer0 + c;
            if comptime!(depth_contiguous) {
                valid = op.outer0 + r < op.outer_end && k0 + c < k_end;
                row = op.outer0 + r;
                col = k0 + c;
            }
            let mut src = 0usize;
            let mut len = 0usize;
            if valid {
                src = op.base + row * op.stride + col;
                len = CHUNK;
            }
            let dst = offset + r * pitch + c;
            copy_async_checked(&t.slice(src, src + len), &mut smem.slice_mut(dst, dst + CHUNK), CHUNK as u32);
        }
    }
}

/// The plane's `count` fragments of one operand at depth `kk` of the stage at `offset`,
/// starting at index `p` of the tile's `extent` along the non-depth axis. A stage stored with
/// its depth contiguous is `[extent][depth]`, row-major for `A` and column-major for `B`;
/// otherwise `[depth][extent]`, the other way round.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_fragments<F: Float>(
    smem: &SharedMemory<F>,
    offset: usize,
    p: usize,
    kk: usize,
    #[comptime] count: usize,
    #[comptime] extent: usize,
    #[comptime] depth: usize,
    #[comptime] depth_contiguous: bool,
    #[comptime] is_a: bool,
) -> Sequence<cmma::Matrix<F>> {
    let ident = comptime!(if is_a { cmma::MatrixIdent::A } else { cmma::MatrixIdent::B });
    let col_major = comptime!(depth_contiguous != is_a);
    if comptime!(depth_contiguous) {
        let pitch = comptime!(depth + PAD);
        shared_fragments::<F>(smem, offset + p * pitch + kk, comptime!(16 * pitch), count, pitch, ident, col_major)
    } else {
        let pitch = comptime!(extent + PAD);
        shared_fragments::<F>(smem, offset + kk * pitch + p, 16usize, count, pitch, ident, col_major)
    }
}
