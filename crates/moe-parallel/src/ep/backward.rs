//! The backward of a rank's forward when the exchange cuts the autodiff graph (ranks in
//! threads or processes): the gradients of what was received are sent back the way the
//! tensors came, one all-to-all per exchange, and each rank runs the backward of its own part.

use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use moe_experts::MoeBackend;

use super::{CombineMessage, DispatchMessage, EpError, ExpertParallelMoe, RankAccounting, RankTransport};

/// What a rank keeps from [`ExpertParallelMoe::forward_rank_traced`] for
/// [`ExpertParallelMoe::backward_rank`]: per peer, what it sent (still attached to its graph)
/// and what it received (fresh graph leaves).
#[derive(Debug)]
pub struct RankTape<B: AutodiffBackend> {
    sent_rows: Vec<Option<Tensor<B, 2>>>,
    sent_weights: Vec<Option<Tensor<B, 1>>>,
    received_rows: Vec<Option<Tensor<B, 2>>>,
    received_weights: Vec<Option<Tensor<B, 1>>>,
    replies: Vec<Option<Tensor<B, 2>>>,
    returned: Vec<Option<Tensor<B, 2>>>,
}

/// A rank's gradients, from the caller's backward and from the two backward passes that
/// [`ExpertParallelMoe::backward_rank`] adds; a tensor's gradient is the sum over the parts.
#[derive(Debug)]
pub struct RankGradients<B: AutodiffBackend> {
    parts: Vec<B::Gradients>,
}

impl<B: AutodiffBackend> RankGradients<B> {
    /// Wraps one backward's gradients.
    pub fn new(grads: B::Gradients) -> Self {
        Self { parts: vec![grads] }
    }

    /// `tensor`'s gradient summed over the parts, `None` when no part has one.
    pub fn grad<const D: usize>(&self, tensor: &Tensor<B, D>) -> Option<Tensor<B::InnerBackend, D>> {
        self.parts.iter().filter_map(|g| tensor.grad(g)).reduce(|a, b| a + b)
    }

    /// [`Self::grad`], removing it from every part.
    pub fn grad_remove<const D: usize>(&mut self, tensor: &Tensor<B, D>) -> Option<Tensor<B::InnerBackend, D>> {
        self.parts.iter_mut().filter_map(|g| tensor.grad_remove(g)).reduce(|a, b| a + b)
    }
}

/// A received tensor as a leaf of this rank's graph (its gradient is sent back).
fn leaf<B: AutodiffBackend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    t.detach().require_grad()
}

/// `sum(a * g)`: backpropagating it gives `a`'s graph the upstream gradient `g`.
fn surrogate<B: AutodiffBackend, const D: usize>(
    a: &Option<Tensor<B, D>>,
    g: Option<Tensor<B, D>>,
) -> Option<Tensor<B, 1>> {
    match (a, g) {
        (Some(a), Some(g)) => Some((a.clone() * g).sum()),
        _ => None,
    }
}

fn backward_of<B: AutodiffBackend>(terms: Vec<Tensor<B, 1>>) -> Option<B::Gradients> {
    terms.into_iter().reduce(|a, b| a + b).map(|loss| loss.backward())
}

impl<B: MoeBackend + AutodiffBackend> ExpertParallelMoe<B> {
    /// [`Self::forward_rank`] for training: also returns the tape that
    /// [`Self::backward_rank`] needs.
    pub fn forward_rank_traced(
        &self,
        x: Tensor<B, 2>,
        transport: &mut impl RankTransport<B>,
    ) -> Result<(Tensor<B, 2>, RankAccounting, RankTape<B>), EpError> {
        let ranks = self.placement().num_ranks();
        if transport.num_ranks() != ranks {
            return Err(EpError::RankCount { got: transport.num_ranks(), expected: ranks });
        }
        let rank = transport.rank();
        let (mut state, messages) = self.dispatch(rank, x)?;
        let sent_rows = messages.iter().map(|m| m.rows.clone()).collect();
        let sent_weights = messages.iter().map(|m| m.weights.clone()).collect();
        // Every received tensor becomes a leaf, this rank's own message included, so that
        // each gradient goes back through the same path.
        let incoming: Vec<DispatchMessage<B>> = transport
            .exchange(messages)?
            .into_iter()
            .map(|m| DispatchMessage { rows: m.rows.map(leaf), pairs: m.pairs, weights: m.weights.map(leaf) })
            .collect();
        let received_rows = incoming.iter().map(|m| m.rows.clone()).collect();
        let received_weights = incoming.iter().map(|m| m.weights.clone()).collect();
        let (replies, pairs) = self.compute(rank, incoming)?;
        state.accounting.pairs_computed = pairs;
        let reply_rows = replies.iter().map(|m| m.rows.clone()).collect();
        let returned: Vec<CombineMessage<B>> =
            transport.exchange(replies)?.into_iter().map(|m| CombineMessage { rows: m.rows.map(leaf) }).collect();
        let returned_rows = returned.iter().map(|m| m.rows.clone()).collect();
        let accounting = state.accounting.clone();
        let tape = RankTape {
            sent_rows,
            sent_weights,
            received_rows,
            received_weights,
            replies: reply_rows,
            returned: returned_rows,
        };
        Ok((self.combine(state, returned), accounting, tape))
    }

    /// The rest of the backward after the caller's `loss.backward()` (`grads`): sends the
    /// combine's gradients to the ranks that computed those rows, backpropagates them through
    /// this rank's experts, sends the gradients of the received rows and weights to their
    /// ranks, and backpropagates those into this rank's input and router. All ranks call it
    /// together. The result holds the input's, the router's, the shared and the routed
    /// experts' gradients of this rank's part (replicated parameters still to be
    /// all-reduced, see [`super::all_reduce_replicated_grads`]).
    pub fn backward_rank(
        &self,
        tape: RankTape<B>,
        grads: B::Gradients,
        transport: &mut impl RankTransport<B>,
    ) -> Result<RankGradients<B>, EpError> {
        let d_returned = tape
            .returned
            .iter()
            .map(|r| CombineMessage { rows: r.as_ref().and_then(|t| t.grad(&grads)).map(Tensor::from_inner) })
            .collect();
        let d_replies = transport.exchange(d_returned)?;
        let mut parts = vec![grads];
        let terms = tape.replies.iter().zip(d_replies).filter_map(|(a, g)| surrogate(a, g.rows)).collect();
        let compute_grads = backward_of(terms);
        let d_received = tape
            .received_rows
            .iter()
            .zip(&tape.received_weights)
            .map(|(rows, weights)| {
                let grad_of = |t: &Option<Tensor<B, 2>>| compute_grads.as_ref().and_then(|g| t.as_ref()?.grad(g));
                let rows_grad = grad_of(rows).map(Tensor::from_inner);
                let weights_grad =
                    compute_grads.as_ref().and_then(|g| weights.as_ref()?.grad(g)).map(Tensor::from_inner);
                DispatchMessage { rows: rows_grad, pairs: Vec::new(), weights: weights_grad }
            })
            .collect();
        parts.extend(compute_grads);
        let d_sent = transport.exchange(d_received)?;
        let mut terms = Vec::new();
        for ((rows, weights), g) in tape.sent_rows.iter().zip(&tape.sent_weights).zip(d_sent) {
            terms.extend(surrogate(rows, g.rows));
            terms.extend(surrogate(weights, g.weights));
        }
        parts.extend(backward_of(terms));
        Ok(RankGradients { parts })
    }
}
