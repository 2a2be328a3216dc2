//! DeepSeek-V3's node-limited top-K selection on host scores.

use std::cmp::Ordering;

/// How many of a group's best scores make its group score (DeepSeek-V3's `topk_group`
/// selection sums the top 2).
const GROUP_SCORE_TOPK: usize = 2;

/// Selects each token's experts the way DeepSeek-V3's gate does: with a node limit, a group's
/// score is the sum of its 2 best expert scores, the best `keep_groups` groups stay, and the
/// top `K` experts are taken from them; without one, the top `K` overall. Ties go to the
/// lower id, as in `moe_kernels::top_k_lowest_id`. Buffers are reused across tokens.
#[derive(Debug, Clone)]
pub(crate) struct NodeLimitedSelector {
    num_groups: usize,
    keep_groups: Option<usize>,
    top_k: usize,
    groups: Vec<usize>,
    group_scores: Vec<f64>,
    candidates: Vec<usize>,
}

/// Descending score, then ascending id.
fn best_first(scores: &[f64], a: usize, b: usize) -> Ordering {
    scores[b].total_cmp(&scores[a]).then(a.cmp(&b))
}

/// Keeps the `k` best of `ids` (by `scores`), best first.
fn keep_best(ids: &mut Vec<usize>, scores: &[f64], k: usize) {
    if ids.len() > k {
        ids.select_nth_unstable_by(k - 1, |&a, &b| best_first(scores, a, b));
        ids.truncate(k);
    }
    ids.sort_unstable_by(|&a, &b| best_first(scores, a, b));
}

impl NodeLimitedSelector {
    /// A selector over `num_groups` contiguous groups keeping `keep_groups` of them (`None`:
    /// no limit). The caller has checked `top_k <= kept experts` and `num_groups | E`.
    pub(crate) fn new(num_groups: usize, keep_groups: Option<usize>, top_k: usize) -> Self {
        Self {
            num_groups,
            keep_groups: keep_groups.filter(|&m| m < num_groups),
            top_k,
            groups: Vec::new(),
            group_scores: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// Writes the chosen expert ids for one token's `scores` (`[E]`, finite) into `out`,
    /// best first.
    pub(crate) fn select(&mut self, scores: &[f64], out: &mut Vec<usize>) {
        self.candidates.clear();
        match self.keep_groups {
            None => self.candidates.extend(0..scores.len()),
            Some(keep) => {
                let per_group = scores.len() / self.num_groups;
                let score_topk = GROUP_SCORE_TOPK.min(per_group);
                self.group_scores.clear();
                for group in scores.chunks(per_group) {
                    // The sum of the group's `score_topk` best scores, by partial insertion.
                    let mut best = [f64::NEG_INFINITY; GROUP_SCORE_TOPK];
                    for &s in group {
                        if s > best[score_topk - 1] {
                            let mut i = score_topk - 1;
                            while i > 0 && s > best[i - 1] {
                                best[i] = best[i - 1];
                                i -= 1;
                            }
                            best[i] = s;
                        }
                    }
                    self.group_scores.push(best[..score_topk].iter().sum());
                }
                self.groups.clear();
                self.groups.extend(0..self.num_groups);
                keep_best(&mut self.groups, &self.group_scores, keep);
                for &g in &self.groups {
                    self.candidates.extend(g * per_group..(g + 1) * per_group);
                }
            }
        }
        keep_best(&mut self.candidates, scores, self.top_k);
        out.clear();
        out.extend_from_slice(&self.candidates);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use burn::backend::NdArray;
    use burn::tensor::Tensor;
    use moe_kernels::{mask_groups, top_k_lowest_id};

    /// The router's own selection (burn tensors) as the reference.
    fn router_selection(scores: &[f64], rows: usize, groups: usize, keep: Option<usize>, k: usize) -> Vec<usize> {
        let experts = scores.len() / rows;
        let data: Vec<f32> = scores.iter().map(|&s| s as f32).collect();
        let mut t = Tensor::<NdArray, 1>::from_floats(data.as_slice(), &Default::default()).reshape([rows, experts]);
        if let Some(m) = keep {
            t = mask_groups(t, groups, m, 2);
        }
        top_k_lowest_id(t, k).into_data().iter::<i64>().map(|i| i as usize).collect()
    }

    #[test]
    fn matches_the_router_selection_including_ties() {
        let mut rng = SplitMix64::new(7);
        let (rows, experts) = (200, 32);
        for (groups, keep, k) in [(8, Some(2), 4), (4, Some(1), 8), (8, None, 6), (4, Some(3), 3), (16, Some(4), 8)] {
            // Multiples of 1/16 in [0, 1): exact in f32, so group sums are exact too, and
            // frequent ties exercise the lower-id rule.
            let scores: Vec<f64> = (0..rows * experts).map(|_| rng.below(16) as f64 / 16.0).collect();
            let expected = router_selection(&scores, rows, groups, keep, k);
            let mut selector = NodeLimitedSelector::new(groups, keep, k);
            let mut out = Vec::new();
            for (row, want) in scores.chunks(experts).zip(expected.chunks(k)) {
                selector.select(row, &mut out);
                assert_eq!(out, want, "groups {groups}, keep {keep:?}, k {k}, row {row:?}");
            }
        }
    }

    #[test]
    fn kept_groups_bound_the_groups_reached() {
        let mut rng = SplitMix64::new(3);
        let mut selector = NodeLimitedSelector::new(8, Some(3), 8);
        let mut out = Vec::new();
        for _ in 0..500 {
            let scores: Vec<f64> = (0..64).map(|_| rng.gumbel()).collect();
            selector.select(&scores, &mut out);
            let mut groups: Vec<usize> = out.iter().map(|e| e / 8).collect();
            groups.sort_unstable();
            groups.dedup();
            assert!(groups.len() <= 3, "{out:?}");
            assert_eq!(out.len(), 8);
        }
    }
}
