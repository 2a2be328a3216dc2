//! Launching the Hopper grouped GEMM (`wgmma_source.rs`) through cubecl's compute client.
//!
//! cubecl compiles a kernel by asking its task for CUDA text; this task answers with the
//! `wgmma` kernel's text. The shared-memory size cubecl reserves at launch comes from the
//! representation of a small `#[cube]` kernel that only declares that much shared memory,
//! compiled by the same call. The launch takes the four buffers in the kernel's parameter
//! order; sizes and strides travel in the tile table's header.
//!
//! It runs where the product is Hopper's (sm_90: `wgmma` exists on no other architecture),
//! on 2-byte operands whose rows start on 16-byte boundaries, and unless `MOE_WGMMA=off`;
//! every other launch takes the cube kernels.

use std::any::Any;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::{CudaCompiler, CudaRuntime};
use cubecl::ir::features::Tma;
use cubecl::prelude::*;
use cubecl::server::KernelArguments;
use cubecl::{CompilationError, Compiler, CubeTask};

use super::general::{MODE_ROWS, MODE_WEIGHTS};
use super::pipelined::CHUNK;
use super::wgmma_source::{HEADER, HopperGemm, THREADS, TILE_M};
use super::{RowsLayout, row_tiles, rows_layout, weight_grad_aligned};
use crate::cube::flush::hand_on_launches;
use crate::cube::launch::u32_tensor;
use crate::cube::settings::settings;

/// Output columns of one cube and shared-memory stages: the best of a sweep on the H200
/// (commit 7059ed6; docs/performance.md, "What moved the numbers").
const TILE_N: usize = 256;
const STAGES: usize = 4;

/// `rows [N, k] x weights[e] [k, n]` per expert segment on the Hopper kernel, or `None` where it
/// does not run (then the cube kernels do).
pub fn launch_rows_wgmma<R: CubeRuntime>(
    rows: &CubeTensor<R>,
    weights: &CubeTensor<R>,
    segment_rows: &[usize],
) -> Option<CubeTensor<R>> {
    let launch = WgmmaLaunch::new(MODE_ROWS, rows, weights, segment_rows)?;
    let [total, n] = [rows.meta.shape()[0], weights.meta.shape()[2]];
    let out =
        empty_device_contiguous_dtype(rows.client.clone(), rows.device.clone(), Shape::new([total, n]), rows.dtype);
    launch.rows(rows, weights, segment_rows, &out);
    Some(out)
}

/// `[N, a], [N, b] -> [E, a, b]`: each expert's `rows_e^T grad_e` on the Hopper kernel, or
/// `None` where it does not run.
pub fn launch_weight_grad_wgmma<R: CubeRuntime>(
    rows: &CubeTensor<R>,
    grad: &CubeTensor<R>,
    segment_rows: &[usize],
) -> Option<CubeTensor<R>> {
    let launch = WgmmaLaunch::new(MODE_WEIGHTS, rows, grad, segment_rows)?;
    let shape = Shape::new([segment_rows.len(), rows.meta.shape()[1], grad.meta.shape()[1]]);
    let out = empty_device_contiguous_dtype(rows.client.clone(), rows.device.clone(), shape, rows.dtype);
    launch.weight_grad(rows, grad, &out);
    Some(out)
}

/// What a launch of the Hopper kernel needs, for operands it runs on: the CUDA client, the
/// table's start (the header; for the weight gradient also the segment ends) and whether the
/// weights' depth is contiguous.
pub(super) struct WgmmaLaunch {
    client: ComputeClient<CudaRuntime>,
    table: Vec<u32>,
    b_depth_contiguous: bool,
}

