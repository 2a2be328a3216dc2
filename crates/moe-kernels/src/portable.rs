//! The portable implementation of [`crate::MoeBackend`]: burn tensor ops only, so it runs on
//! every backend and differentiates under `Autodiff`.
//!
//! Two layouts ([`DispatchLayout`]): `Padded` pads each expert's segment to the largest
//! (`capacity` rows), so the grouped matmul is one batched matmul `[E, C, a] x [E, a, b]`;
//! padding costs the batch's MaxVio in extra rows. `Segments` packs the segments back to back
//! and runs one 2-D matmul per non-empty segment.

use burn::tensor::{IndexingUpdateOp, Int, Tensor, backend::Backend};

use burn::tensor::activation::{sigmoid, silu};

use crate::{CapacityLimit, DispatchLayout, DispatchPlan, MoeBackend, PlanError};

/// See [`crate::MoeBackend::moe_plan`].
pub fn plan<B: Backend>(
    expert_ids: Tensor<B, 2, Int>,
    priority: Option<Tensor<B, 2>>,
    num_experts: usize,
    limit: CapacityLimit,
    layout: DispatchLayout,
) -> Result<DispatchPlan<B>, PlanError> {
    plan_with_kernels(expert_ids, priority, num_experts, limit, layout, None)
}

/// [`PlanKernels::scan`]'s signature.
pub type ScanKernel<B> = fn(Tensor<B, 2, Int>, usize) -> (Tensor<B, 1, Int>, Tensor<B, 1, Int>);
/// [`PlanKernels::place`]'s signature.
pub type PlaceKernel<B> = fn(
    Tensor<B, 2, Int>,
    Tensor<B, 1, Int>,
    Tensor<B, 1, Int>,
    usize,
    usize,
    bool,
) -> (Tensor<B, 1, Int>, Tensor<B, 1, Int>);

/// Kernels a backend may hand to [`plan_with_kernels`] in place of the portable ops (burn 0.21's
/// 1-D `scatter` runs on one GPU thread, and its sort on the host).
#[derive(Debug, Clone, Copy)]
pub struct PlanKernels<B: Backend> {
    /// `scan(ids [T, K], E)` = (`ranks` `[T K]`, `summary` `[E + 2]`): `ranks[i]` = how many
    /// pairs before `i` chose expert `ids[i]` (the token order inside the expert, for ids in
    /// `0..E`); `summary` = the pairs of each expert in `0..E`, then the smallest and the
    /// largest id.
    pub scan: ScanKernel<B>,
    /// `place(ids [T, K], ranks [T K], starts [E], kept, rows, padded)` = (`row_of_pair`
    /// `[T K]`, `source_of_row` `[rows]`) for ids all in `0..E`: a pair ranked below `kept` goes
    /// to row `starts[id] + rank`, which reads its token + 1; a dropped pair points at row
    /// `rows`. With `padded`, rows no pair fills read 0; without, every row gets a pair.
    pub place: PlaceKernel<B>,
}

