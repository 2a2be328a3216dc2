//! The MoE layer with its experts sharded over logical ranks: each rank holds `E / R`
//! experts, routes its own tokens, sends each token once to every rank holding one of its
//! experts, computes the rows it received with its shard, and sends the weighted partial sums
//! back, where they are added up with the shared experts' output. The exchange goes through a
//! [`Transport`]; [`LocalTransport`] runs all ranks in one process.

mod layer;
mod transport;

use thiserror::Error;

pub use layer::{CombineMessage, DispatchMessage, ExpertParallelMoe};
pub use transport::{LocalTransport, Message, Transport};

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
    /// A rank's input is not `[T, d]` with `T >= 1` and the layer's `d`.
    #[error("rank {rank}'s input is {dims:?}, expected [T >= 1, {d_model}]")]
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
    /// The expert computation failed.
    #[error(transparent)]
    Moe(#[from] moe_experts::MoeError),
}