impl WgmmaLaunch {
    /// The launch of a `mode` product on `lhs` and `rhs`, or `None` where the kernel does not
    /// run: not Hopper, not 2-byte aligned operands, sizes past u32, or `MOE_WGMMA=off`.
    pub(super) fn new<R: CubeRuntime>(
        mode: u32,
        lhs: &CubeTensor<R>,
        rhs: &CubeTensor<R>,
        segment_rows: &[usize],
    ) -> Option<Self> {
        if !settings().wgmma {
            return None;
        }
        let (ls, rs) = (lhs.meta.strides(), rhs.meta.strides());
        if mode == MODE_ROWS {
            let [_, k] = lhs.meta.shape()[..] else { return None };
            let [_, _, n] = rhs.meta.shape()[..] else { return None };
            let RowsLayout { aligned, b_depth_contiguous } = rows_layout(lhs, rhs);
            // The epilogue stores whole 16-byte chunks of output rows, whatever the weights' layout.
            if !aligned || !n.is_multiple_of(CHUNK) {
                return None;
            }
            let client = cuda_client([lhs, rhs])?;
            let b_ld = if b_depth_contiguous { rs[2] } else { rs[1] };
            let table = header(&[k, n, ls[0], rs[0], b_ld])?.to_vec();
            return Some(Self { client, table, b_depth_contiguous });
        }
        let [_, a] = lhs.meta.shape()[..] else { return None };
        let [_, b] = rhs.meta.shape()[..] else { return None };
        if !weight_grad_aligned(lhs, rhs) || segment_rows.is_empty() || a == 0 || b == 0 {
            return None;
        }
        let client = cuda_client([lhs, rhs])?;
        let mut table = header(&[a, b, ls[0], rs[0]])?.to_vec();
        let mut end = 0u32;
        table.push(0);
        for &count in segment_rows {
            end = end.checked_add(u32::try_from(count).ok()?)?;
            table.push(end);
        }
        Some(Self { client, table, b_depth_contiguous: false })
    }

    /// The rows-times-weights product into `out` `[N, n]`.
    pub(super) fn rows<R: CubeRuntime>(
        &self,
        rows: &CubeTensor<R>,
        weights: &CubeTensor<R>,
        segment_rows: &[usize],
        out: &CubeTensor<R>,
    ) {
        let n = weights.meta.shape()[2];
        let tiles = row_tiles(segment_rows, TILE_M);
        if tiles.is_empty() || n == 0 {
            return;
        }
        let gemm = HopperGemm {
            half: rows.dtype == DType::F16,
            rows: true,
            b_depth_contiguous: self.b_depth_contiguous,
            tile_n: TILE_N,
            stages: STAGES,
        };
        let n_blocks = n.div_ceil(TILE_N) as u32;
        // Row tiles run along y; a device's y limit (65535) splits very long tables.
        let max_y = rows.client.properties().hardware.max_cube_count.1 as usize;
        for chunk in tiles.chunks(max_y * 3) {
            let table = [&self.table[..], chunk].concat();
            let count = CubeCount::Static(n_blocks, (chunk.len() / 3) as u32, 1);
            launch(&self.client, gemm, [rows, weights], &table, out, count);
        }
    }

    /// The weight gradient into `out` `[E, a, b]`.
    pub(super) fn weight_grad<R: CubeRuntime>(&self, rows: &CubeTensor<R>, grad: &CubeTensor<R>, out: &CubeTensor<R>) {
        let [experts, a, b] = [out.meta.shape()[0], out.meta.shape()[1], out.meta.shape()[2]];
        let gemm = HopperGemm {
            half: rows.dtype == DType::F16,
            rows: false,
            b_depth_contiguous: false,
            tile_n: TILE_N,
            stages: STAGES,
        };
        let count = CubeCount::Static(b.div_ceil(TILE_N) as u32, a.div_ceil(TILE_M) as u32, experts as u32);
        launch(&self.client, gemm, [rows, grad], &self.table, out, count);
    }
}

/// The operands' CUDA client where the kernel runs for them: a Hopper device (sm_90: TMA but
/// not Blackwell's wide im2col), 2-byte elements, 16-byte-aligned starts.
fn cuda_client<R: CubeRuntime>(operands: [&CubeTensor<R>; 2]) -> Option<ComputeClient<CudaRuntime>> {
    let first = operands[0];
    let half = matches!(first.dtype, DType::BF16 | DType::F16) && operands[1].dtype == first.dtype;
    let starts = operands.iter().all(|t| t.handle.offset_start.unwrap_or(0).is_multiple_of(16));
    if !half || !starts {
        return None;
    }
    let client = (&first.client as &dyn Any).downcast_ref::<ComputeClient<CudaRuntime>>()?;
    let tma = client.properties().features.tma;
    (tma.contains(Tma::Base) && !tma.contains(Tma::Im2colWide)).then(|| client.clone())
}

