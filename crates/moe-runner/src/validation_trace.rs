//! Recording a finished run's validation routing: for every MoE layer, the experts each
//! validation token chose, as a `moe_balance::RoutingTrace` (whose module, `moe_balance::trace`,
//! owns the binary format), written to the run's `routing_trace.bin` (for analysis and for
//! `cargo xtask simulate --routing trace:FILE`).

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use moe_balance::{RoutingTrace, TraceError};
use moe_experts::MoeBackend;
use moe_model::{DeepSeekModel, ModelError};

use crate::corpus::Corpus;
use crate::settings::RunConfig;

/// Why the validation trace could not be recorded or written.
#[derive(Debug, thiserror::Error)]
pub enum ValidationTraceError {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The trace could not be built or written.
    #[error("routing trace: {0}")]
    Trace(#[from] TraceError),
}

/// Routes the fixed validation windows (the ones `evaluate` scores) through `model`.
pub fn record<B: MoeBackend>(
    model: &DeepSeekModel<B>,
    corpus: &Corpus,
    config: &RunConfig,
    device: &B::Device,
) -> Result<RoutingTrace, ValidationTraceError> {
    let (count, batch, seq) = (config.train.eval_batches, config.data.batch_size, config.data.seq_len);
    let moe = &config.model.moe;
    let mut layers = vec![Vec::new(); config.model.num_moe_layers()];
    for i in 0..count {
        let b = corpus.val_batch(i, count, batch, seq);
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(b.inputs, [batch, seq]), device);
        for (ids, aux) in layers.iter_mut().zip(model.forward(input)?.moe) {
            ids.extend(aux.expert_ids.into_data().iter::<i64>().map(|e| e as u32));
        }
    }
    let mut trace = RoutingTrace::new(moe.n_routed_experts as u32, moe.num_experts_per_tok as u32)?;
    for ids in &layers {
        trace.push_layer(ids)?;
    }
    Ok(trace)
}

/// Records the trace and writes it to `path`.
pub fn write<B: MoeBackend>(
    path: &Path,
    model: &DeepSeekModel<B>,
    corpus: &Corpus,
    config: &RunConfig,
    device: &B::Device,
) -> Result<RoutingTrace, ValidationTraceError> {
    let trace = record(model, corpus, config, device)?;
    trace.save(path)?;
    Ok(trace)
}
