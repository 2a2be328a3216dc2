//! The router's gate after the logits: affinities, the bias-steered selection and the weights,
//! and the gradient of the logits through it. A backend may run the forward as one kernel and
//! the backward as another ([`crate::MoeBackend::moe_gate`] and
//! [`crate::MoeBackend::moe_gate_grad`]); these tensor-op versions are the contract such
//! kernels must match.

use burn::tensor::{IndexingUpdateOp, Int, Tensor, activation, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::select::Selection;

/// How logits become affinities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScoreFunction {
    /// `sigmoid(logit)` per expert: DeepSeek-V3.
    #[default]
    Sigmoid,
    /// Softmax over experts: DeepSeek-V2, Mixtral.
    Softmax,
}

/// The gate's rule: score function, selection, normalisation and scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateRule {
    /// Sigmoid (DeepSeek-V3) or softmax affinities.
    pub score_function: ScoreFunction,
    /// K and the group limit.
    pub selection: Selection,
    /// Weights normalised over the K chosen.
    pub normalize_weights: bool,
    /// Factor on the weights.
    pub route_scale: f64,
}

/// What the gate returns for `T` tokens.
#[derive(Debug, Clone)]
pub struct Gated<B: Backend> {
    /// `[T, E]` f32 unbiased affinities.
    pub scores: Tensor<B, 2>,
    /// `[T, K]` chosen experts, best first.
    pub expert_ids: Tensor<B, 2, Int>,
    /// `[T, K]` f32 weights of the chosen experts.
    pub weights: Tensor<B, 2>,
}

/// The constant in the normaliser `sum + 1e-20`, as in the reference: it keeps an all-zero
/// row finite.
const NORMALIZER_EPSILON: f64 = 1e-20;

impl GateRule {
    /// The gate on tensor ops, on the logits `[T, E]` (f32) and the bias `[E]` (f32): `select`
    /// gets the biased scores (detached) and must return what [`Selection::select`] returns.
    pub fn apply<B: Backend>(
        &self,
        logits: Tensor<B, 2>,
        bias: Tensor<B, 1>,
        select: impl FnOnce(Tensor<B, 2>, &Selection) -> Tensor<B, 2, Int>,
    ) -> Gated<B> {
        let scores = match self.score_function {
            ScoreFunction::Sigmoid => activation::sigmoid(logits),
            ScoreFunction::Softmax => activation::softmax(logits, 1),
        };
        let experts = scores.dims()[1];
        // Selection is discrete: it sees the bias and carries no gradient.
        let choice = scores.clone().detach() + bias.detach().reshape([1, experts]);
        let expert_ids = select(choice, &self.selection);
        let mut weights = scores.clone().gather(1, expert_ids.clone());
        if self.normalize_weights {
            let total = weights.clone().sum_dim(1).add_scalar(NORMALIZER_EPSILON);
            weights = weights.div(total);
        }
        Gated { scores, expert_ids, weights: weights.mul_scalar(self.route_scale) }
    }

    /// The gradient of the logits `[T, E]` from the weights' gradient `grad_weights` `[T, K]`,
    /// given the forward's `scores` `[T, E]` and `expert_ids` `[T, K]` (the selection is held
    /// fixed: it is piecewise constant). With normalisation, `w_k = r s_k / S` over the chosen
    /// `S = sum s + 1e-20` gives `dL/ds_k = r (g_k - sum_j g_j s_j / S) / S`; the chosen
    /// entries then go through the score function's derivative ([`GateRule::scores_grad`]).
    pub fn weights_grad<B: Backend>(
        &self,
        scores: Tensor<B, 2>,
        expert_ids: Tensor<B, 2, Int>,
        grad_weights: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        let [tokens, experts] = scores.dims();
        let grad = grad_weights.mul_scalar(self.route_scale);
        let grad_chosen = if self.normalize_weights {
            let chosen = scores.clone().gather(1, expert_ids.clone());
            let total = chosen.clone().sum_dim(1).add_scalar(NORMALIZER_EPSILON);
            let dot = (grad.clone() * chosen).sum_dim(1).div(total.clone());
            (grad - dot).div(total)
        } else {
            grad
        };
        // The K ids of a token are distinct, so the scatter writes each chosen entry once.
        let grad_scores = Tensor::<B, 2>::zeros([tokens, experts], &scores.device()).scatter(
            1,
            expert_ids,
            grad_chosen,
            IndexingUpdateOp::Add,
        );
        self.scores_grad(scores, grad_scores)
    }

    /// The gradient of the logits `[T, E]` from the scores' gradient `grad_scores` `[T, E]`,
    /// given the forward's `scores`: `s (1 - s) g` for sigmoid, `s (g - sum s g)` for softmax.
    pub fn scores_grad<B: Backend>(&self, scores: Tensor<B, 2>, grad_scores: Tensor<B, 2>) -> Tensor<B, 2> {
        match self.score_function {
            ScoreFunction::Sigmoid => grad_scores * scores.clone() * scores.neg().add_scalar(1.0),
            ScoreFunction::Softmax => {
                let mean = (grad_scores.clone() * scores.clone()).sum_dim(1);
                scores * (grad_scores - mean)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Distribution, TensorData};

    type A = Autodiff<NdArray<f64>>;

    fn values(t: Tensor<NdArray<f64>, 2>) -> Vec<f64> {
        t.into_data().iter::<f64>().collect()
    }

    /// The hand-written backward against burn's autodiff of [`GateRule::apply`], for both
    /// score functions, with and without normalisation, through the weights and the scores.
    #[test]
    fn backward_matches_autodiff_of_the_forward() {
        let device = Default::default();
        let (tokens, experts) = (7, 12);
        for score_function in [ScoreFunction::Sigmoid, ScoreFunction::Softmax] {
            for normalize_weights in [true, false] {
                let rule = GateRule {
                    score_function,
                    selection: Selection { top_k: 3, num_groups: 4, topk_groups: 2, group_score_topk: 2 },
                    normalize_weights,
                    route_scale: 2.5,
                };
                let logits =
                    Tensor::<A, 2>::random([tokens, experts], Distribution::Normal(0.0, 2.0), &device).require_grad();
                let bias = Tensor::<A, 1>::random([experts], Distribution::Normal(0.0, 0.1), &device);
                let grad_weights = Tensor::<NdArray<f64>, 2>::random([tokens, 3], Distribution::Default, &device);
                let grad_scores = Tensor::<NdArray<f64>, 2>::random([tokens, experts], Distribution::Default, &device);
                let gated = rule.apply(logits.clone(), bias, |c, s| s.select(c));
                let loss = (gated.weights * Tensor::from_inner(grad_weights.clone())).sum()
                    + (gated.scores.clone() * Tensor::from_inner(grad_scores.clone())).sum();
                let expected = logits.grad(&loss.backward()).unwrap();

                let scores = gated.scores.inner();
                let ids = Tensor::from_primitive(gated.expert_ids.into_primitive());
                let got = rule.weights_grad(scores.clone(), ids, grad_weights) + rule.scores_grad(scores, grad_scores);
                let (got, expected) = (values(got), values(expected));
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-12 * (1.0 + e.abs()),
                        "{score_function:?}, normalise {normalize_weights}: entry {i}: {g} against {e}"
                    );
                }
                // The check must not pass on an all-zero gradient.
                assert!(expected.iter().any(|e| e.abs() > 1e-3), "{:?}", TensorData::new(expected, [tokens, experts]));
            }
        }
    }
}