/// [`plan`], with the counts, the id range, the in-expert ranks of the token-order case (no
/// `priority`) and the row placement computed by a backend's `kernels` when given.
pub fn plan_with_kernels<B: Backend>(
    expert_ids: Tensor<B, 2, Int>,
    priority: Option<Tensor<B, 2>>,
    num_experts: usize,
    limit: CapacityLimit,
    layout: DispatchLayout,
    kernels: Option<PlanKernels<B>>,
) -> Result<DispatchPlan<B>, PlanError> {
    if num_experts == 0 {
        return Err(PlanError::NoExperts);
    }
    let [tokens, top_k] = expert_ids.dims();
    if let Some(p) = &priority
        && p.dims() != [tokens, top_k]
    {
        return Err(PlanError::PriorityShape { priority: p.dims(), ids: [tokens, top_k] });
    }
    let device = expert_ids.device();
    let pairs = tokens * top_k;
    if (num_experts as u64) * (pairs as u64) >= 1 << 31 {
        return Err(PlanError::TooManyPairs { pairs, num_experts });
    }
    if pairs == 0 {
        let zeros = Tensor::<B, 1, Int>::zeros([num_experts], &device);
        // No id: the summary's range is (0, 0).
        let summary = Tensor::<B, 1, Int>::zeros([num_experts + 2], &device);
        return Ok(DispatchPlan {
            tokens,
            top_k,
            num_experts,
            capacity: 1,
            layout,
            segment_rows: vec![if layout == DispatchLayout::Padded { 1 } else { 0 }; num_experts],
            row_of_pair: Tensor::zeros([0], &device),
            source_of_row: if layout == DispatchLayout::Padded { zeros } else { Tensor::zeros([0], &device) },
            summary,
            counts: vec![0; num_experts],
            dropped: 0,
        });
    }

    let flat = expert_ids.clone().reshape([pairs]);
    // The summary: pairs per expert, then the smallest and the largest id; and the kernels'
    // token-order ranks. Reading the summary is the one host sync: the counts size the layout,
    // the id range validates the ids.
    let (summary, scanned_ranks) = match &kernels {
        Some(k) => {
            let (ranks, summary) = (k.scan)(expert_ids.clone(), num_experts);
            (summary, Some(ranks))
        }
        None => {
            // Clamped so that a bad id can never index out of bounds before it is reported.
            let clamped = flat.clone().clamp(0, num_experts as i64 - 1);
            let counts = count_experts(clamped.reshape([tokens, top_k]), num_experts);
            (Tensor::cat(vec![counts, flat.clone().min(), flat.clone().max()], 0), None)
        }
    };
    let host: Vec<i64> = summary.clone().into_data().iter::<i64>().collect();
    let (min_id, max_id) = (host[num_experts], host[num_experts + 1]);
    if min_id < 0 {
        return Err(PlanError::ExpertIdOutOfRange { id: min_id, num_experts });
    }
    if max_id >= num_experts as i64 {
        return Err(PlanError::ExpertIdOutOfRange { id: max_id, num_experts });
    }
    // Every id is in `0..E` from here on.
    let counts: Vec<usize> = host[..num_experts].iter().map(|&c| c as usize).collect();
    let largest = counts.iter().copied().max().unwrap_or(0);
    let kept_per_expert = limit.rows_per_expert(pairs, num_experts).map_or(largest, |l| l.min(largest));
    let dropped = counts.iter().map(|&c| c.saturating_sub(kept_per_expert)).sum();
    // At least one row per expert keeps every shape non-empty.
    let capacity = kept_per_expert.max(1);

    let pair_index = || Tensor::<B, 1, Int>::arange(0..pairs as i64, &device);
    // Inside an expert, pairs keep token order unless a priority says otherwise. Sort keys
    // are unique (expert * N + order), so the unstable sort is deterministic.
    let rank = match (priority, scanned_ranks) {
        (None, Some(ranks)) => ranks,
        (priority, _) => {
            let order = match priority {
                None => pair_index(),
                // Position of each pair in descending priority.
                Some(p) => inverse_scatter(p.reshape([pairs]).argsort_descending(0), pair_index(), pairs),
            };
            let key = flat.clone().mul_scalar(pairs as i64).add(order);
            let sorted = key.argsort(0);
            let sorted_expert = flat.clone().select(0, sorted.clone());
            let counts_device = summary.clone().narrow(0, 0, num_experts);
            let segment_start = counts_device.clone().cumsum(0).sub(counts_device);
            let rank_sorted = pair_index().sub(segment_start.select(0, sorted_expert));
            inverse_scatter(sorted, rank_sorted, pairs)
        }
    };

    let segment_rows: Vec<usize> = match layout {
        DispatchLayout::Padded => vec![capacity; num_experts],
        DispatchLayout::Segments => counts.iter().map(|&c| c.min(kept_per_expert)).collect(),
    };
    let starts: Vec<i64> =
        segment_rows.iter().scan(0i64, |next, &n| Some(std::mem::replace(next, *next + n as i64))).collect();
    let total_rows: usize = segment_rows.iter().sum();
    let start_of_expert = Tensor::<B, 1, Int>::from_ints(starts.as_slice(), &device);
    let (row_of_pair, source_of_row) = match &kernels {
        Some(k) => {
            let padded = layout == DispatchLayout::Padded;
            (k.place)(expert_ids, rank, start_of_expert, kept_per_expert, total_rows, padded)
        }
        None => {
            let kept = rank.clone().lower_elem(kept_per_expert as i64);
            // Dropped pairs point at the zero row after the last segment.
            let row_of_pair = start_of_expert.select(0, flat).add(rank).mask_fill(kept.bool_not(), total_rows as i64);
            let token_plus_one = pair_index().div_scalar(top_k as i64).add_scalar(1);
            let source_of_row = Tensor::<B, 1, Int>::zeros([total_rows + 1], &device)
                .scatter(0, row_of_pair.clone(), token_plus_one, IndexingUpdateOp::Add)
                .narrow(0, 0, total_rows);
            (row_of_pair, source_of_row)
        }
    };

    Ok(DispatchPlan {
        tokens,
        top_k,
        num_experts,
        capacity,
        layout,
        segment_rows,
        row_of_pair,
        source_of_row,
        summary,
        counts,
        dropped,
    })
}

