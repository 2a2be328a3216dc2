//! Expert load balancing, generic over a burn backend.
//!
//! - [`LoadTracker`]: per-layer, per-expert token counts summed over the micro-batches of one
//!   optimizer step. Feed it from training forward passes only.
//! - [`BiasBalancer`]: DeepSeek's loss-free balancing, `b_i += gamma * sign(mean - load_i)`,
//!   once per optimizer step, outside autodiff.
//! - [`losses`]: the sequence-wise balance loss, the Switch/GShard batch aux loss, the z-loss.
//! - [`metrics`]: MaxVio per batch and over an eval set, load histograms, a collapse alarm.
//! - [`trace`]: [`RoutingTrace`], the experts every token chose per layer, as a binary file.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Int, Tensor};
//! use moe_balance::{BiasBalancer, BiasUpdateConfig, LoadTracker, metrics::max_violation};
//!
//! let device = Default::default();
//! let mut tracker = LoadTracker::<NdArray>::new(1, 4);
//! // Two micro-batches of one step.
//! tracker.record(0, Tensor::<NdArray, 1, Int>::from_ints([6, 1, 1, 0], &device));
//! tracker.record(0, Tensor::<NdArray, 1, Int>::from_ints([2, 1, 3, 2], &device));
//! let loads = tracker.take();
//! assert_eq!(loads[0], vec![8, 2, 4, 2]);
//! assert_eq!(max_violation(&loads[0]), 1.0); // (8 - 4) / 4
//! let delta = BiasBalancer::new(BiasUpdateConfig::new()).bias_delta(&loads[0]);
//! assert_eq!(delta, vec![-1e-3, 1e-3, 0.0, 1e-3]);
//! ```

mod bias;
pub mod losses;
pub mod metrics;
pub mod trace;
mod tracker;

pub use bias::{BiasBalancer, BiasUpdateConfig};
pub use trace::{RoutingTrace, TraceError};
pub use tracker::LoadTracker;
