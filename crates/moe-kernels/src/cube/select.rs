//! The router's expert selection as one kernel: what `moe_router::Selection::select` computes
//! with about ten tensor ops per chosen expert (and as many again per group), here one unit per
//! token in one pass over its scores (two with groups).
//!
//! It must return exactly the portable ids: NaN counts as `-inf`, ties go to the lower id (of
//! experts and of groups), a group's score is the sum of its `group_score_topk` largest
//! entries counting tied values once each, and experts outside the kept groups are `-inf`, so
//! they are chosen (lowest id first) only when fewer than `K` others are left.

use burn::tensor::Shape;
use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use moe_router::Selection;

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

/// The score at `index` as (valid, value): NaN and `-inf` are invalid.
#[cube]
fn score(choice: &Tensor<f32>, index: usize) -> (u32, f32) {
    let v = choice[index];
    let mut valid = 1u32;
    let mut value = v;
    if v.is_nan() || (v.is_inf() && v < 0.0) {
        valid = 0;
        value = 0.0;
    }
    (valid, value)
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
    let experts = choice.shape(1);
    let row = t * choice.stride(0);
    let step = choice.stride(1);
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
                let (valid, value) = score(choice, row + (g * per_group + j) * step);
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
        let (mut valid, mut value) = score(choice, row + e * step);
        if kept[e / per_group] == 0 {
            valid = 0;
            value = 0.0;
        }
        insert(&mut top, valid, value, e as u32, top_k);
    }
    #[unroll]
    for s in 0..top_k {
        ids[t * top_k + s] = I::cast_from(top.ids[s]);
    }
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
    let spec = SelectSpec {
        top_k: selection.top_k,
        num_groups: selection.num_groups.max(1),
        topk_groups: selection.topk_groups,
        group_score_topk: selection.group_score_topk,
    };
    let cubes = tokens.div_ceil(SELECT_UNITS as usize) as u32;
    let x = cubes.min(32768);
    let client = choice.client.clone();
    select_experts::launch(
        &client,
        CubeCount::Static(x, cubes.div_ceil(x), 1),
        CubeDim::new_1d(SELECT_UNITS),
        choice.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        spec,
        int_dtype.into(),
    );
    out
}
