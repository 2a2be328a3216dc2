//! The CUDA C++ text of the Hopper grouped GEMM (`wgmma`), built per launch shape.
//!
//! cubecl 0.10 emits the warp-level `mma` for its matrix type, which on an H200 tops out near
//! a third of the tensor cores' rate; `wgmma` (a warpgroup's asynchronous product from shared
//! memory) is what reaches the rest, and cubecl has no instruction for it. So this one kernel
//! is written as CUDA C++ with inline PTX, compiled by the same NVRTC call as every cubecl
//! kernel (sm_90a) and launched through cubecl's compute client (`wgmma.rs`).
//!
//! Shape of a cube: 256 threads, two warpgroups, a 128-row by `tile_n` output tile; each
//! warpgroup owns 64 rows and issues `m64n{tile_n}k16` products. Operand tiles are 64 deep
//! and stream in with 16-byte `cp.async` copies (zero-filled outside the valid rows, columns
//! and depth) into 128-byte-swizzled shared memory, the layout `wgmma` reads without bank
//! conflicts: a K-major tile is `[rows][64]`, an MN-major tile is `[atom][64 deep][64]`, and
//! 16-byte chunk `c` of row `r` of an atom sits at `r * 128 + ((c ^ (r % 8)) * 16)`.
//! `stages - 2` steps load ahead while one product group runs; a stage is refilled only
//! after both warpgroups have waited for the products that read it.

use std::fmt::Write;

/// Threads of one cube: two warpgroups.
pub(crate) const THREADS: u32 = 256;
/// Output rows of one cube.
pub(crate) const TILE_M: usize = 128;
/// Depth of one pipeline step: one 128-byte swizzle row of 2-byte elements.
const DEPTH: usize = 64;
/// u32 slots before the tile table: the launch's sizes and strides.
pub(crate) const HEADER: usize = 8;

/// One compiled variant (everything the text depends on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct HopperGemm {
    /// `__half` operands, else `__nv_bfloat16`.
    pub(crate) half: bool,
    /// Row tiles of segments (`true`) or per-expert weight gradients.
    pub(crate) rows: bool,
    /// Rows mode: the weights' depth is contiguous (the row gradient's transposed view).
    pub(crate) b_depth_contiguous: bool,
    /// Output columns of one cube: 128 or 256.
    pub(crate) tile_n: usize,
    /// Shared-memory stages (at least 3).
    pub(crate) stages: usize,
}

impl HopperGemm {
    /// Bytes of one stage: the `A` tile and the `B` tile.
    fn stage_bytes(&self) -> usize {
        (TILE_M + self.tile_n) * DEPTH * 2
    }

    /// Dynamic shared memory of one cube, with room to align the stages to 1024 bytes (the
    /// swizzle pattern's period).
    pub(crate) fn shared_bytes(&self) -> usize {
        self.stages * self.stage_bytes() + 1024
    }

    /// Cubes that fit on one multiprocessor by shared memory (227 KB on Hopper), so that one
    /// cube's prologue and epilogue overlap another's products.
    fn cubes_per_sm(&self) -> usize {
        (232_448 / self.shared_bytes()).clamp(1, 2)
    }

    /// The kernel's entry point.
    pub(crate) fn name(&self) -> String {
        format!(
            "moe_wgmma_{}_{}_{}_n{}_s{}",
            if self.half { "f16" } else { "bf16" },
            if self.rows { "rows" } else { "wgrad" },
            if self.b_depth_contiguous { "bk" } else { "bn" },
            self.tile_n,
            self.stages
        )
    }

    /// `A` is MN-major in memory (the weight gradient reads `lhs^T`).
    fn a_mn(&self) -> bool {
        !self.rows
    }

    /// `B` is MN-major in memory (the weights' columns, or the gradient's).
    fn b_mn(&self) -> bool {
        !self.rows || !self.b_depth_contiguous
    }

