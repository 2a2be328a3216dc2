//! Shared set-up of the criterion benches: the CPU backend chosen by feature, and the layer
//! shapes of the table.

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use moe_experts::{MoeLayer, MoeLayerConfig};
use moe_router::RouterConfig;

/// The backend the benches run on: Flex (the default feature), else NdArray (with a system
/// BLAS under `--features blas`).
#[cfg(feature = "flex")]
pub type Cpu = burn::backend::Flex;
/// The backend the benches run on: Flex (the default feature), else NdArray (with a system
/// BLAS under `--features blas`).
#[cfg(not(feature = "flex"))]
pub type Cpu = burn::backend::NdArray;

/// Tokens per batch in every bench.
pub const TOKENS: usize = 4096;
/// Token width.
pub const D_MODEL: usize = 512;
/// Hidden width of one expert.
pub const HIDDEN: usize = 256;

/// A layer with `experts` experts, top-`k`, `shared` shared experts, no groups, no balance loss,
/// and a batch of `TOKENS` random tokens.
pub fn layer_and_input<B: Backend>(experts: usize, k: usize, shared: usize) -> (MoeLayer<B>, Tensor<B, 3>) {
    let device = Default::default();
    B::seed(&device, 0);
    let config = MoeLayerConfig::new(RouterConfig::new(D_MODEL, experts, k), HIDDEN)
        .with_num_shared(shared)
        .with_seq_balance_alpha(0.0);
    let layer = config.init::<B>(&device).expect("bench shapes are valid");
    let x = Tensor::random([1, TOKENS, D_MODEL], Distribution::Normal(0.0, 1.0), &device);
    (layer, x)
}
