use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Tensor, backend::Backend};
use moe_kernels::MoeBackend;

/// A bias-free SwiGLU MLP, `down(silu(x gate) * (x up))`: DeepSeek's dense MLP and its shared
/// experts (S experts of width h are one SwiGlu of width S*h).
#[derive(Config, Debug)]
pub struct SwiGluConfig {
    /// Input and output width.
    pub d_model: usize,
    /// Hidden width.
    pub hidden: usize,
}

/// See [`SwiGluConfig`].
#[derive(Module, Debug)]
pub struct SwiGlu<B: Backend> {
    /// `[d, hidden]`.
    pub gate: Param<Tensor<B, 2>>,
    /// `[d, hidden]`.
    pub up: Param<Tensor<B, 2>>,
    /// `[hidden, d]`.
    pub down: Param<Tensor<B, 2>>,
}

impl SwiGluConfig {
    /// A randomly initialised MLP (Kaiming-uniform on fan-in, as burn's `Linear`).
    pub fn init<B: Backend>(&self, device: &B::Device) -> SwiGlu<B> {
        let (d, h) = (self.d_model, self.hidden);
        SwiGlu {
            gate: fan_in_uniform().init_with([d, h], Some(d), Some(h), device),
            up: fan_in_uniform().init_with([d, h], Some(d), Some(h), device),
            down: fan_in_uniform().init_with([h, d], Some(h), Some(d), device),
        }
    }
}

pub(crate) fn fan_in_uniform() -> Initializer {
    Initializer::KaimingUniform { gain: 1.0 / 3f64.sqrt(), fan_out_only: false }
}

impl<B: Backend> SwiGlu<B> {
    /// `x` `[T, d]` -> `[T, d]`, in `x`'s dtype.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.forward_with(x, Tensor::matmul, moe_kernels::portable::silu_mul)
    }

    /// [`SwiGlu::forward`] with its three products run by `matmul` (`[T, a] x [a, b]`) and
    /// its activation by `silu_mul` (`silu(g) * u`), e.g. a backend's own kernels.
    pub fn forward_with(
        &self,
        x: Tensor<B, 2>,
        matmul: fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>,
        silu_mul: fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        // In `x`'s dtype: f32 parameters run bf16 products under mixed precision.
        let weight = |p: &Param<Tensor<B, 2>>| p.val().cast(x.dtype());
        let (gate, up, down) = (weight(&self.gate), weight(&self.up), weight(&self.down));
        let g = matmul(x.clone(), gate);
        let u = matmul(x, up);
        matmul(silu_mul(g, u), down)
    }
}

impl<B: MoeBackend> SwiGlu<B> {
    /// [`SwiGlu::forward`] on the backend's MoE operations: `moe_dense_matmul` for the
    /// products and `moe_silu_mul` for the activation (the shared experts beside the routed).
    pub fn forward_moe(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.forward_with(x, B::moe_dense_matmul, B::moe_silu_mul)
    }
}