/// `out[perm[i]] = values[i]` for a permutation `perm` (unique indices, so the add is exact).
fn inverse_scatter<B: Backend>(perm: Tensor<B, 1, Int>, values: Tensor<B, 1, Int>, len: usize) -> Tensor<B, 1, Int> {
    Tensor::zeros([len], &values.device()).scatter(0, perm, values, IndexingUpdateOp::Add)
}

/// See [`crate::MoeBackend::moe_permute`].
pub fn permute<B: Backend>(x: Tensor<B, 2>, plan: &DispatchPlan<B>) -> Tensor<B, 2> {
    let [_, d] = x.dims();
    // Row 0 of the extended input is the zero row that padding reads.
    let zero_row = Tensor::<B, 2>::zeros([1, d], &x.device()).cast(x.dtype());
    let extended = Tensor::cat(vec![zero_row, x], 0);
    extended.select(0, plan.source_of_row.clone())
}

/// See [`crate::MoeBackend::moe_grouped_matmul`].
pub fn grouped_matmul<B: Backend>(rows: Tensor<B, 2>, weights: Tensor<B, 3>, plan: &DispatchPlan<B>) -> Tensor<B, 2> {
    let [e, a, b] = weights.dims();
    match plan.layout {
        DispatchLayout::Padded => {
            let c = plan.capacity;
            rows.reshape([e, c, a]).matmul(weights).reshape([e * c, b])
        }
        DispatchLayout::Segments => {
            per_segment(rows, plan, b, |expert, segment| segment.matmul(expert_matrix(&weights, expert)))
        }
    }
}

/// See [`crate::MoeBackend::moe_grouped_matmul_grad_weights`].
pub fn grouped_matmul_grad_weights<B: Backend>(
    rows: Tensor<B, 2>,
    grad: Tensor<B, 2>,
    plan: &DispatchPlan<B>,
) -> Tensor<B, 3> {
    let [_, a] = rows.dims();
    let [_, b] = grad.dims();
    let e = plan.num_experts;
    match plan.layout {
        // Padding rows are zero rows of `rows`, so they add nothing to the batched product.
        DispatchLayout::Padded => {
            let c = plan.capacity;
            rows.reshape([e, c, a]).swap_dims(1, 2).matmul(grad.reshape([e, c, b]))
        }
        DispatchLayout::Segments => {
            let mut start = 0;
            let blocks = plan
                .segment_rows
                .iter()
                .map(|&n| {
                    let block = if n == 0 {
                        Tensor::<B, 2>::zeros([a, b], &rows.device()).cast(rows.dtype())
                    } else {
                        let x = rows.clone().narrow(0, start, n);
                        x.transpose().matmul(grad.clone().narrow(0, start, n))
                    };
                    start += n;
                    block
                })
                .collect();
            Tensor::stack(blocks, 0)
        }
    }
}

/// See [`crate::MoeBackend::moe_grouped_swiglu`].
pub fn grouped_swiglu<B: MoeBackend>(
    rows: Tensor<B, 2>,
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    down: Tensor<B, 3>,
    plan: &DispatchPlan<B>,
) -> Tensor<B, 2> {
    match plan.layout {
        DispatchLayout::Padded => swiglu_by_grouped_matmuls(rows, gate, up, down, plan),
        DispatchLayout::Segments => {
            let d = gate.dims()[1];
            per_segment(rows, plan, d, |e, x| {
                let g = x.clone().matmul(expert_matrix(&gate, e));
                let u = x.matmul(expert_matrix(&up, e));
                silu_mul(g, u).matmul(expert_matrix(&down, e))
            })
        }
    }
}

/// The grouped SwiGLU as three [`MoeBackend::moe_grouped_matmul`] calls, whatever the layout.
pub(crate) fn swiglu_by_grouped_matmuls<B: MoeBackend>(
    rows: Tensor<B, 2>,
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    down: Tensor<B, 3>,
    plan: &DispatchPlan<B>,
) -> Tensor<B, 2> {
    let g = B::moe_grouped_matmul(rows.clone(), gate, plan);
    let u = B::moe_grouped_matmul(rows, up, plan);
    B::moe_grouped_matmul(B::moe_silu_mul(g, u), down, plan)
}