    /// The whole translation unit.
    pub(crate) fn source(&self) -> String {
        let mut s = String::new();
        let elem = if self.half { "__half" } else { "__nv_bfloat16" };
        let pair = if self.half { "__half2" } else { "__nv_bfloat162" };
        let pack = if self.half { "__floats2half2_rn" } else { "__floats2bfloat162_rn" };
        let ty = if self.half { "f16" } else { "bf16" };
        let (a_mn, b_mn) = (self.a_mn() as u32, self.b_mn() as u32);
        let n = self.tile_n;
        let _ = write!(
            s,
            r#"#include <cuda_fp16.h>
#include <cuda_bf16.h>
typedef {elem} elem_t;
typedef unsigned long long u64;
#define TILE_M {TILE_M}
#define TILE_N {n}
#define DEPTH {DEPTH}
#define STAGES {stages}
#define A_BYTES (TILE_M * DEPTH * 2)
#define STAGE_BYTES ((TILE_M + TILE_N) * DEPTH * 2)
// Row pitch of the epilogue's staged tile: 16 bytes of padding keep its writes conflict-free.
#define OUT_PITCH (TILE_N * 2 + 16)

// 16 bytes from global to shared, or 16 zero bytes when `valid` is false.
__device__ __forceinline__ void copy16(unsigned dst, const void* src, bool valid) {{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(valid ? 16 : 0));
}}

// A 128-byte-swizzled shared-memory matrix descriptor.
__device__ __forceinline__ u64 descriptor(unsigned addr, unsigned lead, unsigned stride) {{
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lead & 0x3FFFF) >> 4) << 16)
        | ((u64)((stride & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}}

// A K-major tile: `rows` rows (from `row0`, valid below `row_end`) of DEPTH elements from
// depth `k0` (valid below `k_end`); row r of global memory at `base + r * ld`.
__device__ __forceinline__ void load_k_major(unsigned smem, const elem_t* base, unsigned ld, unsigned row0,
        unsigned row_end, unsigned k0, unsigned k_end, int rows) {{
    for (int i = threadIdx.x; i < rows * 8; i += {THREADS}) {{
        int r = i >> 3, c = i & 7;
        bool valid = row0 + r < row_end && k0 + c * 8 < k_end;
        const elem_t* src = valid ? base + (u64)(row0 + r) * ld + k0 + c * 8 : base;
        copy16(smem + r * 128 + ((c ^ (r & 7)) << 4), src, valid);
    }}
}}

// An MN-major tile: DEPTH rows of depth (from `k0`, valid below `k_end`) by `cols` contiguous
// elements (from `col0`, valid below `col_end`), stored as 64-column atoms.
__device__ __forceinline__ void load_mn_major(unsigned smem, const elem_t* base, unsigned ld, unsigned col0,
        unsigned col_end, unsigned k0, unsigned k_end, int cols) {{
    int chunks = cols / 8;
    for (int i = threadIdx.x; i < DEPTH * chunks; i += {THREADS}) {{
        int k = i / chunks, cn = i % chunks;
        int atom = cn >> 3, c = cn & 7;
        bool valid = k0 + k < k_end && col0 + cn * 8 < col_end;
        const elem_t* src = valid ? base + (u64)(k0 + k) * ld + col0 + cn * 8 : base;
        copy16(smem + atom * (DEPTH * 128) + k * 128 + ((c ^ (k & 7)) << 4), src, valid);
    }}
}}

"#,
            stages = self.stages,
        );
        self.write_mma(&mut s, ty, a_mn, b_mn);
        let _ = write!(
            s,
            r#"
extern "C" __global__ void __launch_bounds__({THREADS}, {per_sm}) {name}(
        const elem_t* __restrict__ lhs, const elem_t* __restrict__ rhs,
        const unsigned* __restrict__ table, elem_t* __restrict__ out) {{
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const unsigned smem = ((unsigned)__cvta_generic_to_shared(smem_raw) + 1023u) & ~1023u;
    const int wg = threadIdx.x >> 7;
    // Header: table[0] is the depth (rows) or the output's rows (weight gradient).
    const unsigned width = table[1], lhs_ld = table[2];
    const unsigned n0 = blockIdx.x * TILE_N;
"#,
            name = self.name(),
            per_sm = self.cubes_per_sm(),
        );
        if self.rows {
            let _ = write!(
                s,
                r#"    // Rows: out[r] = lhs[r] B_e for the rows r of expert e's segment.
    const unsigned rhs_expert = table[3], rhs_ld = table[4];
    const unsigned* tile = table + {HEADER} + blockIdx.y * 3;
    const unsigned expert = tile[0], m0 = tile[1], m_end = tile[2];
    const unsigned k_begin = 0, k_end = table[0];
    const elem_t* b_base = rhs + (u64)expert * rhs_expert;
"#
            );
        } else {
            let _ = write!(
                s,
                r#"    // Weight gradient: out[e] = lhs_e^T rhs_e over expert e's segment of rows.
    const unsigned rhs_ld = table[3];
    const unsigned expert = blockIdx.z, m0 = blockIdx.y * TILE_M, m_end = table[0];
    const unsigned k_begin = table[{HEADER} + expert], k_end = table[{HEADER} + expert + 1];
    const elem_t* b_base = rhs;
"#
            );
        }
        let load_a = if self.a_mn() {
            "load_mn_major(a_s, lhs, lhs_ld, m0, m_end, k0, k_end, TILE_M)"
        } else {
            "load_k_major(a_s, lhs, lhs_ld, m0, m_end, k0, k_end, TILE_M)"
        };
        let load_b = if self.b_mn() {
            "load_mn_major(a_s + A_BYTES, b_base, rhs_ld, n0, width, k0, k_end, TILE_N)"
        } else {
            "load_k_major(a_s + A_BYTES, b_base, rhs_ld, n0, width, k0, k_end, TILE_N)"
        };
        // Where warpgroup `wg`'s 64 rows of A and step `kk`'s 16 deep start in a stage.
        let a_desc = if self.a_mn() {
            "descriptor(a_s + wg * (DEPTH * 128) + kk * 2048, DEPTH * 128, 1024)"
        } else {
            "descriptor(a_s + wg * (64 * 128) + kk * 32, 16, 1024)"
        };
        let b_desc = if self.b_mn() {
            "descriptor(a_s + A_BYTES + kk * 2048, DEPTH * 128, 1024)"
        } else {
            "descriptor(a_s + A_BYTES + kk * 32, 16, 1024)"
        };
        let out_row = if self.rows { "(u64)row * width" } else { "((u64)expert * m_end + row) * width" };
        let _ = write!(
            s,
            r#"    float acc[TILE_N / 2];
#pragma unroll
    for (int i = 0; i < TILE_N / 2; ++i) acc[i] = 0.0f;
    // A warpgroup whose 64 rows all lie past the segment's end skips its products.
    const bool live = m0 + wg * 64 < m_end;
    const int steps = (int)((k_end - k_begin + DEPTH - 1) / DEPTH);
#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {{
        if (s < steps) {{
            const unsigned a_s = smem + s * STAGE_BYTES, k0 = k_begin + s * DEPTH;
            {load_a};
            {load_b};
        }}
        asm volatile("cp.async.commit_group;\n" ::);
    }}
    for (int step = 0; step < steps; ++step) {{
        // This step's copies are done (each thread's own), visible to the tensor cores'
        // proxy, and everyone's are done (the barrier).
        asm volatile("cp.async.wait_group %0;\n" :: "n"(STAGES - 3));
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        if (live) {{
            const unsigned a_s = smem + (step % STAGES) * STAGE_BYTES;
            fence_accumulators(acc);
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int kk = 0; kk < DEPTH / 16; ++kk) {{
                mma(acc, {a_desc}, {b_desc});
            }}
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            // The previous step's products are done: after the next barrier, its stage
            // is free for both warpgroups.
            asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
            fence_accumulators(acc);
        }}
        const int next = step + STAGES - 2;
        if (next < steps) {{
            const unsigned a_s = smem + (next % STAGES) * STAGE_BYTES, k0 = k_begin + next * DEPTH;
            {load_a};
            {load_b};
        }}
        asm volatile("cp.async.commit_group;\n" ::);
    }}
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    fence_accumulators(acc);
    // The epilogue stages the tile through shared memory (the pipeline's, free now) so that
    // the global stores are whole 16-byte row chunks. The accumulator fragment: thread l of
    // warp w holds rows w*16 + l/4 and that + 8, two adjacent columns in every group of 8.
    __syncthreads();
    unsigned char* tile_smem = smem_raw + (smem - (unsigned)__cvta_generic_to_shared(smem_raw))
        + wg * (64 * OUT_PITCH);
    {{
        const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
        const int row = warp * 16 + (lane >> 2), col = (lane & 3) * 2;
#pragma unroll
        for (int j = 0; j < TILE_N / 8; ++j) {{
#pragma unroll
            for (int half = 0; half < 2; ++half) {{
                *reinterpret_cast<{pair}*>(tile_smem + (row + half * 8) * OUT_PITCH + (col + j * 8) * 2) =
                    {pack}(acc[j * 4 + half * 2], acc[j * 4 + half * 2 + 1]);
            }}
        }}
    }}
    __syncthreads();
    const int chunks = TILE_N / 8;
    for (int i = threadIdx.x & 127; i < 64 * chunks; i += 128) {{
        const int r = i / chunks, c = i % chunks;
        const unsigned row = m0 + wg * 64 + r, col = n0 + c * 8;
        if (row < m_end && col < width) {{
            *reinterpret_cast<uint4*>(out + {out_row} + col) =
                *reinterpret_cast<const uint4*>(tile_smem + r * OUT_PITCH + c * 16);
        }}
    }}
}}
"#
        );
        s
    }

    /// `fence_accumulators` (keeps the compiler from moving accumulator reads or writes across
    /// the asynchronous products) and `mma` (one `m64n{tile_n}k16` product into `acc`).
    fn write_mma(&self, s: &mut String, ty: &str, a_mn: u32, b_mn: u32) {
        let n = self.tile_n;
        let regs = n / 2;
        let _ = write!(
            s,
            r#"__device__ __forceinline__ void fence_accumulators(float* acc) {{
#pragma unroll
    for (int i = 0; i < TILE_N / 2; ++i) asm volatile("" : "+f"(acc[i]) :: "memory");
}}

__device__ __forceinline__ void mma(float* acc, u64 a, u64 b) {{
    asm volatile("{{\n"
        "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} {{"#
        );
        let list: Vec<String> = (0..regs).map(|i| format!("%{i}")).collect();
        let _ = write!(
            s,
            "{}}}, %{regs}, %{}, 1, 1, 1, {a_mn}, {b_mn};\\n\"\n        \"}}\\n\"\n        : ",
            list.join(", "),
            regs + 1
        );
        let outs: Vec<String> = (0..regs).map(|i| format!("\"+f\"(acc[{i}])")).collect();
        let _ = write!(s, "{}\n        : \"l\"(a), \"l\"(b));\n}}\n", outs.join(", "));
    }
}
