//! Balance losses on router outputs. Each returns a `[1]` tensor already multiplied by its
//! weight; the token fractions `f_i` are counts (no gradient), the probabilities `P_i` carry it.

use burn::tensor::{IndexingUpdateOp, Int, Tensor, backend::Backend};

/// `[rows, E]` 0/1 mask of the experts each row chose.
fn chosen_mask<B: Backend>(expert_ids: Tensor<B, 2, Int>, like: &Tensor<B, 2>) -> Tensor<B, 2> {
    let [rows, k] = expert_ids.dims();
    let num_experts = like.dims()[1];
    let device = expert_ids.device();
    Tensor::<B, 2>::zeros([rows, num_experts], &device)
        .scatter(1, expert_ids, Tensor::ones([rows, k], &device), IndexingUpdateOp::Add)
        .cast(like.dtype())
}

/// Each row divided by its sum (affinities to a distribution over experts).
fn normalised<B: Backend>(scores: Tensor<B, 2>) -> Tensor<B, 2> {
    let total = scores.clone().sum_dim(1).add_scalar(1e-20);
    scores.div(total)
}

/// DeepSeek-V3's sequence-wise balance loss, `alpha * sum_i f_i P_i` per sequence, averaged
/// over sequences: `f_i = E / (K L) * (tokens of the sequence choosing i)`,
/// `P_i = mean over the sequence of s_i / sum_j s_j`. `scores` `[B * L, E]` (unbiased
/// affinities), `expert_ids` `[B * L, K]`, rows sequence-major. Equals `alpha` when routing is
/// uniform.
pub fn sequence_balance_loss<B: Backend>(
    scores: Tensor<B, 2>,
    expert_ids: Tensor<B, 2, Int>,
    seq_len: usize,
    alpha: f64,
) -> Tensor<B, 1> {
    let [rows, experts] = scores.dims();
    let k = expert_ids.dims()[1];
    let sequences = rows / seq_len;
    let f = chosen_mask(expert_ids, &scores)
        .reshape([sequences, seq_len, experts])
        .sum_dim(1)
        .mul_scalar(experts as f64 / (k * seq_len) as f64);
    let p = normalised(scores).reshape([sequences, seq_len, experts]).mean_dim(1);
    (f * p).sum_dim(2).mean().mul_scalar(alpha)
}

/// The Switch/GShard batch auxiliary loss, `alpha * E * sum_i f_i P_i` with `f_i` the fraction
/// of the `T * K` choices that went to `i` and `P_i` the mean normalised affinity. Equals
/// `alpha` when routing is uniform.
pub fn switch_aux_loss<B: Backend>(scores: Tensor<B, 2>, expert_ids: Tensor<B, 2, Int>, alpha: f64) -> Tensor<B, 1> {
    let [rows, experts] = scores.dims();
    let k = expert_ids.dims()[1];
    let f = chosen_mask(expert_ids, &scores).sum_dim(0).div_scalar((rows * k) as f64);
    let p = normalised(scores).mean_dim(0);
    (f * p).sum().mul_scalar(alpha * experts as f64)
}

/// Router z-loss (ST-MoE): `weight * mean_t (logsumexp_i logits_{t,i})^2`.
pub fn router_z_loss<B: Backend>(logits: Tensor<B, 2>, weight: f64) -> Tensor<B, 1> {
    let lse = logits.clone().max_dim(1) + {
        let shifted = logits.clone() - logits.max_dim(1);
        shifted.exp().sum_dim(1).log()
    };
    lse.powi_scalar(2).mean().mul_scalar(weight)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray;

    fn scalar(t: Tensor<B, 1>) -> f32 {
        t.into_scalar()
    }

    #[test]
    fn losses_equal_alpha_under_uniform_routing() {
        let device = Default::default();
        // 4 tokens, 4 experts, K = 1, each expert once, flat scores.
        let scores = Tensor::<B, 2>::full([4, 4], 0.5, &device);
        let ids = Tensor::<B, 2, Int>::from_ints([[0], [1], [2], [3]], &device);
        assert!((scalar(sequence_balance_loss(scores.clone(), ids.clone(), 4, 0.1)) - 0.1).abs() < 1e-6);
        assert!((scalar(switch_aux_loss(scores, ids, 0.1)) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn sequence_loss_is_computed_per_sequence() {
        let device = Default::default();
        // Two sequences of 2 tokens; 2 experts; K = 1. Sequence 0 all to expert 0 with
        // s' = (1, 0): f = (2, 0), P = (1, 0) -> 2. Sequence 1 uniform -> 1. Mean 1.5.
        let scores = Tensor::<B, 2>::from_floats([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5]], &device);
        let ids = Tensor::<B, 2, Int>::from_ints([[0], [0], [0], [1]], &device);
        assert!((scalar(sequence_balance_loss(scores, ids, 2, 1.0)) - 1.5).abs() < 1e-6);
    }

    #[test]
    fn z_loss_matches_a_hand_computed_logsumexp() {
        let device = Default::default();
        let logits = Tensor::<B, 2>::from_floats([[0.0, 0.0], [1000.0, 0.0]], &device);
        // lse = ln 2 and 1000 (stable for large logits).
        let expected = ((2f64.ln()).powi(2) + 1000f64.powi(2)) / 2.0;
        assert!((scalar(router_z_loss(logits, 1.0)) as f64 - expected).abs() / expected < 1e-6);
    }
}
