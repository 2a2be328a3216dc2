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
use moe_balance::metrics::max_violation;
use moe_experts::{MoeAux, MoeBackend, MoeLayer};
use moe_model::{DeepSeekModel, ModelOutput};
use moe_parallel::Placement;
use moe_parallel::ep::{ExpertParallelMoe, LocalTransport, RoutedTokens, StepAccounting};
use serde::{Deserialize, Serialize};

use crate::settings::SettingsError;
use crate::train::TrainError;

/// What the ranks did in one optimizer step, summed over its micro-batches.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RankMetrics {
    /// `(token, expert)` pairs each rank computed, per MoE layer.
    pub rank_load: Vec<Vec<u64>>,
    /// MaxVio of the per-rank load, per MoE layer.
    pub rank_max_vio: Vec<f64>,
    /// Dispatch + combine bytes between ranks of one node, all MoE layers.
    pub bytes_intra_node: u64,
    /// Dispatch + combine bytes between nodes, all MoE layers.
    pub bytes_inter_node: u64,
    /// The most nodes one token's experts were on.
    pub max_nodes_reached: usize,
}

impl RankMetrics {
    /// Adds one pass's per-layer accounting.
    pub fn add(&mut self, layers: &[StepAccounting]) {
        self.rank_load.resize_with(layers.len(), Vec::new);
        for (sum, acc) in self.rank_load.iter_mut().zip(layers) {
            sum.resize(acc.pairs_per_rank.len(), 0);
            sum.iter_mut().zip(&acc.pairs_per_rank).for_each(|(s, p)| *s += p);
            self.bytes_intra_node += acc.bytes_intra_node;
            self.bytes_inter_node += acc.bytes_inter_node;
            self.max_nodes_reached = self.max_nodes_reached.max(acc.max_nodes_reached());
        }
        self.rank_max_vio = self.rank_load.iter().map(|l| max_violation(l)).collect();
    }
}

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
