//! Training with `parallel.expert_ranks = R`: every MoE layer's routed experts sharded over
//! `R` logical ranks in this process (`moe_parallel::ep` with its in-process transport), each
//! rank taking `batch / R` whole sequences; the per-rank load and the traffic the exchange
//! would move are recorded per step.
//!
//! The layer routes the whole batch once ([`MoeLayer::route`]: the losses and loads stay the
//! plain layer's), then a view of its experts ([`ExpertParallelMoe::view_of`]) dispatches,
//! computes and combines rank by rank, so gradients reach the model's own parameters and the
//! optimizer, checkpoints and bias updates are the single-rank ones.

use burn::tensor::Tensor;
use moe_experts::{MoeAux, MoeBackend, MoeLayer};
use moe_model::{DeepSeekModel, ModelOutput};
use moe_parallel::Placement;
use moe_parallel::ep::{ExpertParallelMoe, LocalTransport, RoutedTokens, StepAccounting};

use crate::error::TrainError;
use crate::settings::SettingsError;

/// Runs a model with its MoE layers sharded over the ranks of a placement.
#[derive(Debug, Clone, Copy)]
pub struct ShardedModel {
    placement: Placement,
}

impl ShardedModel {
    /// Shards over `placement` (its experts must be the model's).
    pub fn new(placement: Placement) -> Self {
        Self { placement }
    }

    /// The forward of `model` on `tokens` `[batch, seq]`, with each MoE layer's accounting,
    /// in layer order. `batch` must be a multiple of the ranks (an error names it otherwise).
    pub fn forward<B: MoeBackend>(
        &self,
        model: &DeepSeekModel<B>,
        tokens: Tensor<B, 2, burn::tensor::Int>,
    ) -> Result<(ModelOutput<B>, Vec<StepAccounting>), TrainError> {
        let mut accounting = Vec::new();
        let out = model.forward_with(tokens, &mut |layer: &MoeLayer<B>, x: Tensor<B, 3>| {
            let (y, aux, acc) = self.layer_forward(layer, x)?;
            accounting.push(acc);
            Ok::<_, TrainError>((y, aux))
        })?;
        Ok((out, accounting))
    }

    fn layer_forward<B: MoeBackend>(
        &self,
        layer: &MoeLayer<B>,
        x: Tensor<B, 3>,
    ) -> Result<(Tensor<B, 3>, MoeAux<B>, StepAccounting), TrainError> {
        let [batch, seq, d] = x.dims();
        let ranks = self.placement.num_ranks();
        if !batch.is_multiple_of(ranks) {
            return Err(SettingsError::Value {
                key: "data.batch_size",
                value: batch.to_string(),
                expected: "a multiple of parallel.expert_ranks",
            }
            .into());
        }
        let (flat, aux) = layer.route(x)?;
        let ep = ExpertParallelMoe::view_of(layer, self.placement)?;
        // One host read of every rank's ids (the dispatch sizes its messages from them).
        let ids = RoutedTokens::host_ids(aux.expert_ids.clone());
        let k = aux.expert_ids.dims()[1];
        // Whole sequences per rank, as data-parallel ranks would hold them.
        let rows = batch / ranks * seq;
        let inputs = (0..ranks)
            .map(|r| RoutedTokens {
                x: flat.clone().narrow(0, r * rows, rows),
                expert_ids: ids[r * rows * k..(r + 1) * rows * k].to_vec(),
                weights: aux.weights.clone().narrow(0, r * rows, rows),
            })
            .collect();
        let (outputs, accounting) = ep.forward_routed(inputs, &mut LocalTransport::new())?;
        Ok((Tensor::cat(outputs, 0).reshape([batch, seq, d]), aux, accounting))
    }
}
