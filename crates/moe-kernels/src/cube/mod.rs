//! The CubeCL kernels of the MoE dispatch for the cube backends (burn-cuda, burn-wgpu): one
//! implementation serves both, with and without burn's fusion.
//!
//! [`MoeCubeKernels`] is the kernels on a backend's primitives; `backend.rs` implements it on
//! the cube backends, `fusion.rs` on their fusion wrappers (a custom operation in fusion's
//! stream), and `moe_backend.rs` builds the `MoeBackend` methods of both on it. The kernels:
//! `gemm/` the grouped GEMM (with the one place that picks a launch's kernel), `dispatch.rs`
//! the glue around it (the plan's ranks and rows, counts, the permute, the combine and its
//! weight gradient), `gate.rs` the router's gate and selection, `swiglu.rs`, `rms_norm.rs`,
//! `rotary.rs`, `attention.rs` with `causal_softmax.rs`, `adamw.rs`. `settings.rs` reads every
//! `MOE_*` variable once; `launch.rs` holds the launch geometry the row kernels share,
//! `reduce.rs` their shared-memory reductions, `flush.rs` when queued work is handed on and
//! `caches.rs` where cubecl keeps compiled kernels and autotune results.

mod adamw;
mod attention;
mod backend;
mod caches;
mod causal_softmax;
mod dispatch;
mod flush;
mod fusion;
mod gate;
mod gemm;
mod launch;
mod moe_backend;
mod reduce;
mod rms_norm;
mod rotary;
mod settings;
mod swiglu;

pub use caches::keep_kernel_caches_in;
pub use flush::FlushPolicy;
pub use gemm::{launch_rows, launch_weight_grad, use_tensor_cores};
#[cfg(feature = "cuda")]
pub use gemm::{launch_rows_wgmma, launch_weight_grad_wgmma};
pub use settings::{Settings, kernels_enabled, settings};

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};

use crate::{AdamWStep, GateRule, Selection};

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
    fn place_pair_values(row_of_pair: IntTensor<Self>, values: FloatTensor<Self>, rows: usize) -> FloatTensor<Self>;

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
