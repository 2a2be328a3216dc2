//! The router's expert selection as one kernel: what `crate::Selection::select` computes
//! with about ten tensor ops per chosen expert (and as many again per group), here one unit per
//! token in one pass over its scores (two with groups). The gate kernel does the whole sigmoid
//! gate around it (scores, selection, weights), which the portable gate runs as ten tensor ops.
//!
//! It must return exactly the portable ids: NaN counts as `-inf`, ties go to the lower id (of
//! experts and of groups), a group's score is the sum of its `group_score_topk` largest
//! entries counting tied values once each, and experts outside the kept groups are `-inf`, so
//! they are chosen (lowest id first) only when fewer than `K` others are left.

use crate::{GateRule, Selection};
use burn::tensor::Shape;
use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// The selection's comptime parameters (one kernel per router shape).
#[derive(CubeType, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SelectSpec {
    top_k: usize,
    num_groups: usize,
    topk_groups: usize,
    group_score_topk: usize,
}

/// Units per cube: one token each.
const SELECT_UNITS: u32 = 128;

/// One entry of a running top-n list: `valid` is 1 for a finite or `+inf` score, 0 for what
/// the portable rule treats as `-inf` (NaN, `-inf`, masked experts, empty slots). Invalid
/// entries carry value 0, so they order among themselves by id alone. (WGSL has no infinity
/// literal, so `-inf` cannot serve as the sentinel.)
#[derive(CubeType)]
struct TopList {
    valid: Array<u32>,
    values: Array<f32>,
    ids: Array<u32>,
}

/// An empty list of `n` slots; `sentinel` is above every id, so empty slots lose every tie.
#[cube]
fn top_list(sentinel: u32, #[comptime] n: usize) -> TopList {
    let mut list = TopList { valid: Array::new(n), values: Array::new(n), ids: Array::new(n) };
    #[unroll]
    for s in 0..n {
        list.valid[s] = 0;
        list.values[s] = 0.0;
        list.ids[s] = sentinel;
    }
    list
}

/// Inserts an entry into `list` (ordered valid first, then by higher value, then by lower
/// id); the last entry falls off.
#[cube]
fn insert(list: &mut TopList, valid: u32, value: f32, id: u32, #[comptime] n: usize) {
    let mut c = valid;
    let mut v = value;
    let mut i = id;
    #[unroll]
    for s in 0..n {
        let (sc, sv, si) = (list.valid[s], list.values[s], list.ids[s]);
        if c > sc || (c == sc && (v > sv || (v == sv && i < si))) {
            list.valid[s] = c;
            list.values[s] = v;
            list.ids[s] = i;
            c = sc;
            v = sv;
            i = si;
        }
    }
}

/// The logistic function, as the portable gate's `sigmoid`.
#[cube]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + f32::exp(-v))
}

/// The biased score of expert `e` at `index` as (valid, value): `source` holds the biased
/// scores themselves, or with `gated` the logits, whose score is `sigmoid(logit) + bias[e]`.
/// NaN and `-inf` are invalid.
#[cube]
fn score(source: &Tensor<f32>, bias: &Tensor<f32>, index: usize, e: usize, #[comptime] gated: bool) -> (u32, f32) {
    let mut v = source[index];
    if comptime!(gated) {
        v = sigmoid(v) + bias[e];
    }
    let mut valid = 1u32;
    let mut value = v;
    if v.is_nan() || (v.is_inf() && v < 0.0) {
        valid = 0;
        value = 0.0;
    }
    (valid, value)
}

/// Token `t`'s experts, best first, from its row of `source` `[T, E]` (see [`score`]).
#[cube]
fn select_row(
    source: &Tensor<f32>,
    bias: &Tensor<f32>,
    t: usize,
    #[comptime] spec: SelectSpec,
    #[comptime] gated: bool,
) -> TopList {
    let experts = source.shape(1);
    let row = t * source.stride(0);
    let step = source.stride(1);
    let top_k = comptime!(spec.top_k);
    let num_groups = comptime!(spec.num_groups);
    let per_group = experts / num_groups;

    // kept[g] is 1 for the topk_groups best groups (every group without a group limit).
    let mut kept = Array::<u32>::new(num_groups);
    #[unroll]
    for g in 0..num_groups {
        kept[g] = comptime!(if num_groups == 1 { 1u32 } else { 0u32 });
    }
    if comptime!(num_groups > 1) {
        let keep = comptime!(spec.topk_groups);
        let group_topk = comptime!(spec.group_score_topk);
        let mut best = top_list(num_groups as u32, keep);
        for g in 0..num_groups {
            // The group's `group_topk` largest entries, a tied value as often as it occurs;
            // the sum is `-inf` (invalid) unless all of them are valid.
            let mut top = top_list(per_group as u32, group_topk);
            for j in 0..per_group {
                let e = g * per_group + j;
                let (valid, value) = score(source, bias, row + e * step, e, gated);
                insert(&mut top, valid, value, j as u32, group_topk);
            }
            let mut sum = 0.0f32;
            let mut all_valid = 1u32;
            #[unroll]
            for s in 0..group_topk {
                sum += top.values[s];
                all_valid *= top.valid[s];
            }
            // Invalid entries carry 0; an invalid sum carries 0 too.
            if all_valid == 0 {
                sum = 0.0;
            }
            insert(&mut best, all_valid, sum, g as u32, keep);
        }
        #[unroll]
        for s in 0..keep {
            kept[best.ids[s] as usize] = 1;
        }
    }

    let mut top = top_list(experts as u32, top_k);
    for e in 0..experts {
        let (mut valid, mut value) = score(source, bias, row + e * step, e, gated);
        if kept[e / per_group] == 0 {
            valid = 0;
            value = 0.0;
        }
        insert(&mut top, valid, value, e as u32, top_k);
    }
    top
}