/// The table's header: sizes and strides as u32 (`None` when one does not fit).
fn header(values: &[usize]) -> Option<[u32; HEADER]> {
    let mut out = [0u32; HEADER];
    for (slot, &v) in out.iter_mut().zip(values) {
        *slot = u32::try_from(v).ok()?;
    }
    Some(out)
}

/// One launch on `out`, then cubecl's queue is handed on (`FlushPolicy`), as the cube GEMM's.
fn launch<R: CubeRuntime>(
    client: &ComputeClient<CudaRuntime>,
    gemm: HopperGemm,
    [lhs, rhs]: [&CubeTensor<R>; 2],
    table: &[u32],
    out: &CubeTensor<R>,
    count: CubeCount,
) {
    let table = u32_tensor(lhs, table);
    let mut arguments = KernelArguments::new();
    arguments.buffers = [lhs, rhs, &table, out].map(|t| t.handle.clone().binding()).to_vec();
    let (source, text_hash) = source_of(gemm);
    let task = WgmmaTask { gemm, source, text_hash, client: client.clone() };
    client.launch(Box::new(task), count, arguments);
    hand_on_launches::<R>(&lhs.device);
}

/// The compile step cubecl runs once per variant: the shared-memory shell's compiled form
/// with the `wgmma` kernel's text and entry point.
struct WgmmaTask {
    gemm: HopperGemm,
    source: Arc<String>,
    text_hash: u64,
    client: ComputeClient<CudaRuntime>,
}

/// A variant's text and a hash of it, built once per process: a launch only looks them up
/// (building the text per launch cost the host about 0.1 ms, a tenth of a small layer's
/// forward and backward).
fn source_of(gemm: HopperGemm) -> (Arc<String>, u64) {
    type Texts = HashMap<HopperGemm, (Arc<String>, u64)>;
    static SOURCES: OnceLock<Mutex<Texts>> = OnceLock::new();
    let mut sources = SOURCES.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    sources
        .entry(gemm)
        .or_insert_with(|| {
            let text = gemm.source();
            let mut hasher = DefaultHasher::new();
            text.hash(&mut hasher);
            (Arc::new(text), hasher.finish())
        })
        .clone()
}

impl KernelMetadata for WgmmaTask {
    fn id(&self) -> KernelId {
        // The text's hash keys the compiled-kernel cache, so an edited kernel never meets a
        // stale entry.
        KernelId::new::<Self>().cube_dim(CubeDim::new_1d(THREADS)).info((self.gemm, self.text_hash))
    }

    fn address_type(&self) -> StorageType {
        AddressType::U32.unsigned_type()
    }
}

impl CubeTask<CudaCompiler> for WgmmaTask {
    fn compile(
        &self,
        compiler: &mut CudaCompiler,
        options: &<CudaCompiler as Compiler>::CompilationOptions,
        mode: ExecutionMode,
        address_type: StorageType,
    ) -> Result<CompiledKernel<CudaCompiler>, CompilationError> {
        let settings = KernelSettings::default().cube_dim(CubeDim::new_1d(THREADS));
        let words = self.gemm.shared_bytes().div_ceil(4);
        let shell = wgmma_shared::WgmmaShared::<CudaRuntime>::new(settings, self.client.clone(), words);
        let mut compiled = KernelTask::<CudaCompiler, _>::new(shell).compile(compiler, options, mode, address_type)?;
        compiled.source = self.source.to_string();
        compiled.entrypoint_name = self.gemm.name();
        Ok(compiled)
    }
}

/// Declares `words` u32 of shared memory and nothing else of note: its compiled form tells
/// cubecl how much dynamic shared memory the `wgmma` kernel launches with.
#[cube(launch)]
fn wgmma_shared(#[comptime] words: usize) {
    let mut smem = SharedMemory::<u32>::new(words);
    smem[UNIT_POS as usize] = UNIT_POS;
}
