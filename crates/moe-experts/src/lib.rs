//! The DeepSeek-V3 Mixture-of-Experts layer, generic over a burn backend.
//!
//! - [`ExpertBank`]: E SwiGLU experts stacked as `[E, d, h]` / `[E, h, d]` tensors, run by
//!   dropless sorted dispatch through [`moe_kernels::MoeBackend`]; [`ExpertBank::forward_loop`]
//!   is the per-expert loop kept as test oracle and bench baseline.
//! - [`SwiGlu`]: the shared experts (S experts held as one MLP of width S*h).
//! - [`MoeLayer`]: router + experts + shared experts + balance losses; the forward returns the
//!   output and a [`MoeAux`] record (losses, counts, drops) for the caller to use.
//! - [`hf`]: loading a layer from an HF DeepSeek-V3 `config.json` + safetensors, through a
//!   [`safetensors_source::TensorSource`] (errors: [`LoadError`]).
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::tensor::{Distribution, Tensor};
//! use moe_experts::MoeLayerConfig;
//! use moe_router::RouterConfig;
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! // d = 32, 8 experts of width 16, top-2, 1 shared expert.
//! let config = MoeLayerConfig::new(RouterConfig::new(32, 8, 2), 16).with_num_shared(1);
//! let layer = config.init::<B>(&device).unwrap();
//! let x = Tensor::<B, 3>::random([2, 5, 32], Distribution::Normal(0.0, 1.0), &device);
//! let (y, aux) = layer.forward(x).unwrap();
//! assert_eq!(y.dims(), [2, 5, 32]);
//! assert_eq!(aux.dropped, 0);
//! // Train through it: the balance loss joins the task loss.
//! let loss = y.powi_scalar(2).mean() + aux.loss().unwrap();
//! let grads = loss.backward();
//! assert!(layer.experts.gate.grad(&grads).is_some());
//! ```

mod bank;
mod error;
pub mod hf;
mod layer;
pub mod safetensors_source;
mod swiglu;

pub use bank::{ExpertBank, ExpertBankConfig};
pub use error::{LoadError, MoeError};
pub use layer::{CapacityConfig, DropPolicy, MoeAux, MoeLayer, MoeLayerConfig};
/// The backend bound of the forward passes, re-exported so users need one import.
pub use moe_kernels::MoeBackend;
pub use swiglu::{SwiGlu, SwiGluConfig};
