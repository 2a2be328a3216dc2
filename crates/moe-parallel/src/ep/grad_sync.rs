//! The data-parallel half of expert parallelism: every rank holds a copy of the router and
//! the shared experts and computes their gradients on its own tokens; one all-reduce through
//! burn-collective sums them.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorPrimitive};
use burn_collective::{PeerId, ReduceOperation, all_reduce};
use thiserror::Error;

use super::{ExpertParallelMoe, RankGradients};

/// Why the gradient all-reduce failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GradSyncError {
    /// burn-collective refused or failed the all-reduce.
    #[error("all-reduce of {params} gradients ({elements} values) failed: {reason}")]
    AllReduce {
        /// Parameters in the bucket.
        params: usize,
        /// Values in the bucket.
        elements: usize,
        /// burn-collective's error, as text.
        reason: String,
    },
}

/// A trainable parameter's gradient, flattened, with what it takes to put it back.
struct Flat<B: Backend> {
    id: ParamId,
    dims: Vec<usize>,
    values: Tensor<B, 1>,
}

/// Takes each trainable parameter's gradient out of `grads`, flattened (zeros when this
/// rank's tokens gave it none, e.g. an empty rank, so that every peer packs the same list in
/// the same order).
struct Gather<'a, B: AutodiffBackend> {
    grads: &'a mut RankGradients<B>,
    flats: Vec<Flat<B::InnerBackend>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Gather<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let dims = value.dims();
        let grad = self
            .grads
            .grad_remove(&value)
            .unwrap_or_else(|| Tensor::<B::InnerBackend, D>::zeros(dims, &value.inner().device()));
        let count: usize = dims.iter().product();
        self.flats.push(Flat { id: param.id, dims: dims.to_vec(), values: grad.reshape([count]) });
    }
}

/// Puts the summed flat gradients back with their parameter's rank.
struct Scatter<B: Backend> {
    flats: std::vec::IntoIter<Flat<B>>,
    out: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scatter<B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.val().is_require_grad() {
            return;
        }
        // Same modules, same order as the gather: the next flat is this parameter's.
        if let Some(flat) = self.flats.next() {
            let mut dims = [0; D];
            dims.copy_from_slice(&flat.dims);
            self.out.register(flat.id, flat.values.reshape(dims));
        }
    }
}

/// Sums the gradients of `layer`'s replicated (data-parallel) parameters, the router's and
/// the shared experts', over the burn-collective peers, taking them out of `grads` (from
/// [`ExpertParallelMoe::backward_rank`], or [`RankGradients::new`] around a plain backward);
/// the routed experts' gradients stay with their rank. The gradients travel as one flat
/// bucket, so a step costs one all-reduce (and one global synchronisation: burn-collective
/// 0.21's global level completes only one all-reduce per registration, see
/// `docs/parallelism.md`). Every peer must call this at the same point, after
/// `burn_collective::register::<B::InnerBackend>` (threads of one process, or nodes with the
/// global orchestrator). Returns the summed gradients by parameter id, for an optimizer.
pub fn all_reduce_replicated_grads<B: AutodiffBackend>(
    peer: PeerId,
    layer: &ExpertParallelMoe<B>,
    grads: &mut RankGradients<B>,
) -> Result<GradientsParams, GradSyncError> {
    let mut gather = Gather::<B> { grads, flats: Vec::new() };
    layer.router.visit(&mut gather);
    if let Some(shared) = &layer.shared {
        shared.visit(&mut gather);
    }
    let mut flats = gather.flats;
    if flats.is_empty() {
        return Ok(GradientsParams::new());
    }
    let sizes: Vec<usize> = flats.iter().map(|f| f.values.dims()[0]).collect();
    let bucket = Tensor::cat(flats.iter().map(|f| f.values.clone()).collect(), 0);
    let elements = bucket.dims()[0];
    let summed = all_reduce::<B::InnerBackend>(peer, bucket.into_primitive().tensor(), ReduceOperation::Sum)
        .map_err(|e| GradSyncError::AllReduce { params: flats.len(), elements, reason: format!("{e:?}") })?;
    let summed = Tensor::<B::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(summed));
    let mut start = 0;
    for (flat, size) in flats.iter_mut().zip(sizes) {
        flat.values = summed.clone().narrow(0, start, size);
        start += size;
    }
    let mut scatter = Scatter::<B::InnerBackend> { flats: flats.into_iter(), out: GradientsParams::new() };
    layer.router.visit(&mut scatter);
    if let Some(shared) = &layer.shared {
        shared.visit(&mut scatter);
    }
    Ok(scatter.out)
}
