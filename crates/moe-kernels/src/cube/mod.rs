//! The CubeCL kernels of the MoE dispatch for the cube backends (burn-cuda, burn-wgpu): one
//! implementation serves both, with and without burn's fusion.
//!
//! The expert segments stay packed back to back (`Segments`), so no row is padded: each
//! grouped-GEMM launch walks a host-built table of row tiles, one expert each. Three products
//! cover training: rows x weights (forward), rows x weights^T (row gradient, the same kernel on
//! a transposed view) and rows^T x gradient per segment (weight gradient). Around them: the
//! plan's in-expert ranks, the permute (a row gather) and the combine (a gather per token).
//! Aligned half-precision products on devices with asynchronous copies run the pipelined
//! kernel (`pipelined.rs`); every other case the general one (`kernel.rs`).

mod adamw;
mod attention;
mod caches;
mod causal_softmax;
mod flush;
#[cfg(feature = "cuda")]
mod hopper;
#[cfg(feature = "cuda")]
mod hopper_source;
mod kernel;
mod pipelined;
mod rms_norm;
mod rotary;
mod select;
mod split_k;
mod swiglu;

pub use caches::keep_kernel_caches_in;
pub use flush::FlushPolicy;
#[cfg(feature = "cuda")]
pub use hopper::{launch_rows_wgmma, launch_weight_grad_wgmma};

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, FloatDType, Int, Shape, Tensor, backend::Backend};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cubecl::ir::{StorageType, features::MmaConfig};
use cubecl::prelude::{ComputeClient, CubeCount, CubeDim};

use kernel::{
    COUNT_UNITS, DOT_PAIRS, DOT_UNITS, MODE_ROWS, MODE_WEIGHTS, RANK_UNITS, ROW_UNITS, Tiling, combine_rows,
    count_experts, gather_rows, grouped_gemm, pair_dots, place_pairs, place_rows, scan_experts,
};

use pipelined::{CHUNK, Pipeline, grouped_gemm_pipelined};

use crate::{
    AdamWStep, CapacityLimit, DispatchLayout, DispatchPlan, GateRule, Gated, KernelError, MoeBackend, ScoreFunction,
    Selection, float_primitive, float_tensor, portable,
};

/// The kernels on a backend's primitives: the two grouped products, given the rows each
/// expert owns (`segment_rows`, host), the in-expert ranks of the dispatch plan, the row
/// gather, the combine and its weight gradient. A fusion backend forwards them to its inner
/// backend.
pub trait MoeCubeKernels: Backend {
    /// `[rows, a] x [E, a, b] -> [rows, b]`, segment by segment.
    fn grouped_gemm(rows: FloatTensor<Self>, weights: FloatTensor<Self>, segment_rows: &[usize]) -> FloatTensor<Self>;

    /// `[rows, a], [rows, b] -> [E, a, b]`: each expert's `rows_e^T grad_e` (zeros when empty).
    fn grouped_gemm_weight_grad(
        rows: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        segment_rows: &[usize],
    ) -> FloatTensor<Self>;

    /// See [`crate::portable::PlanKernels::scan`]: `ids` `[T, K]`; (`[T K]`, `[num_experts + 2]`).
    fn scan_experts(ids: IntTensor<Self>, num_experts: usize) -> (IntTensor<Self>, IntTensor<Self>);

    /// See [`crate::portable::PlanKernels::place`]: (`[T K]`, `[rows]`).
    fn place_rows(
        ids: IntTensor<Self>,
        ranks: IntTensor<Self>,
        starts: IntTensor<Self>,
        kept: usize,
        rows: usize,
        padded: bool,
    ) -> (IntTensor<Self>, IntTensor<Self>);

    /// The router's pairs per expert, `[num_experts]`: `ids` any shape, every id in
    /// `0..num_experts`.
    fn count_experts(ids: IntTensor<Self>, num_experts: usize) -> IntTensor<Self>;

    /// `[rows]`: the value (`values` `[T, K]`) of the pair at each row of `row_of_pair` `[T, K]`,
    /// 0 for a row no pair fills; pairs at rows `>= rows` (dropped) are skipped.
    fn place_float(row_of_pair: IntTensor<Self>, values: FloatTensor<Self>, rows: usize) -> FloatTensor<Self>;

    /// `out[r] = x[source[r] - 1]` (`[rows, d]`), a zero row where `source[r]` is 0.
    fn gather_rows(x: FloatTensor<Self>, source: IntTensor<Self>) -> FloatTensor<Self>;

    /// `out[t] = sum_k weights[t, k] rows[row_of_pair[t K + k]]` (`[T, d]`), dropped pairs
    /// (rows past the end) skipped; `weights` in any float dtype.
    fn combine_rows(
        rows: FloatTensor<Self>,
        row_of_pair: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// `[T, K]` in `dtype`: each pair's `<rows[row_of_pair[t, k]], grad[t]>` (`rows`
    /// `[rows, d]`, `grad` `[T, d]`), summed in f32; 0 for a dropped pair (a row past the end).
    fn pair_dots(
        rows: FloatTensor<Self>,
        row_of_pair: IntTensor<Self>,
        grad: FloatTensor<Self>,
        dtype: DType,
    ) -> FloatTensor<Self>;

    /// [`Selection::select`] on `choice` `[T, E]` (f32): the ids `[T, K]`, exactly the
    /// portable ones.
    fn select_experts(choice: FloatTensor<Self>, selection: &Selection) -> IntTensor<Self>;

    /// The sigmoid gate on `logits` `[T, E]` and `bias` `[E]` (f32): scores `[T, E]`, ids
    /// `[T, K]` and weights `[T, K]`, as `GateRule::apply` computes them.
    fn gate_experts(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        rule: &GateRule,
    ) -> (FloatTensor<Self>, IntTensor<Self>, FloatTensor<Self>);

    /// The sigmoid gate's backward: the logits' gradient `[T, E]` from the forward's `scores`
    /// `[T, E]` and `ids` `[T, K]` and the weights' gradient `grad` `[T, K]` (f32), as
    /// `GateRule::weights_grad` computes it.
    fn gate_grad(
        scores: FloatTensor<Self>,
        ids: IntTensor<Self>,
        grad: FloatTensor<Self>,
        rule: &GateRule,
    ) -> FloatTensor<Self>;

    /// `silu(gate) * up` on `[n, h]` tensors of one float type.
    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradients of [`MoeCubeKernels::silu_mul`] from the output's `grad` (`gate`'s type):
    /// (`gate`'s, `up`'s).
    fn silu_mul_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `x^T grad` `[a, b]` for `x` `[rows, a]` and `grad` `[rows, b]` of one float type, as the
    /// grouped weight gradient over the row blocks `parts` (they add up to `rows`) and the sum
    /// of its partial products.
    fn dense_weight_grad(x: FloatTensor<Self>, grad: FloatTensor<Self>, parts: &[usize]) -> FloatTensor<Self>;

