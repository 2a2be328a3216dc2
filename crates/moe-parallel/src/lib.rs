//! Expert parallelism: placement of experts on ranks and nodes, and the traffic it causes.
//!
//! - [`Placement`]: `E` experts over `R` ranks over `N` nodes, contiguous, so that routing
//!   groups equal to nodes make DeepSeek-V3's group limit a node limit.
//! - [`sim`]: a traffic simulator for one MoE layer on a cluster: nodes reached per token,
//!   InfiniBand and NVLink bytes, all-to-all time against expert compute, per-GPU load.
//! - [`ep`]: the MoE layer with its experts sharded over ranks, exchanging token rows through
//!   a transport: logical ranks in one process ([`ep::LocalTransport`]), or ranks in threads
//!   or processes ([`ep::DataServiceTransport`], burn-communication's tensor data service),
//!   with the replicated parameters' gradients all-reduced through burn-collective; per-step
//!   accounting of bytes within and across nodes, nodes per token and load per rank.
//! - [`eplb`]: load-aware placement: replicate hot experts into spare slots and pack them so
//!   that per-GPU load is even, groups to nodes first, then experts to GPUs.
//! - [`SplitMix64`]: the seeded generator of the simulator and the runner's batch sampler.

pub mod ep;
pub mod eplb;
mod placement;
mod rng;
pub mod sim;

pub use placement::{Placement, PlacementError};
pub use rng::SplitMix64;
