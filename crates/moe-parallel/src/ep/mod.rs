//! The MoE layer with its experts sharded over logical ranks: each rank holds `E / R`
//! experts, routes its own tokens, sends each token once to every rank holding one of its
//! experts, computes the rows it received with its shard, and sends the weighted partial sums
//! back, where they are added up with the shared experts' output. The exchange goes through a
//! [`Transport`]; [`LocalTransport`] runs all ranks in one process. Ranks in their own
//! threads or processes call [`ExpertParallelMoe::forward_rank`] with a [`RankTransport`]:
//! [`DataServiceTransport`] moves the messages through burn-communication's tensor data
//! service (WebSocket, peer to peer), the engine burn-collective's global level uses;
//! [`all_reduce_replicated_grads`] all-reduces the data-parallel parameters' gradients
//! through burn-collective.

mod accounting;
mod backward;
mod data_service;
mod grad_sync;
mod layer;
mod transport;
mod wire;

use thiserror::Error;

pub use accounting::{RankAccounting, StepAccounting};
pub use backward::{RankGradients, RankTape};
pub use data_service::{DataServiceTransport, free_loopback_port};
pub use grad_sync::{GradSyncError, all_reduce_replicated_grads};
pub use layer::{CombineMessage, DispatchMessage, ExpertParallelMoe, RoutedTokens};
pub use transport::{LocalTransport, Message, RankTransport, Transport};
pub use wire::WireMessage;

/// Why an expert-parallel forward could not run.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum EpError {
    /// The placement's experts differ from the layer's.
    #[error("the placement holds {placement} experts, the layer {layer}")]
    ExpertCount {
        /// The placement's `E`.
        placement: usize,
        /// The layer's `E`.
        layer: usize,
    },
    /// Not one input per rank.
    #[error("got {got} inputs, expected one per rank ({expected})")]
    RankCount {
        /// Inputs given.
        got: usize,
        /// Ranks.
        expected: usize,
    },
    /// A rank's input is not `[T, d]` with the layer's `d`, or the rank does not exist.
    #[error("rank {rank}'s input is {dims:?}, expected [T, {d_model}]")]
    InputShape {
        /// The rank.
        rank: usize,
        /// Its input's shape.
        dims: [usize; 2],
        /// The layer's width.
        d_model: usize,
    },
    /// A rank handed the transport the wrong number of messages.
    #[error("rank {rank} sent {got} messages, expected one per rank ({expected})")]
    MessageCount {
        /// The rank.
        rank: usize,
        /// Messages given.
        got: usize,
        /// Ranks.
        expected: usize,
    },
    /// A routed expert id outside the placement.
    #[error("expert id {expert} is outside the placement's {experts} experts")]
    ExpertId {
        /// The id.
        expert: usize,
        /// `E`.
        experts: usize,
    },
    /// A token reached more nodes than node-limited routing allows.
    #[error("rank {rank}'s token {token} reached {nodes} nodes, more than the limit {limit}")]
    NodeLimit {
        /// The token's rank.
        rank: usize,
        /// The token's row on that rank.
        token: usize,
        /// Nodes it reached.
        nodes: usize,
        /// `M`.
        limit: usize,
    },
    /// A message arrived with the wrong number of parts.
    #[error("a message arrived in {got} parts, expected {expected}")]
    WireParts {
        /// Parts received.
        got: usize,
        /// Parts of the message type.
        expected: usize,
    },
    /// A message part has the wrong rank.
    #[error("a message part of shape {dims:?} arrived where a rank-{rank} tensor was expected")]
    WirePart {
        /// Its shape.
        dims: Vec<usize>,
        /// The expected rank.
        rank: usize,
    },
    /// The transport between ranks failed.
    #[error("transport: rank {rank} <-> rank {peer}: {reason}")]
    Transport {
        /// This rank.
        rank: usize,
        /// The other rank.
        peer: usize,
        /// What failed (the underlying error as text).
        reason: String,
    },
    /// The expert computation failed.
    #[error(transparent)]
    Moe(#[from] moe_experts::MoeError),
}

#[cfg(test)]
mod distributed_tests;