/// See [`crate::MoeBackend::moe_silu_mul`]: `silu(gate) * up` on burn's ops.
pub fn silu_mul<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    silu(gate) * up
}

/// See [`crate::MoeBackend::moe_silu_mul_grad`]: with `s = sigmoid(gate)`,
/// `silu'(gate) = s (1 + gate (1 - s))`.
pub fn silu_mul_grad<B: Backend>(
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    grad: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let s = sigmoid(gate.clone());
    let silu_grad = s.clone() * (gate.clone() * s.clone().neg().add_scalar(1.0)).add_scalar(1.0);
    let grad_gate = grad.clone() * up * silu_grad;
    let grad_up = grad * gate * s;
    (grad_gate, grad_up)
}

/// Expert `e`'s `[a, b]` matrix of stacked `[E, a, b]` weights.
fn expert_matrix<B: Backend>(weights: &Tensor<B, 3>, e: usize) -> Tensor<B, 2> {
    let [_, a, b] = weights.dims();
    weights.clone().narrow(0, e, 1).reshape([a, b])
}

/// Applies `f(expert, segment_rows)` to every non-empty segment of a `Segments` layout and
/// stacks the results (`[rows, width]`).
fn per_segment<B: Backend>(
    rows: Tensor<B, 2>,
    plan: &DispatchPlan<B>,
    width: usize,
    f: impl Fn(usize, Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, 2> {
    let mut start = 0;
    let mut outputs = Vec::new();
    for (expert, &n) in plan.segment_rows.iter().enumerate() {
        if n > 0 {
            outputs.push(f(expert, rows.clone().narrow(0, start, n)));
            start += n;
        }
    }
    if outputs.is_empty() {
        return Tensor::<B, 2>::zeros([0, width], &rows.device()).cast(rows.dtype());
    }
    Tensor::cat(outputs, 0)
}

/// See [`crate::MoeBackend::moe_combine`].
pub fn combine<B: Backend>(rows: Tensor<B, 2>, weights: Tensor<B, 2>, plan: &DispatchPlan<B>) -> Tensor<B, 2> {
    let [_, d] = rows.dims();
    let t = plan.tokens;
    if t * plan.top_k == 0 {
        return Tensor::<B, 2>::zeros([t, d], &rows.device()).cast(rows.dtype());
    }
    // Scale each row by its pair's weight, then scatter-add the rows straight into their
    // tokens: no [N, d] gather. Row 0 of the output absorbs the padding rows (source 0).
    let rows_total = rows.dims()[0];
    let row_weight = row_weights(weights, plan, rows_total, rows.dtype());
    let scaled = rows * row_weight.reshape([rows_total, 1]);
    Tensor::<B, 2>::zeros([t + 1, d], &scaled.device())
        .cast(scaled.dtype())
        .select_assign(0, plan.source_of_row.clone(), scaled, IndexingUpdateOp::Add)
        .narrow(0, 1, t)
}

/// `[rows]`: the weight of the pair each dispatch row holds (0 for padding rows).
fn row_weights<B: Backend>(
    weights: Tensor<B, 2>,
    plan: &DispatchPlan<B>,
    rows_total: usize,
    dtype: burn::tensor::DType,
) -> Tensor<B, 1> {
    let pairs = plan.tokens * plan.top_k;
    Tensor::<B, 1>::zeros([rows_total + 1], &weights.device())
        .cast(dtype)
        .scatter(0, plan.row_of_pair.clone(), weights.cast(dtype).reshape([pairs]), IndexingUpdateOp::Add)
        .narrow(0, 0, rows_total)
}

/// See [`crate::MoeBackend::moe_combine_grad`]: the rows' part through the backend's own
/// permute.
pub fn combine_grad<B: MoeBackend>(
    rows: Tensor<B, 2>,
    weights: Tensor<B, 2>,
    grad_out: Tensor<B, 2>,
    plan: &DispatchPlan<B>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let row_weight = row_weights(weights.clone(), plan, rows.dims()[0], grad_out.dtype());
    (combine_grad_rows(grad_out.clone(), plan, row_weight), combine_grad_weights(rows, weights, grad_out, plan))
}

/// The rows' part of [`combine_grad`]: each dispatch row's token gradient, through the
/// backend's permute, times `row_weight` `[rows]` (its pair's weight, 0 for padding rows).
pub fn combine_grad_rows<B: MoeBackend>(
    grad_out: Tensor<B, 2>,
    plan: &DispatchPlan<B>,
    row_weight: Tensor<B, 1>,
) -> Tensor<B, 2> {
    let rows_total = row_weight.dims()[0];
    B::moe_permute(grad_out, plan) * row_weight.reshape([rows_total, 1])
}

/// The weights' part of [`combine_grad`]: `d weights[t, k] = <rows[row of (t, k)], grad_out[t]>`,
/// summed in f32.
fn combine_grad_weights<B: Backend>(
    rows: Tensor<B, 2>,
    weights: Tensor<B, 2>,
    grad_out: Tensor<B, 2>,
    plan: &DispatchPlan<B>,
) -> Tensor<B, 2> {
    let d = rows.dims()[1];
    let (t, k) = (plan.tokens, plan.top_k);
    if t * k == 0 {
        return weights.zeros_like();
    }
    // Dropped pairs point at the zero row after the last.
    let zero_row = Tensor::<B, 2>::zeros([1, d], &rows.device()).cast(rows.dtype());
    let picked = Tensor::cat(vec![rows, zero_row], 0).select(0, plan.row_of_pair.clone()).reshape([t, k, d]);
    let f32 = burn::tensor::DType::F32;
    let products = picked.cast(f32) * grad_out.cast(f32).reshape([t, 1, d]);
    products.sum_dim(2).reshape([t, k]).cast(weights.dtype())
}

/// Pairs per expert of `expert_ids` `[T, K]`, by a scatter-add: the router's portable count.
pub fn count_experts<B: Backend>(expert_ids: Tensor<B, 2, Int>, num_experts: usize) -> Tensor<B, 1, Int> {
    let [tokens, top_k] = expert_ids.dims();
    let device = expert_ids.device();
    Tensor::<B, 1, Int>::zeros([num_experts], &device).scatter(
        0,
        expert_ids.reshape([tokens * top_k]),
        Tensor::ones([tokens * top_k], &device),
        IndexingUpdateOp::Add,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray;

    fn ids(rows: &[[i64; 2]]) -> Tensor<B, 2, Int> {
        let flat: Vec<i64> = rows.iter().flatten().copied().collect();
        Tensor::<B, 1, Int>::from_ints(flat.as_slice(), &Default::default()).reshape([rows.len(), 2])
    }

    fn rows_of(plan: &DispatchPlan<B>) -> Vec<i64> {
        plan.row_of_pair.to_data().iter::<i64>().collect()
    }

    #[test]
    fn rows_follow_token_order_inside_each_expert() {
        let plan = plan::<B>(ids(&[[1, 0], [1, 2], [0, 1]]), None, 3, CapacityLimit::Dropless, DispatchLayout::Padded)
            .unwrap();
        assert_eq!(plan.counts(), &[2, 3, 1]);
        assert_eq!(plan.capacity(), 3);
        // expert e owns rows 3e..3e+3; pairs in token order: (0,1)->e1 r0, (0,0)->e0 r0, ...
        assert_eq!(rows_of(&plan), vec![3, 0, 4, 6, 1, 5]);
    }

    #[test]
    fn segments_are_packed_back_to_back() {
        let ids = ids(&[[1, 0], [1, 2], [0, 1]]);
        let plan = plan::<B>(ids, None, 3, CapacityLimit::Dropless, DispatchLayout::Segments).unwrap();
        assert_eq!(plan.segment_rows(), &[2, 3, 1]);
        // expert 0: rows 0..2, expert 1: rows 2..5, expert 2: row 5.
        assert_eq!(rows_of(&plan), vec![2, 0, 3, 5, 1, 4]);
        let sources: Vec<i64> = plan.source_of_row.to_data().iter::<i64>().collect();
        assert_eq!(sources, vec![1, 3, 1, 2, 3, 2]);
    }

    #[test]
    fn segments_drop_into_the_row_after_the_last() {
        let ids = ids(&[[0, 1], [0, 1], [0, 2]]);
        let plan = plan::<B>(ids, None, 3, CapacityLimit::Factor(1.0), DispatchLayout::Segments).unwrap();
        assert_eq!(plan.segment_rows(), &[2, 2, 1]);
        assert_eq!(rows_of(&plan), vec![0, 2, 1, 3, 5, 4]);
    }

    #[test]
    fn capacity_by_position_drops_later_tokens() {
        let ids = ids(&[[0, 1], [0, 1], [0, 2]]);
        let plan = plan::<B>(ids, None, 3, CapacityLimit::Factor(1.0), DispatchLayout::Padded).unwrap();
        // 6 pairs / 3 experts -> 2 rows each; the third token's expert-0 pair is dropped.
        assert_eq!(plan.capacity(), 2);
        assert_eq!(plan.dropped(), 1);
        assert_eq!(rows_of(&plan), vec![0, 2, 1, 3, 6, 4]);
    }

    #[test]
    fn capacity_by_priority_drops_the_weakest_pair() {
        let ids = ids(&[[0, 1], [0, 1], [0, 2]]);
        let device = Default::default();
        let prio = Tensor::<B, 2>::from_floats([[0.1, 0.5], [0.9, 0.5], [0.8, 0.4]], &device);
        let plan = plan::<B>(ids, Some(prio), 3, CapacityLimit::Factor(1.0), DispatchLayout::Padded).unwrap();
        assert_eq!(plan.dropped(), 1);
        // Expert 0 keeps tokens 1 (0.9) then 2 (0.8); token 0 (0.1) goes to the drop row 6.
        assert_eq!(rows_of(&plan)[0], 6);
        assert_eq!(rows_of(&plan)[2], 0);
        assert_eq!(rows_of(&plan)[4], 1);
    }

    #[test]
    fn weight_gradient_sums_each_segment_and_leaves_empty_experts_zero() {
        let device = Default::default();
        // 5 tokens, top-1 over 3 experts: segments of 2, 0 and 3 rows.
        let ids = [0i64, 2, 0, 2, 2];
        let (a, b) = (2, 3);
        let x: Vec<f32> = (0..ids.len() * a).map(|i| i as f32 * 0.5 - 1.0).collect();
        let g: Vec<f32> = (0..ids.len() * b).map(|i| 1.0 - i as f32 * 0.25).collect();
        // out[e][i][j] = sum over e's tokens of x[t][i] * g[t][j].
        let mut expected = vec![0.0f32; 3 * a * b];
        for (t, &e) in ids.iter().enumerate() {
            for i in 0..a {
                for j in 0..b {
                    expected[(e as usize * a + i) * b + j] += x[t * a + i] * g[t * b + j];
                }
            }
        }
        let ids = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &device).reshape([ids.len(), 1]);
        for layout in [DispatchLayout::Padded, DispatchLayout::Segments] {
            let plan = plan::<B>(ids.clone(), None, 3, CapacityLimit::Dropless, layout).unwrap();
            let tokens = |v: &[f32], w: usize| Tensor::<B, 1>::from_floats(v, &device).reshape([v.len() / w, w]);
            let rows = permute(tokens(&x, a), &plan);
            let grad = permute(tokens(&g, b), &plan);
            let got = grouped_matmul_grad_weights(rows, grad, &plan);
            assert_eq!(got.dims(), [3, a, b]);
            got.into_data().assert_approx_eq::<f32>(&TensorData::new(expected.clone(), [3, a, b]), Default::default());
        }
    }

    #[test]
    fn sort_keys_that_overflow_32_bits_are_a_typed_error() {
        // 2^16 tokens x 1 slot over 2^15 experts: the keys reach 2^31. No tensor that large is
        // built: the check runs first.
        let ids = Tensor::<B, 2, Int>::zeros([1 << 16, 1], &Default::default());
        let err = plan::<B>(ids, None, 1 << 15, CapacityLimit::Dropless, DispatchLayout::Padded).unwrap_err();
        assert_eq!(err, PlanError::TooManyPairs { pairs: 1 << 16, num_experts: 1 << 15 });
    }

    #[test]
    fn out_of_range_id_is_a_typed_error() {
        let err = plan::<B>(ids(&[[0, 5]]), None, 4, CapacityLimit::Dropless, DispatchLayout::Padded).unwrap_err();
        assert_eq!(err, PlanError::ExpertIdOutOfRange { id: 5, num_experts: 4 });
        let err = plan::<B>(ids(&[[-1, 0]]), None, 4, CapacityLimit::Dropless, DispatchLayout::Padded).unwrap_err();
        assert_eq!(err, PlanError::ExpertIdOutOfRange { id: -1, num_experts: 4 });
    }
}
