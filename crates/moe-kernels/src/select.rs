//! The router's expert selection: the top-K of the biased scores inside the best groups, the
//! rule every selection kernel must match.

use burn::tensor::{Bool, Int, Tensor, backend::Backend};

/// Everything the expert selection needs besides the biased scores: K and the group limit.
/// [`Selection::select`] is the portable rule; a backend with its own selection kernel must
/// return exactly the same ids ([`crate::MoeBackend::moe_select_experts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Selection {
    /// Experts chosen per token, `K`.
    pub top_k: usize,
    /// Groups `G` the experts are split into; 1 means no group limit.
    pub num_groups: usize,
    /// Groups kept per token.
    pub topk_groups: usize,
    /// Entries summed into a group's score.
    pub group_score_topk: usize,
}

impl Selection {
    /// The `K` experts of each row of `choice` `[T, E]` (biased scores), best first: inside the
    /// `topk_groups` best groups when `num_groups > 1` ([`mask_groups`]), ties to the lower
    /// id ([`top_k_lowest_id`]).
    pub fn select<B: Backend>(&self, choice: Tensor<B, 2>) -> Tensor<B, 2, Int> {
        let choice = if self.num_groups > 1 {
            mask_groups(choice, self.num_groups, self.topk_groups, self.group_score_topk)
        } else {
            choice
        };
        top_k_lowest_id(choice, self.top_k)
    }
}

/// The `k` largest entries of each row of `values` `[T, E]`, as column ids `[T, k]` in
/// descending order of value. Equal values go to the lower id, on every backend (burn's
/// `topk` leaves ties to the backend). NaN counts as `-inf`, and a row of `-inf` still yields
/// `k` distinct ids (the lowest), so the ids are always valid.
pub fn top_k_lowest_id<B: Backend>(values: Tensor<B, 2>, k: usize) -> Tensor<B, 2, Int> {
    let [rows, cols] = values.dims();
    let device = values.device();
    let values = values.clone().mask_fill(values.is_nan(), f32::NEG_INFINITY);
    let column = Tensor::<B, 1, Int>::arange(0..cols as i64, &device).float().reshape([1, cols]).expand([rows, cols]);
    let mut taken: Tensor<B, 2, Bool> = Tensor::<B, 2, Int>::zeros([rows, cols], &device).bool();
    let mut picks = Vec::with_capacity(k);
    for _ in 0..k {
        let free = values.clone().mask_fill(taken.clone(), f32::NEG_INFINITY);
        let best = free.clone().max_dim(1).expand([rows, cols]);
        let candidate = free.equal(best).bool_and(taken.clone().bool_not());
        let pick = column.clone().mask_fill(candidate.bool_not(), cols as f32).min_dim(1); // [rows, 1]
        taken = taken.bool_or(column.clone().equal(pick.clone().expand([rows, cols])));
        picks.push(pick.int());
    }
    Tensor::cat(picks, 1)
}

/// Masks with `-inf` every expert outside the `keep` best groups of each row of `scores`
/// `[T, E]`. A group's score is the sum of its `score_topk` largest entries. `-inf`, not 0:
/// with a negative bias a kept expert can score below 0, and a zero-masked expert would then
/// win (DeepSeek-V3 issue 741).
pub fn mask_groups<B: Backend>(
    scores: Tensor<B, 2>,
    num_groups: usize,
    keep: usize,
    score_topk: usize,
) -> Tensor<B, 2> {
    let [rows, experts] = scores.dims();
    let per_group = experts / num_groups;
    let grouped = scores.clone().reshape([rows, num_groups, per_group]);
    // The `score_topk` largest by repeated max + knock-out, not a sort: burn 0.21 sorts on
    // the host on GPU backends (a device sync and a CPU sort of T x E values per layer).
    let mut rest = grouped.clone().mask_fill(grouped.is_nan(), f32::NEG_INFINITY);
    let position = Tensor::<B, 1, Int>::arange(0..per_group as i64, &scores.device())
        .reshape([1, 1, per_group])
        .expand([rows, num_groups, per_group]);
    let mut sum = rest.clone().max_dim(2);
    for _ in 1..score_topk {
        // Knock out one copy of the max; with ties the next max is the same value, so which
        // copy goes does not change the sum.
        let first = rest.clone().argmax(2).expand([rows, num_groups, per_group]);
        rest = rest.mask_fill(position.clone().equal(first), f32::NEG_INFINITY);
        sum = sum + rest.clone().max_dim(2);
    }
    let group_scores = sum.reshape([rows, num_groups]);
    let kept = top_k_lowest_id(group_scores, keep);
    let group_kept = Tensor::<B, 2>::zeros([rows, num_groups], &scores.device())
        .scatter(1, kept, Tensor::ones([rows, keep], &scores.device()), burn::tensor::IndexingUpdateOp::Add)
        .greater_elem(0.5);
    let expert_kept =
        group_kept.reshape([rows, num_groups, 1]).expand([rows, num_groups, per_group]).reshape([rows, experts]);
    scores.mask_fill(expert_kept.bool_not(), f32::NEG_INFINITY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray;

    fn ids(t: Tensor<B, 2, Int>) -> Vec<i64> {
        t.into_data().iter::<i64>().collect()
    }

    #[test]
    fn ties_go_to_the_lower_id() {
        let v = Tensor::<B, 2>::from_floats([[0.5, 0.9, 0.5, 0.9], [1.0, 1.0, 1.0, 1.0]], &Default::default());
        assert_eq!(ids(top_k_lowest_id(v, 3)), vec![1, 3, 0, 0, 1, 2]);
    }

    #[test]
    fn nan_and_neg_inf_rows_still_give_distinct_valid_ids() {
        let v = Tensor::<B, 2>::from_floats(
            [[f32::NAN, f32::NAN, f32::NAN], [f32::NEG_INFINITY, 2.0, f32::NAN]],
            &Default::default(),
        );
        assert_eq!(ids(top_k_lowest_id(v, 3)), vec![0, 1, 2, 1, 0, 2]);
    }

    #[test]
    fn groups_outside_the_best_are_masked_with_neg_inf() {
        // 2 groups of 2; group 1 has the larger top-2 sum although group 0 has the max.
        let v = Tensor::<B, 2>::from_floats([[0.9, -0.5, 0.4, 0.3]], &Default::default());
        let masked: Vec<f32> = mask_groups(v, 2, 1, 2).into_data().iter::<f32>().collect();
        assert_eq!(masked, vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 0.4, 0.3]);
    }

    #[test]
    fn a_tied_max_counts_twice_in_the_group_score() {
        // Group 0 = [0.5, 0.5, 0.1] scores 1.0; group 1 = [0.9, 0.05, 0.0] scores 0.95.
        let v = Tensor::<B, 2>::from_floats([[0.5, 0.5, 0.1, 0.9, 0.05, 0.0]], &Default::default());
        let masked: Vec<f32> = mask_groups(v, 2, 1, 2).into_data().iter::<f32>().collect();
        let inf = f32::NEG_INFINITY;
        assert_eq!(masked, vec![0.5, 0.5, 0.1, inf, inf, inf]);
    }
}
