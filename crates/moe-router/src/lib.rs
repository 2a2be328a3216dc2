//! DeepSeek-V3's top-K router, generic over a burn backend.
//!
//! Affinity `s = sigmoid(x . e_i)` (or softmax); selection is the top-K of `s + b`, where the
//! per-expert bias `b` is state the load-balancer moves and autodiff never sees; the weights
//! come from the unbiased `s` of the chosen experts, optionally normalised over them, times a
//! route scale. With groups, only the best `topk_groups` groups (by the sum of their top-2
//! biased scores) stay candidates; the rest are masked with `-inf`. All router math is f32.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Distribution, Tensor};
//! use moe_router::RouterConfig;
//!
//! let device = Default::default();
//! let config = RouterConfig::new(16, 8, 2).with_num_groups(4).with_topk_groups(2);
//! let router = config.init::<NdArray>(&device).unwrap();
//! let x = Tensor::<NdArray, 2>::random([5, 16], Distribution::Normal(0.0, 1.0), &device);
//! let routing = router.forward(x);
//! assert_eq!(routing.expert_ids.dims(), [5, 2]);
//! // Weights are normalised over the chosen experts, times the route scale (1.0).
//! let sums = routing.weights.sum_dim(1).into_data();
//! sums.assert_approx_eq::<f32>(&Tensor::<NdArray, 2>::ones([5, 1], &device).into_data(), Default::default());
//! // Counts add up to T * K.
//! assert_eq!(routing.counts.sum().into_scalar(), 10);
//! ```

mod config;
mod router;

pub use config::{RouterConfig, RouterConfigError};
pub use router::{Routing, TopKRouter};
