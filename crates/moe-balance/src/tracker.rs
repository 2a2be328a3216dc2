use burn::tensor::{Int, Tensor, backend::Backend};

/// Per-layer, per-expert token counts over one optimizer step.
///
/// Counts stay on the device until [`LoadTracker::take`], which reads them all in one
/// transfer. Record only training forward passes: eval batches and activation recomputation
/// must not move the bias.
#[derive(Debug, Clone)]
pub struct LoadTracker<B: Backend> {
    num_experts: usize,
    pending: Vec<Option<Tensor<B, 1, Int>>>,
}

impl<B: Backend> LoadTracker<B> {
    /// A tracker for `num_layers` MoE layers of `num_experts` experts each.
    pub fn new(num_layers: usize, num_experts: usize) -> Self {
        Self { num_experts, pending: vec![None; num_layers] }
    }

    /// Adds one micro-batch's counts `[E]` for `layer`.
    pub fn record(&mut self, layer: usize, counts: Tensor<B, 1, Int>) {
        let slot = &mut self.pending[layer];
        *slot = Some(match slot.take() {
            Some(sum) => sum + counts,
            None => counts,
        });
    }

    /// The summed loads of every layer since the last call (zeros for a layer with no
    /// record), and a reset.
    pub fn take(&mut self) -> Vec<Vec<u64>> {
        let recorded: Vec<Tensor<B, 1, Int>> = self.pending.iter().flatten().cloned().collect();
        let mut host = if recorded.is_empty() {
            Vec::new()
        } else {
            Tensor::cat(recorded, 0).into_data().iter::<i64>().map(|c| c.max(0) as u64).collect()
        }
        .into_iter();
        self.pending
            .iter_mut()
            .map(|slot| match slot.take() {
                Some(_) => host.by_ref().take(self.num_experts).collect(),
                None => vec![0; self.num_experts],
            })
            .collect()
    }

    /// MoE layers tracked.
    pub fn num_layers(&self) -> usize {
        self.pending.len()
    }
}