/// `ids[t, 0..K]` = the experts of token `t`'s row of `choice` `[T, E]`, best first.
#[cube(launch)]
fn select_experts<I: Int>(
    choice: &Tensor<f32>,
    ids: &mut Tensor<I>,
    #[comptime] spec: SelectSpec,
    #[define(I)] _dtype: StorageType,
) {
    let t = ABSOLUTE_POS;
    if t >= choice.shape(0) {
        terminate!();
    }
    // `choice` stands in for the bias, which the ungated read never touches.
    let top = select_row(choice, choice, t, spec, false);
    let top_k = comptime!(spec.top_k);
    #[unroll]
    for s in 0..top_k {
        ids[t * top_k + s] = I::cast_from(top.ids[s]);
    }
}

/// The whole sigmoid gate for token `t` in one pass: `scores[t]` = sigmoid of its logits
/// `[E]`, `ids[t]` = the selection on scores plus `bias`, `weights[t]` = the chosen unbiased
/// scores (over their sum plus 1e-20 when `normalize`), times `scale`. The same arithmetic, in
/// the same order, as the portable `GateRule::apply`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gate_experts<I: Int>(
    logits: &Tensor<f32>,
    bias: &Tensor<f32>,
    scores: &mut Tensor<f32>,
    ids: &mut Tensor<I>,
    weights: &mut Tensor<f32>,
    scale: f32,
    #[comptime] spec: SelectSpec,
    #[comptime] normalize: bool,
    #[define(I)] _dtype: StorageType,
) {
    let t = ABSOLUTE_POS;
    if t >= logits.shape(0) {
        terminate!();
    }
    let experts = logits.shape(1);
    let (row, step) = (t * logits.stride(0), logits.stride(1));
    for e in 0..experts {
        scores[t * experts + e] = sigmoid(logits[row + e * step]);
    }
    let top = select_row(logits, bias, t, spec, true);
    let top_k = comptime!(spec.top_k);
    let mut chosen = Array::<f32>::new(top_k);
    let mut total = 0.0f32;
    #[unroll]
    for s in 0..top_k {
        let id = top.ids[s] as usize;
        chosen[s] = sigmoid(logits[row + id * step]);
        total += chosen[s];
        ids[t * top_k + s] = I::cast_from(top.ids[s]);
    }
    #[unroll]
    for s in 0..top_k {
        let mut w = chosen[s];
        if comptime!(normalize) {
            w /= total + 1e-20;
        }
        weights[t * top_k + s] = w * scale;
    }
}

/// The gradient of the logits through the sigmoid gate's weights, one unit per entry `(t, e)`
/// of `out` `[T, E]`: `GateRule::weights_grad` on contiguous `scores` `[T, E]`, `ids` and
/// `grad` `[T, K]`. Each unit reads its token's K chosen scores and gradients (a few cached
/// loads) for the normaliser's sum and the dot product; an entry no pair chose gets `0 * s (1 -
/// s)`, so a NaN score gives a NaN gradient as the tensor ops do.
#[cube(launch)]
fn gate_weights_grad<I: Int>(
    scores: &Tensor<f32>,
    ids: &Tensor<I>,
    grad: &Tensor<f32>,
    out: &mut Tensor<f32>,
    scale: f32,
    #[comptime] top_k: usize,
    #[comptime] normalize: bool,
    #[define(I)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let experts = out.shape(1);
    let t = i / experts;
    let e = i % experts;
    let mut total = 0.0f32;
    let mut dot = 0.0f32;
    let mut mine = 0.0f32;
    let mut chosen_here: u32 = 0u32;
    #[unroll]
    for s in 0..top_k {
        let id = u32::cast_from(ids[t * top_k + s]) as usize;
        let g = grad[t * top_k + s] * scale;
        let chosen = scores[t * experts + id];
        total += chosen;
        dot += g * chosen;
        if id == e {
            mine = g;
            chosen_here = 1u32;
        }
    }
    if comptime!(normalize) {
        // As the tensor ops: (g - dot / S) / S with S = sum + 1e-20, on the chosen only.
        if chosen_here == 1 {
            let total = total + 1e-20;
            mine = (mine - dot / total) / total;
        }
    }
    let s = scores[i];
    out[i] = mine * s * (1.0 - s);
}