    /// AdamW's update of flat f32 tensors of one length (the contract is
    /// [`crate::adamw::adamw`]): the new parameter and moments.
    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: [FloatTensor<Self>; 2],
        step: &AdamWStep,
    ) -> [FloatTensor<Self>; 3];

    /// The rotary embedding of `x` `[b, h, l, r]` (any strides) by `cos`, `sin` (`[l, r / 2]`,
    /// f32): a contiguous tensor of `x`'s shape and dtype.
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        interleave: bool,
    ) -> FloatTensor<Self>;

    /// RMSNorm of the rows of `x` `[rows, d]` by `gamma` (`[d]`, f32), in `x`'s dtype.
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self>;

    /// The backward of [`MoeCubeKernels::rms_norm`] from `grad` (`x`'s dtype): (`x`'s gradient,
    /// `grad * x_hat` in f32, whose column sum is `gamma`'s gradient).
    fn rms_norm_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The causal softmax of `scale * scores` (`[sequences * l, l]`, row `r` is query `r % l`):
    /// probabilities in the scores' dtype, 0 past the query, computed in f32.
    fn causal_softmax(scores: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;

    /// The backward of [`MoeCubeKernels::causal_softmax`] from the same `scores` and the
    /// probabilities' gradient: (the probabilities, the scores' gradient), in the scores' dtype.
    fn causal_softmax_grad(
        scores: FloatTensor<Self>,
        grad_probs: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Whether the grouped products of `dtype` tensors on `device` run on tensor cores.
    fn tensor_cores(dtype: DType, device: &Self::Device) -> bool;
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> MoeCubeKernels for CubeBackend<R, F, I, BT> {
    fn grouped_gemm(rows: CubeTensor<R>, weights: CubeTensor<R>, segment_rows: &[usize]) -> CubeTensor<R> {
        #[cfg(feature = "cuda")]
        if let Some(out) = hopper::launch_rows_wgmma(&rows, &weights, segment_rows) {
            return out;
        }
        launch_rows(rows, weights, segment_rows, use_tensor_cores)
    }

    fn grouped_gemm_weight_grad(rows: CubeTensor<R>, grad: CubeTensor<R>, segment_rows: &[usize]) -> CubeTensor<R> {
        #[cfg(feature = "cuda")]
        if let Some(out) = hopper::launch_weight_grad_wgmma(&rows, &grad, segment_rows) {
            return out;
        }
        launch_weight_grad(rows, grad, segment_rows, use_tensor_cores)
    }

    fn scan_experts(ids: CubeTensor<R>, num_experts: usize) -> (CubeTensor<R>, CubeTensor<R>) {
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

    fn place_rows(
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

    fn count_experts(ids: CubeTensor<R>, num_experts: usize) -> CubeTensor<R> {
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

    fn place_float(row_of_pair: CubeTensor<R>, values: CubeTensor<R>, rows: usize) -> CubeTensor<R> {
        let row_of_pair = into_contiguous(row_of_pair);
        let out = zeros_client(values.client.clone(), values.device.clone(), Shape::new([rows]), values.dtype);
        let pairs = row_of_pair.meta.num_elements();
        if rows == 0 || pairs == 0 {
            return out;
        }
        let dtypes = [values.dtype.into(), row_of_pair.dtype.into()];
        place_pairs::launch(
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

    fn gather_rows(x: CubeTensor<R>, source: CubeTensor<R>) -> CubeTensor<R> {
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

    fn combine_rows(rows: CubeTensor<R>, row_of_pair: CubeTensor<R>, weights: CubeTensor<R>) -> CubeTensor<R> {
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

    fn pair_dots(rows: CubeTensor<R>, row_of_pair: CubeTensor<R>, grad: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
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

    fn select_experts(choice: CubeTensor<R>, selection: &Selection) -> CubeTensor<R> {
        select::launch_select(choice, selection, I::dtype())
    }

    fn gate_experts(
        logits: CubeTensor<R>,
        bias: CubeTensor<R>,
        rule: &GateRule,
    ) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
        select::launch_gate(logits, bias, rule, I::dtype())
    }

    fn gate_grad(scores: CubeTensor<R>, ids: CubeTensor<R>, grad: CubeTensor<R>, rule: &GateRule) -> CubeTensor<R> {
        select::launch_gate_grad(scores, ids, grad, rule)
    }

    fn silu_mul(gate: CubeTensor<R>, up: CubeTensor<R>) -> CubeTensor<R> {
        swiglu::launch_silu_mul(gate, up)
    }

    fn silu_mul_grad(gate: CubeTensor<R>, up: CubeTensor<R>, grad: CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>) {
        swiglu::launch_silu_mul_grad(gate, up, grad)
    }

    fn dense_weight_grad(x: CubeTensor<R>, grad: CubeTensor<R>, parts: &[usize]) -> CubeTensor<R> {
        let partials = Self::grouped_gemm_weight_grad(x, grad, parts);
        if parts.len() == 1 {
            let [a, b] = [partials.meta.shape()[1], partials.meta.shape()[2]];
            return burn_cubecl::ops::reshape(partials, Shape::new([a, b]));
        }
        split_k::launch_sum_parts(partials)
    }

    fn adamw(
        param: CubeTensor<R>,
        grad: CubeTensor<R>,
        [moment_1, moment_2]: [CubeTensor<R>; 2],
        step: &AdamWStep,
    ) -> [CubeTensor<R>; 3] {
        adamw::launch_adamw(param, grad, moment_1, moment_2, step)
    }

    fn rotary(x: CubeTensor<R>, cos: CubeTensor<R>, sin: CubeTensor<R>, interleave: bool) -> CubeTensor<R> {
        rotary::launch_rotary(x, cos, sin, interleave)
    }

    fn rms_norm(x: CubeTensor<R>, gamma: CubeTensor<R>, epsilon: f64) -> CubeTensor<R> {
        rms_norm::launch_rms_norm(x, gamma, epsilon)
    }

    fn rms_norm_grad(
        x: CubeTensor<R>,
        gamma: CubeTensor<R>,
        grad: CubeTensor<R>,
        epsilon: f64,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        rms_norm::launch_rms_norm_grad(x, gamma, grad, epsilon)
    }

    fn causal_softmax(scores: CubeTensor<R>, scale: f64) -> CubeTensor<R> {
        causal_softmax::launch_causal_softmax(scores, scale)
    }

    fn causal_softmax_grad(scores: CubeTensor<R>, grad_probs: CubeTensor<R>, scale: f64) -> (CubeTensor<R>, CubeTensor<R>) {
        causal_softmax::launch_causal_softmax_grad(scores, grad_probs, scale)
    }

    fn tensor_cores(dtype: DType, device: &R::Device) -> bool {
        tensor_cores_for(&R::client(device), dtype)
    }
}

/// Elements per vector of the row kernels over `[rows, width]` tensors: the most (up to 16
/// bytes) that divides every tensor's width and row stride, with contiguous rows and starts
/// on a vector boundary; 1 otherwise.
fn row_vector_size<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> usize {
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
fn flat_vector_size<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> usize {
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
fn row_cubes(elements: usize) -> CubeCount {
    cube_grid(elements.div_ceil(ROW_UNITS as usize) as u32)
}

/// `cubes` cubes, numbered `y * CUBE_COUNT_X + x`: a 2-D grid past the 65535 cubes a wgpu
/// dimension holds.
fn cube_grid(cubes: u32) -> CubeCount {
    let x = cubes.min(32768);
    CubeCount::Static(x, cubes.div_ceil(x), 1)
}

/// The plan's kernels on tensors, as [`portable::plan_with_kernels`] takes them.
fn plan_kernels<B: MoeCubeKernels>() -> portable::PlanKernels<B> {
    portable::PlanKernels {
        scan: |ids, experts| {
            let (ranks, summary) = B::scan_experts(ids.into_primitive(), experts);
            (Tensor::from_primitive(ranks), Tensor::from_primitive(summary))
        },
        place: |ids, ranks, starts, kept, rows, padded| {
            let (ids, ranks, starts) = (ids.into_primitive(), ranks.into_primitive(), starts.into_primitive());
            let (row_of_pair, source_of_row) = B::place_rows(ids, ranks, starts, kept, rows, padded);
            (Tensor::from_primitive(row_of_pair), Tensor::from_primitive(source_of_row))
        },
    }
}

/// The output tile one cube computes and, on the tensor-core path, the block each plane of it
/// computes, as `((rows, columns), (rows, columns))`. `MOE_GEMM_TILE=MxN` (M, N in 32, 64,
/// 128, 256; at most 8 planes) and `MOE_GEMM_WARP=MxN` (16, 32 or 64, dividing the tile) pick others for tuning;
/// otherwise 128x128 tiles of 64x64 plane blocks.
pub fn tile_shape() -> ((usize, usize), (usize, usize)) {
    static TILE: std::sync::OnceLock<((usize, usize), (usize, usize))> = std::sync::OnceLock::new();
    const DEFAULT: ((usize, usize), (usize, usize)) = ((128, 128), (64, 64));
    *TILE.get_or_init(|| {
        let parse = |name: &str| {
            let v = std::env::var(name).ok()?;
            let (m, n) = v.split_once('x')?;
            Some((m.parse::<usize>().ok()?, n.parse::<usize>().ok()?))
        };
        let set = std::env::var_os("MOE_GEMM_TILE").is_some() || std::env::var_os("MOE_GEMM_WARP").is_some();
        let tile = parse("MOE_GEMM_TILE").unwrap_or(DEFAULT.0);
        let warp = parse("MOE_GEMM_WARP").unwrap_or((tile.0.min(DEFAULT.1.0), tile.1.min(DEFAULT.1.1)));
        let tile_ok = |v: usize| [32, 64, 128, 256].contains(&v);
        let warp_ok = |v: usize, t: usize| [16, 32, 64].contains(&v) && t.is_multiple_of(v);
        let planes_ok = || (tile.0 / warp.0) * (tile.1 / warp.1) <= 8;
        if tile_ok(tile.0) && tile_ok(tile.1) && warp_ok(warp.0, tile.0) && warp_ok(warp.1, tile.1) && planes_ok() {
            (tile, warp)
        } else {
            // A bad value must not change results, only speed: say so and keep the default.
            if set {
                eprintln!(
                    "MOE_GEMM_TILE / MOE_GEMM_WARP must be MxN with the tile in 32, 64, 128, 256 and the warp in \
                     16, 32, 64 dividing it, at most 8 planes; using 128x128 / 64x64"
                );
            }
            DEFAULT
        }
    })
}

/// The launch tiling for the tile product `cmma` picks. The scalar product keeps 64x64 tiles
/// (128 units): 128x128 would need 512 units a cube, more than many Vulkan devices allow.
fn tiling(cmma: bool) -> Tiling {
    let ((tile_m, tile_n), (warp_m, warp_n)) = if cmma { tile_shape() } else { ((64, 64), (64, 64)) };
    Tiling { cmma, tile_m, tile_n, warp_m, warp_n }
}

/// Whether the cube backends use these kernels: `MOE_KERNELS=portable` makes them plan
/// `Padded` and run the portable burn-op path instead (the before/after of the benches).
pub fn kernels_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("MOE_KERNELS").map_or(true, |v| v != "portable"))
}

/// Whether the `cmma` path runs for this tensor's element type: half precision in, f32
/// accumulate, 16x16x16 fragments, planes of 32 (the kernel's 2x2 plane grid assumes it).
pub fn use_tensor_cores<R: CubeRuntime>(tensor: &CubeTensor<R>) -> bool {
    tensor_cores_for(&tensor.client, tensor.dtype)
}

/// [`use_tensor_cores`] for `dtype` on `client`'s device.
fn tensor_cores_for<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType) -> bool {
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

/// The rows-times-weights launch; `tensor_cores` picks the tile product (tests force either).
pub fn launch_rows<R: CubeRuntime>(
    rows: CubeTensor<R>,
    weights: CubeTensor<R>,
    segment_rows: &[usize],
    tensor_cores: impl Fn(&CubeTensor<R>) -> bool,
) -> CubeTensor<R> {
    let total = rows.meta.shape()[0];
    let n = weights.meta.shape()[2];
    let out =
        empty_device_contiguous_dtype(rows.client.clone(), rows.device.clone(), Shape::new([total, n]), rows.dtype);
    let cmma = tensor_cores(&rows);
    let tiling = tiling(cmma);
    let tile_m = tiling.tile_m;
    let table = row_tiles(segment_rows, tile_m);
    if table.is_empty() || n == 0 {
        return out;
    }
    let RowsLayout { aligned, b_depth_contiguous } = rows_layout(&rows, &weights);
    let pipe = pipeline([&rows, &weights], tiling, aligned, MODE_ROWS, b_depth_contiguous, n);
    let n_blocks = n.div_ceil(tiling.tile_n) as u32;
    // Row tiles run along y; a device's y limit (65535) splits very long tables.
    let max_y = rows.client.properties().hardware.max_cube_count.1 as usize;
    for chunk in table.chunks(max_y * 3) {
        let count = CubeCount::Static(n_blocks, (chunk.len() / 3) as u32, 1);
        launch_gemm(&rows, &weights, u32_tensor(&rows, chunk), &out, count, MODE_ROWS, tiling, pipe);
    }
    out
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

/// The weight-gradient launch: one cube per (column block, row block, expert).
pub fn launch_weight_grad<R: CubeRuntime>(
    rows: CubeTensor<R>,
    grad: CubeTensor<R>,
    segment_rows: &[usize],
    tensor_cores: impl Fn(&CubeTensor<R>) -> bool,
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
    let offsets: Vec<u32> = std::iter::once(0)
        .chain(segment_rows.iter().scan(0u32, |end, &count| {
            *end += count as u32;
            Some(*end)
        }))
        .collect();
    let cmma = tensor_cores(&rows);
    let tiling = tiling(cmma);
    let aligned = weight_grad_aligned(&rows, &grad);
    let pipe = pipeline([&rows, &grad], tiling, aligned, MODE_WEIGHTS, false, b);
    let count = CubeCount::Static(b.div_ceil(tiling.tile_n) as u32, a.div_ceil(tiling.tile_m) as u32, experts as u32);
    launch_gemm(&rows, &grad, u32_tensor(&rows, &offsets), &out, count, MODE_WEIGHTS, tiling, pipe);
    out
}

/// One grouped-GEMM launch: the pipelined kernel when `pipe` is set, the general one otherwise;
/// then cubecl's queue is handed on (`FlushPolicy`), so the GEMM starts while the host goes on.
#[allow(clippy::too_many_arguments)]
fn launch_gemm<R: CubeRuntime>(
    lhs: &CubeTensor<R>,
    rhs: &CubeTensor<R>,
    tiles: CubeTensor<R>,
    out: &CubeTensor<R>,
    count: CubeCount,
    mode: u32,
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
    flush::hand_on_launches::<R>(&lhs.device);
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
    let (depth, stages) = pipeline_depth();
    let pipe = Pipeline { tiling, depth, stages, b_depth_contiguous, store_whole: out_width.is_multiple_of(16) };
    (pipe.shared_bytes(mode) <= props.hardware.max_shared_memory_size).then_some(pipe)
}

/// Reduction depth per pipeline step and steps in flight: `MOE_GEMM_PIPE=DxS` (D in 16, 32,
/// 64; S in 2..=4) for tuning, otherwise 64 deep, 2 in flight (the best of a sweep on the
/// H200, docs/performance.md).
pub fn pipeline_depth() -> (usize, usize) {
    static PIPE: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();
    const DEFAULT: (usize, usize) = (64, 2);
    *PIPE.get_or_init(|| {
        let Ok(v) = std::env::var("MOE_GEMM_PIPE") else { return DEFAULT };
        let parsed = v.split_once('x').and_then(|(d, s)| Some((d.parse::<usize>().ok()?, s.parse::<usize>().ok()?)));
        match parsed {
            Some((d, s)) if [16, 32, 64].contains(&d) && (2..=4).contains(&s) => (d, s),
            _ => {
                // A bad value must not change results, only speed: say so and keep the default.
                eprintln!("MOE_GEMM_PIPE must be DxS with D in 16, 32, 64 and S in 2..=4; using 64x2");
                DEFAULT
            }
        }
    })
}

/// A small host table uploaded as a `u32` tensor on `like`'s device.
fn u32_tensor<R: CubeRuntime>(like: &CubeTensor<R>, values: &[u32]) -> CubeTensor<R> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let handle = like.client.create_from_slice(&bytes);
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), Shape::new([values.len()]), handle, DType::U32)
}

/// Whether a dense product `[rows, inner] x [inner, cols]` runs on the grouped GEMM: not
/// decode-sized (a handful of rows, where burn's matrix-vector kernels do better), and either on
/// tensor cores or narrow (the router's `[T, d] x [d, E]` and its two gradients in f32). A
/// narrow product is a small share of a step's work, and burn's matmul autotunes each new shape:
/// the router's three cost 87 compiled candidates of a cold first step on the H200.
fn dense_on_kernels<B: MoeCubeKernels>(
    rows: usize,
    inner: usize,
    cols: usize,
    dtype: DType,
    device: &B::Device,
) -> bool {
    const MIN_ROWS: usize = 64;
    const NARROW: usize = 128;
    kernels_enabled() && rows >= MIN_ROWS && (inner.min(cols) <= NARROW || B::tensor_cores(dtype, device))
}

/// The `MoeBackend` methods of a backend with [`MoeCubeKernels`]: the cube backends and their
/// fusion wrappers share them (one impl each, as the two types cannot share a blanket impl).
macro_rules! cube_moe_methods {
    () => {
        fn moe_plan(
            expert_ids: Tensor<Self, 2, Int>,
            priority: Option<Tensor<Self, 2>>,
            num_experts: usize,
            limit: CapacityLimit,
        ) -> Result<DispatchPlan<Self>, KernelError> {
            if !kernels_enabled() {
                return portable::plan(expert_ids, priority, num_experts, limit, DispatchLayout::Padded);
            }
            portable::plan_with_kernels(
                expert_ids,
                priority,
                num_experts,
                limit,
                Self::LAYOUT,
                Some(plan_kernels::<Self>()),
            )
        }

        fn moe_select_experts(choice: Tensor<Self, 2>, selection: &Selection) -> Tensor<Self, 2, Int> {
            if !kernels_enabled() {
                return selection.select(choice);
            }
            let choice = float_primitive(choice.cast(burn::tensor::FloatDType::F32));
            Tensor::from_primitive(Self::select_experts(choice, selection))
        }

        // One kernel for the sigmoid gate (ten tensor ops otherwise, each an operation
        // burn-fusion's thread works through); softmax keeps the ops.
        fn moe_gate(logits: Tensor<Self, 2>, bias: Tensor<Self, 1>, rule: &GateRule) -> Gated<Self> {
            if !kernels_enabled() || rule.score_function != ScoreFunction::Sigmoid {
                return rule.apply(logits, bias, Self::moe_select_experts);
            }
            let f32 = burn::tensor::FloatDType::F32;
            let (scores, ids, weights) =
                Self::gate_experts(float_primitive(logits.cast(f32)), float_primitive(bias.cast(f32)), rule);
            Gated {
                scores: float_tensor(scores),
                expert_ids: Tensor::from_primitive(ids),
                weights: float_tensor(weights),
            }
        }

        fn moe_gate_grad(
            scores: Tensor<Self, 2>,
            expert_ids: Tensor<Self, 2, Int>,
            grad_weights: Tensor<Self, 2>,
            rule: &GateRule,
        ) -> Tensor<Self, 2> {
            if !kernels_enabled() || rule.score_function != ScoreFunction::Sigmoid {
                return rule.weights_grad(scores, expert_ids, grad_weights);
            }
            let f32 = burn::tensor::FloatDType::F32;
            float_tensor(Self::gate_grad(
                float_primitive(scores.cast(f32)),
                expert_ids.into_primitive(),
                float_primitive(grad_weights.cast(f32)),
                rule,
            ))
        }

        fn moe_expert_counts(expert_ids: Tensor<Self, 2, Int>, num_experts: usize) -> Tensor<Self, 1, Int> {
            if !kernels_enabled() {
                return portable::count_experts(expert_ids, num_experts);
            }
            Tensor::from_primitive(Self::count_experts(expert_ids.into_primitive(), num_experts))
        }

        fn moe_permute(x: Tensor<Self, 2>, plan: &DispatchPlan<Self>) -> Tensor<Self, 2> {
            if !kernels_enabled() {
                return portable::permute(x, plan);
            }
            float_tensor(Self::gather_rows(float_primitive(x), plan.source_of_row.clone().into_primitive()))
        }

        fn moe_combine(rows: Tensor<Self, 2>, weights: Tensor<Self, 2>, plan: &DispatchPlan<Self>) -> Tensor<Self, 2> {
            if !kernels_enabled() {
                return portable::combine(rows, weights, plan);
            }
            // The kernel reads the router's f32 weights as they are: no cast launch.
            let row_of_pair = plan.row_of_pair.clone().into_primitive();
            float_tensor(Self::combine_rows(float_primitive(rows), row_of_pair, float_primitive(weights)))
        }

        fn moe_combine_grad(
            rows: Tensor<Self, 2>,
            weights: Tensor<Self, 2>,
            grad_out: Tensor<Self, 2>,
            plan: &DispatchPlan<Self>,
        ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
            if !kernels_enabled() {
                return portable::combine_grad(rows, weights, grad_out, plan);
            }
            let row_of_pair = plan.row_of_pair.clone().reshape([plan.tokens, plan.top_k]);
            let scaled = float_primitive(weights.clone().cast(grad_out.dtype()));
            let row_weight =
                float_tensor(Self::place_float(row_of_pair.clone().into_primitive(), scaled, rows.dims()[0]));
            let grad_rows = portable::combine_grad_rows(grad_out.clone(), plan, row_weight);
            let grad_weights = Self::pair_dots(
                float_primitive(rows),
                row_of_pair.into_primitive(),
                float_primitive(grad_out),
                weights.dtype(),
            );
            (grad_rows, float_tensor(grad_weights))
        }

        fn moe_grouped_matmul(
            rows: Tensor<Self, 2>,
            weights: Tensor<Self, 3>,
            plan: &DispatchPlan<Self>,
        ) -> Tensor<Self, 2> {
            if !kernels_enabled() {
                return portable::grouped_matmul(rows, weights, plan);
            }
            float_tensor(Self::grouped_gemm(float_primitive(rows), float_primitive(weights), plan.segment_rows()))
        }

        fn moe_grouped_matmul_grad_weights(
            rows: Tensor<Self, 2>,
            grad: Tensor<Self, 2>,
            plan: &DispatchPlan<Self>,
        ) -> Tensor<Self, 3> {
            if !kernels_enabled() {
                return portable::grouped_matmul_grad_weights(rows, grad, plan);
            }
            float_tensor(Self::grouped_gemm_weight_grad(
                float_primitive(rows),
                float_primitive(grad),
                plan.segment_rows(),
            ))
        }

        fn moe_silu_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
            if !kernels_enabled() {
                return portable::silu_mul(gate, up);
            }
            let up = up.cast(gate.dtype());
            float_tensor(Self::silu_mul(float_primitive(gate), float_primitive(up)))
        }

        fn moe_silu_mul_grad(
            gate: Tensor<Self, 2>,
            up: Tensor<Self, 2>,
            grad: Tensor<Self, 2>,
        ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
            if !kernels_enabled() {
                return portable::silu_mul_grad(gate, up, grad);
            }
            let (up, grad) = (up.cast(gate.dtype()), grad.cast(gate.dtype()));
            let (grad_gate, grad_up) =
                Self::silu_mul_grad(float_primitive(gate), float_primitive(up), float_primitive(grad));
            (float_tensor(grad_gate), float_tensor(grad_up))
        }

        fn moe_adamw(
            param: Tensor<Self, 1>,
            grad: Tensor<Self, 1>,
            moment_1: Tensor<Self, 1>,
            moment_2: Tensor<Self, 1>,
            step: &AdamWStep,
        ) -> [Tensor<Self, 1>; 3] {
            let f32_only = [&param, &grad, &moment_1, &moment_2].iter().all(|t| t.dtype() == DType::F32);
            if !kernels_enabled() || !f32_only {
                return crate::adamw::adamw(param, grad, moment_1, moment_2, step);
            }
            Self::adamw(
                float_primitive(param),
                float_primitive(grad),
                [float_primitive(moment_1), float_primitive(moment_2)],
                step,
            )
            .map(float_tensor)
        }

        fn moe_rotary(
            x: Tensor<Self, 4>,
            cos: Tensor<Self, 2>,
            sin: Tensor<Self, 2>,
            interleave: bool,
        ) -> Tensor<Self, 4> {
            if !kernels_enabled() {
                return crate::rotary::rotary(x, cos, sin, interleave);
            }
            let [cos, sin] = [cos, sin].map(|t| float_primitive(t.cast(FloatDType::F32)));
            float_tensor(Self::rotary(float_primitive(x), cos, sin, interleave))
        }

        fn moe_rms_norm(x: Tensor<Self, 2>, gamma: Tensor<Self, 1>, epsilon: f64) -> Tensor<Self, 2> {
            if !kernels_enabled() {
                return crate::rms_norm::rms_norm(x, gamma, epsilon);
            }
            let gamma = float_primitive(gamma.cast(FloatDType::F32));
            float_tensor(Self::rms_norm(float_primitive(x), gamma, epsilon))
        }

        fn moe_rms_norm_grad(
            x: Tensor<Self, 2>,
            gamma: Tensor<Self, 1>,
            grad: Tensor<Self, 2>,
            epsilon: f64,
        ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
            if !kernels_enabled() {
                return crate::rms_norm::rms_norm_grad(x, gamma, grad, epsilon);
            }
            let (dtype, gamma_dtype) = (x.dtype(), gamma.dtype());
            let gamma = float_primitive(gamma.cast(FloatDType::F32));
            let grad = float_primitive(grad.cast(dtype));
            let (grad_x, grad_normed) = Self::rms_norm_grad(float_primitive(x), gamma, grad, epsilon);
            let grad_gamma = float_tensor::<Self, 2>(grad_normed).sum_dim(0).squeeze_dim::<1>(0).cast(gamma_dtype);
            (float_tensor(grad_x), grad_gamma)
        }

        fn moe_dense_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
            // The grouped GEMM with one segment: faster than burn's matmul on tensor cores,
            // while the scalar tile product (f32, devices without them) is slower.
            let ([rows, inner], cols) = (x.dims(), w.dims()[1]);
            if !dense_on_kernels::<Self>(rows, inner, cols, x.dtype(), &x.device()) {
                return x.matmul(w);
            }
            let w = float_primitive(w.unsqueeze_dim::<3>(0));
            float_tensor(Self::grouped_gemm(float_primitive(x), w, &[rows]))
        }

        fn moe_causal_attention(
            q: Tensor<Self, 4>,
            k: Tensor<Self, 4>,
            v: Tensor<Self, 4>,
            scale: f64,
        ) -> Tensor<Self, 4> {
            if !attention::on_kernels(&q, &v) {
                return crate::attention::causal_attention(q, k, v, scale);
            }
            attention::forward(q, k, v, scale)
        }

        fn moe_causal_attention_grad(
            q: Tensor<Self, 4>,
            k: Tensor<Self, 4>,
            v: Tensor<Self, 4>,
            grad: Tensor<Self, 4>,
            scale: f64,
        ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
            if !attention::on_kernels(&q, &v) {
                return crate::attention::causal_attention_grad(q, k, v, grad, scale);
            }
            attention::backward(q, k, v, grad, scale)
        }

        fn moe_dense_matmul_grad_weights(x: Tensor<Self, 2>, grad: Tensor<Self, 2>) -> Tensor<Self, 2> {
            let ([rows, a], b) = (x.dims(), grad.dims()[1]);
            if !dense_on_kernels::<Self>(rows, a, b, x.dtype(), &x.device()) {
                return x.transpose().matmul(grad);
            }
            let grad = grad.cast(x.dtype());
            let parts = split_k::dense_weight_grad_parts(rows, a, b);
            float_tensor(Self::dense_weight_grad(float_primitive(x), float_primitive(grad), &parts))
        }

        fn moe_grouped_swiglu(
            rows: Tensor<Self, 2>,
            gate: Tensor<Self, 3>,
            up: Tensor<Self, 3>,
            down: Tensor<Self, 3>,
            plan: &DispatchPlan<Self>,
        ) -> Tensor<Self, 2> {
            portable::swiglu_by_grouped_matmuls(rows, gate, up, down, plan)
        }
    };
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> MoeBackend for CubeBackend<R, F, I, BT> {
    const LAYOUT: DispatchLayout = DispatchLayout::Segments;

    cube_moe_methods!();
}

/// Which kernel a fusion custom op runs, with its host-side arguments.
#[derive(Debug, Clone)]
enum Kernel {
    /// Inputs: rows, weights.
    Rows(Vec<usize>),
    /// Inputs: rows, gradient.
    WeightGrad(Vec<usize>),
    /// Inputs: x, source (int).
    Gather,
    /// Inputs: rows, row_of_pair (int), weights.
    Combine,
    /// Inputs: rows, row_of_pair (int), gradient; the output is of this dtype.
    PairDots(DType),
    /// Inputs: ids (int), over this many experts; two int outputs (ranks, summary).
    Scan(usize),
    /// Inputs: biased scores (f32); the output is int.
    Select(Selection),
    /// Inputs: logits, bias (f32); outputs scores (f32), ids (int), weights (f32).
    Gate(GateRule),
    /// Inputs: scores (f32), ids (int), the weights' gradient (f32).
    GateGrad(GateRule),
    /// Inputs: gate, up.
    SiluMul,
    /// Inputs: gate, up, gradient; two outputs (gate's and up's gradients).
    SiluMulGrad,
    /// Inputs: ids (int), over this many experts; the output is int.
    Count(usize),
    /// Inputs: row of each pair (int), values (float), into this many rows.
    Place(usize),
    /// Inputs: ids, ranks, segment starts (int), keeping `kept` pairs per expert, into `rows`
    /// rows (`padded`: some are padding); two int outputs (row of each pair, source of each row).
    PlaceRows { kept: usize, rows: usize, padded: bool },
    /// Inputs: x, gradient, split into these row blocks.
    DenseWeightGrad(Vec<usize>),
    /// Inputs: parameter, gradient, both moments; three outputs (parameter, moments).
    AdamW(AdamWStep),
    /// Inputs: x, cos, sin (f32); pairs interleaved or split in halves.
    Rotary(bool),
    /// Inputs: x, gamma (f32), with this epsilon.
    RmsNorm(f64),
    /// Inputs: x, gamma (f32), gradient; two outputs (x's gradient, `grad * x_hat` in f32).
    RmsNormGrad(f64),
    /// Inputs: scores, with this scale.
    CausalSoftmax(f64),
    /// Inputs: scores, the probabilities' gradient, with this scale; two outputs
    /// (probabilities, the scores' gradient).
    CausalSoftmaxGrad(f64),
}

impl Kernel {
    fn name(&self) -> &'static str {
        match self {
            Self::Rows(_) => "moe_grouped_gemm",
            Self::WeightGrad(_) => "moe_grouped_gemm_weight_grad",
            Self::Gather => "moe_gather_rows",
            Self::Combine => "moe_combine_rows",
            Self::PairDots(_) => "moe_pair_dots",
            Self::Scan(_) => "moe_scan_experts",
            Self::Select(_) => "moe_select_experts",
            Self::Gate(_) => "moe_gate",
            Self::GateGrad(_) => "moe_gate_grad",
            Self::SiluMul => "moe_silu_mul",
            Self::SiluMulGrad => "moe_silu_mul_grad",
            Self::Count(_) => "moe_count_experts",
            Self::Place(_) => "moe_place_pairs",
            Self::PlaceRows { .. } => "moe_place_rows",
            Self::DenseWeightGrad(_) => "moe_dense_weight_grad",
            Self::AdamW(_) => "moe_adamw",
            Self::Rotary(_) => "moe_rotary",
            Self::RmsNorm(_) => "moe_rms_norm",
            Self::RmsNormGrad(_) => "moe_rms_norm_grad",
            Self::CausalSoftmax(_) => "moe_causal_softmax",
            Self::CausalSoftmaxGrad(_) => "moe_causal_softmax_grad",
        }
    }
}

/// A kernel as an operation in burn-fusion's stream: the inner backend runs it when the
/// stream reaches it; registering it wakes the stream's thread (`FlushPolicy`) but forces no
/// host sync.
#[derive(Debug, Clone)]
struct KernelOp<B> {
    desc: CustomOpIr,
    kernel: Kernel,
    _backend: std::marker::PhantomData<B>,
}

impl<B: FusionBackend + MoeCubeKernels> Operation<B::FusionRuntime> for KernelOp<B> {
    fn execute(&self, handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let out = self.desc.outputs[0].id;
        let inputs = &self.desc.inputs;
        let float = |handles: &mut HandleContainer<_>, i: usize| handles.get_float_tensor::<B>(&inputs[i]);
        let int = |handles: &mut HandleContainer<_>, i: usize| handles.get_int_tensor::<B>(&inputs[i]);
        let result = match &self.kernel {
            Kernel::Rows(segments) => B::grouped_gemm(float(handles, 0), float(handles, 1), segments),
            Kernel::WeightGrad(segments) => B::grouped_gemm_weight_grad(float(handles, 0), float(handles, 1), segments),
            Kernel::Gather => B::gather_rows(float(handles, 0), int(handles, 1)),
            Kernel::Combine => B::combine_rows(float(handles, 0), int(handles, 1), float(handles, 2)),
            Kernel::PairDots(dtype) => B::pair_dots(float(handles, 0), int(handles, 1), float(handles, 2), *dtype),
            Kernel::Place(rows) => B::place_float(int(handles, 0), float(handles, 1), *rows),
            Kernel::GateGrad(rule) => B::gate_grad(float(handles, 0), int(handles, 1), float(handles, 2), rule),
            Kernel::SiluMul => B::silu_mul(float(handles, 0), float(handles, 1)),
            Kernel::SiluMulGrad => {
                let (grad_gate, grad_up) = B::silu_mul_grad(float(handles, 0), float(handles, 1), float(handles, 2));
                handles.register_float_tensor::<B>(&out, grad_gate);
                return handles.register_float_tensor::<B>(&self.desc.outputs[1].id, grad_up);
            }
            Kernel::Scan(experts) => {
                let (ranks, summary) = B::scan_experts(int(handles, 0), *experts);
                handles.register_int_tensor::<B>(&out, ranks);
                return handles.register_int_tensor::<B>(&self.desc.outputs[1].id, summary);
            }
            Kernel::PlaceRows { kept, rows, padded } => {
                let (row_of_pair, source_of_row) =
                    B::place_rows(int(handles, 0), int(handles, 1), int(handles, 2), *kept, *rows, *padded);
                handles.register_int_tensor::<B>(&out, row_of_pair);
                return handles.register_int_tensor::<B>(&self.desc.outputs[1].id, source_of_row);
            }
            Kernel::Select(selection) => {
                let ids = B::select_experts(float(handles, 0), selection);
                return handles.register_int_tensor::<B>(&out, ids);
            }
            Kernel::Gate(rule) => {
                let (scores, ids, weights) = B::gate_experts(float(handles, 0), float(handles, 1), rule);
                handles.register_float_tensor::<B>(&out, scores);
                handles.register_int_tensor::<B>(&self.desc.outputs[1].id, ids);
                return handles.register_float_tensor::<B>(&self.desc.outputs[2].id, weights);
            }
            Kernel::DenseWeightGrad(parts) => B::dense_weight_grad(float(handles, 0), float(handles, 1), parts),
            Kernel::Rotary(interleave) => {
                B::rotary(float(handles, 0), float(handles, 1), float(handles, 2), *interleave)
            }
            Kernel::RmsNorm(epsilon) => B::rms_norm(float(handles, 0), float(handles, 1), *epsilon),
            Kernel::RmsNormGrad(epsilon) => {
                let (grad_x, grad_normed) =
                    B::rms_norm_grad(float(handles, 0), float(handles, 1), float(handles, 2), *epsilon);
                handles.register_float_tensor::<B>(&out, grad_x);
                return handles.register_float_tensor::<B>(&self.desc.outputs[1].id, grad_normed);
            }
            Kernel::CausalSoftmax(scale) => B::causal_softmax(float(handles, 0), *scale),
            Kernel::CausalSoftmaxGrad(scale) => {
                let (probs, grad_scores) = B::causal_softmax_grad(float(handles, 0), float(handles, 1), *scale);
                handles.register_float_tensor::<B>(&out, probs);
                return handles.register_float_tensor::<B>(&self.desc.outputs[1].id, grad_scores);
            }
            Kernel::AdamW(step) => {
                let moments = [float(handles, 2), float(handles, 3)];
                let outputs = B::adamw(float(handles, 0), float(handles, 1), moments, step);
                for (ir, tensor) in self.desc.outputs.iter().zip(outputs) {
                    handles.register_float_tensor::<B>(&ir.id, tensor);
                }
                return;
            }
            Kernel::Count(experts) => {
                let counts = B::count_experts(int(handles, 0), *experts);
                return handles.register_int_tensor::<B>(&out, counts);
            }
        };
        handles.register_float_tensor::<B>(&out, result);
    }
}

/// Registers `kernel(inputs)` with an output of `shape` and `dtype` (the first input's when
/// `None`) in the fusion stream.
fn fused<B: FusionBackend + MoeCubeKernels>(
    kernel: Kernel,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    shape: Shape,
    dtype: Option<DType>,
) -> FusionTensor<B::FusionRuntime> {
    let dtype = dtype.unwrap_or(inputs[0].dtype);
    let [out] = fused_outputs::<B, 1>(kernel, inputs, [(shape, dtype)]);
    out
}

/// [`fused`] for a kernel with `N` outputs of the given shapes and dtypes.
fn fused_outputs<B: FusionBackend + MoeCubeKernels, const N: usize>(
    kernel: Kernel,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    outputs: [(Shape, DType); N],
) -> [FusionTensor<B::FusionRuntime>; N] {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outs = outputs.map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype));
    let irs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new(kernel.name(), &irs, &outs);
    let op = KernelOp::<B> { desc: desc.clone(), kernel, _backend: std::marker::PhantomData };
    let outputs = client.register(streams, OperationIr::Custom(desc), op).outputs();
    // Wake fusion's thread rather than leave the kernel queued until 32 operations or a sync.
    if FlushPolicy::current().flushes_fusion() {
        client.flush_queue();
    }
    outputs
}

impl<B: FusionBackend + MoeCubeKernels> MoeCubeKernels for Fusion<B> {
    fn grouped_gemm(rows: FloatTensor<Self>, weights: FloatTensor<Self>, segment_rows: &[usize]) -> FloatTensor<Self> {
        let shape = Shape::new([rows.shape[0], weights.shape[2]]);
        fused::<B>(Kernel::Rows(segment_rows.to_vec()), vec![rows, weights], shape, None)
    }

    fn grouped_gemm_weight_grad(
        rows: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        segment_rows: &[usize],
    ) -> FloatTensor<Self> {
        let shape = Shape::new([segment_rows.len(), rows.shape[1], grad.shape[1]]);
        fused::<B>(Kernel::WeightGrad(segment_rows.to_vec()), vec![rows, grad], shape, None)
    }

    fn scan_experts(ids: IntTensor<Self>, num_experts: usize) -> (IntTensor<Self>, IntTensor<Self>) {
        let (pairs, dtype) = (ids.shape.num_elements(), ids.dtype);
        let outputs = [(Shape::new([pairs]), dtype), (Shape::new([num_experts + 2]), dtype)];
        let [ranks, summary] = fused_outputs::<B, 2>(Kernel::Scan(num_experts), vec![ids], outputs);
        (ranks, summary)
    }

    fn place_rows(
        ids: IntTensor<Self>,
        ranks: IntTensor<Self>,
        starts: IntTensor<Self>,
        kept: usize,
        rows: usize,
        padded: bool,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        let (pairs, dtype) = (ids.shape.num_elements(), ids.dtype);
        let outputs = [(Shape::new([pairs]), dtype), (Shape::new([rows]), dtype)];
        let kernel = Kernel::PlaceRows { kept, rows, padded };
        let [row_of_pair, source_of_row] = fused_outputs::<B, 2>(kernel, vec![ids, ranks, starts], outputs);
        (row_of_pair, source_of_row)
    }

    fn count_experts(ids: IntTensor<Self>, num_experts: usize) -> IntTensor<Self> {
        fused::<B>(Kernel::Count(num_experts), vec![ids], Shape::new([num_experts]), None)
    }

    fn place_float(row_of_pair: IntTensor<Self>, values: FloatTensor<Self>, rows: usize) -> FloatTensor<Self> {
        let dtype = Some(values.dtype);
        fused::<B>(Kernel::Place(rows), vec![row_of_pair, values], Shape::new([rows]), dtype)
    }

    fn gather_rows(x: FloatTensor<Self>, source: IntTensor<Self>) -> FloatTensor<Self> {
        let shape = Shape::new([source.shape[0], x.shape[1]]);
        fused::<B>(Kernel::Gather, vec![x, source], shape, None)
    }

    fn combine_rows(
        rows: FloatTensor<Self>,
        row_of_pair: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let shape = Shape::new([weights.shape[0], rows.shape[1]]);
        fused::<B>(Kernel::Combine, vec![rows, row_of_pair, weights], shape, None)
    }

    fn pair_dots(
        rows: FloatTensor<Self>,
        row_of_pair: IntTensor<Self>,
        grad: FloatTensor<Self>,
        dtype: DType,
    ) -> FloatTensor<Self> {
        let shape = row_of_pair.shape.clone();
        fused::<B>(Kernel::PairDots(dtype), vec![rows, row_of_pair, grad], shape, Some(dtype))
    }

    fn gate_grad(
        scores: FloatTensor<Self>,
        ids: IntTensor<Self>,
        grad: FloatTensor<Self>,
        rule: &GateRule,
    ) -> FloatTensor<Self> {
        let shape = scores.shape.clone();
        fused::<B>(Kernel::GateGrad(*rule), vec![scores, ids, grad], shape, Some(DType::F32))
    }

    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = gate.shape.clone();
        fused::<B>(Kernel::SiluMul, vec![gate, up], shape, None)
    }

    fn silu_mul_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let output = (gate.shape.clone(), gate.dtype);
        let [grad_gate, grad_up] =
            fused_outputs::<B, 2>(Kernel::SiluMulGrad, vec![gate, up, grad], [output.clone(), output]);
        (grad_gate, grad_up)
    }

    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        [moment_1, moment_2]: [FloatTensor<Self>; 2],
        step: &AdamWStep,
    ) -> [FloatTensor<Self>; 3] {
        let shape = param.shape.clone();
        let outputs = [0; 3].map(|_| (shape.clone(), DType::F32));
        fused_outputs::<B, 3>(Kernel::AdamW(*step), vec![param, grad, moment_1, moment_2], outputs)
    }

    fn dense_weight_grad(x: FloatTensor<Self>, grad: FloatTensor<Self>, parts: &[usize]) -> FloatTensor<Self> {
        let shape = Shape::new([x.shape[1], grad.shape[1]]);
        fused::<B>(Kernel::DenseWeightGrad(parts.to_vec()), vec![x, grad], shape, None)
    }

    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        interleave: bool,
    ) -> FloatTensor<Self> {
        let shape = x.shape.clone();
        fused::<B>(Kernel::Rotary(interleave), vec![x, cos, sin], shape, None)
    }

    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        let shape = x.shape.clone();
        fused::<B>(Kernel::RmsNorm(epsilon), vec![x, gamma], shape, None)
    }

    fn rms_norm_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (shape, dtype) = (x.shape.clone(), x.dtype);
        let [grad_x, grad_normed] = fused_outputs::<B, 2>(
            Kernel::RmsNormGrad(epsilon),
            vec![x, gamma, grad],
            [(shape.clone(), dtype), (shape, DType::F32)],
        );
        (grad_x, grad_normed)
    }

    fn causal_softmax(scores: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        let shape = scores.shape.clone();
        fused::<B>(Kernel::CausalSoftmax(scale), vec![scores], shape, None)
    }

    fn causal_softmax_grad(
        scores: FloatTensor<Self>,
        grad_probs: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let output = (scores.shape.clone(), scores.dtype);
        let [probs, grad_scores] =
            fused_outputs::<B, 2>(Kernel::CausalSoftmaxGrad(scale), vec![scores, grad_probs], [output.clone(), output]);
        (probs, grad_scores)
    }

    fn tensor_cores(dtype: DType, device: &Self::Device) -> bool {
        B::tensor_cores(dtype, device)
    }

    fn select_experts(choice: FloatTensor<Self>, selection: &Selection) -> IntTensor<Self> {
        let shape = Shape::new([choice.shape[0], selection.top_k]);
        fused::<B>(
            Kernel::Select(*selection),
            vec![choice],
            shape,
            Some(<B::IntElem as burn::tensor::Element>::dtype()),
        )
    }

    fn gate_experts(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        rule: &GateRule,
    ) -> (FloatTensor<Self>, IntTensor<Self>, FloatTensor<Self>) {
        let [tokens, experts] = [logits.shape[0], logits.shape[1]];
        let top_k = rule.selection.top_k;
        let outputs = [
            (Shape::new([tokens, experts]), DType::F32),
            (Shape::new([tokens, top_k]), <B::IntElem as burn::tensor::Element>::dtype()),
            (Shape::new([tokens, top_k]), DType::F32),
        ];
        let [scores, ids, weights] = fused_outputs::<B, 3>(Kernel::Gate(*rule), vec![logits, bias], outputs);
        (scores, ids, weights)
    }
}

impl<B: FusionBackend + MoeCubeKernels + MoeBackend> MoeBackend for Fusion<B> {
    const LAYOUT: DispatchLayout = B::LAYOUT;

    cube_moe_methods!();
}