/// Units per cube of the gate's backward: one entry each.
const GRAD_UNITS: u32 = 256;

/// Launches the sigmoid gate's backward: the logits' gradient `[T, E]` from the forward's
/// `scores` `[T, E]` and `ids` `[T, K]` and the weights' gradient `grad` `[T, K]` (f32).
pub(crate) fn launch_gate_grad<R: CubeRuntime>(
    scores: CubeTensor<R>,
    ids: CubeTensor<R>,
    grad: CubeTensor<R>,
    rule: &GateRule,
) -> CubeTensor<R> {
    let [tokens, experts] = [scores.meta.shape()[0], scores.meta.shape()[1]];
    let (client, device) = (scores.client.clone(), scores.device.clone());
    let out =
        empty_device_contiguous_dtype(client.clone(), device, Shape::new([tokens, experts]), burn::tensor::DType::F32);
    let entries = tokens * experts;
    if entries == 0 {
        return out;
    }
    let ids = into_contiguous(ids);
    gate_weights_grad::launch(
        &client,
        grid(entries, GRAD_UNITS),
        CubeDim::new_1d(GRAD_UNITS),
        into_contiguous(scores).into_tensor_arg(),
        ids.clone().into_tensor_arg(),
        into_contiguous(grad).into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rule.route_scale as f32,
        rule.selection.top_k,
        rule.normalize_weights,
        ids.dtype.into(),
    );
    out
}

/// The selection's comptime parameters for `selection`.
fn spec_of(selection: &Selection) -> SelectSpec {
    SelectSpec {
        top_k: selection.top_k,
        num_groups: selection.num_groups.max(1),
        topk_groups: selection.topk_groups,
        group_score_topk: selection.group_score_topk,
    }
}

/// A grid of `units` units, `per_cube` a cube.
fn grid(units: usize, per_cube: u32) -> CubeCount {
    super::launch::cube_grid(units.div_ceil(per_cube as usize) as u32)
}

/// Launches the sigmoid gate on `logits` `[T, E]` and `bias` `[E]` (f32): (scores `[T, E]`,
/// ids `[T, K]` in `int_dtype`, weights `[T, K]`).
pub(crate) fn launch_gate<R: CubeRuntime>(
    logits: CubeTensor<R>,
    bias: CubeTensor<R>,
    rule: &GateRule,
    int_dtype: burn::tensor::DType,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let [tokens, experts] = [logits.meta.shape()[0], logits.meta.shape()[1]];
    let top_k = rule.selection.top_k;
    let (client, device) = (logits.client.clone(), logits.device.clone());
    let f32_out = |shape: [usize; 2]| {
        empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new(shape), burn::tensor::DType::F32)
    };
    let (scores, weights) = (f32_out([tokens, experts]), f32_out([tokens, top_k]));
    let ids = empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new([tokens, top_k]), int_dtype);
    if tokens == 0 || top_k == 0 {
        return (scores, ids, weights);
    }
    gate_experts::launch(
        &client,
        grid(tokens, SELECT_UNITS),
        CubeDim::new_1d(SELECT_UNITS),
        logits.into_tensor_arg(),
        into_contiguous(bias).into_tensor_arg(),
        scores.clone().into_tensor_arg(),
        ids.clone().into_tensor_arg(),
        weights.clone().into_tensor_arg(),
        rule.route_scale as f32,
        spec_of(&rule.selection),
        rule.normalize_weights,
        int_dtype.into(),
    );
    (scores, ids, weights)
}

/// Launches the selection on `choice` (`[T, E]`, f32); the ids come out in `int_dtype`.
pub(crate) fn launch_select<R: CubeRuntime>(
    choice: CubeTensor<R>,
    selection: &Selection,
    int_dtype: burn::tensor::DType,
) -> CubeTensor<R> {
    let tokens = choice.meta.shape()[0];
    let out = empty_device_contiguous_dtype(
        choice.client.clone(),
        choice.device.clone(),
        Shape::new([tokens, selection.top_k]),
        int_dtype,
    );
    if tokens == 0 || selection.top_k == 0 {
        return out;
    }
    let choice = into_contiguous(choice);
    let client = choice.client.clone();
    select_experts::launch(
        &client,
        grid(tokens, SELECT_UNITS),
        CubeDim::new_1d(SELECT_UNITS),
        choice.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        spec_of(selection),
        int_dtype.into(),
    );
    out
}
