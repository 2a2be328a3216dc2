use burn::module::Module;
use burn::nn::{Linear, LinearConfig, RotaryEncoding, RotaryEncodingConfig};
use burn::tensor::{Bool, Tensor, activation::softmax, backend::Backend};

/// The attention of a decoder block. An enum so that MLA can join as a variant without
/// touching the blocks.
#[derive(Module, Debug)]
pub enum Attention<B: Backend> {
    /// Multi-head attention with RoPE.
    MultiHead(MultiHeadAttention<B>),
}

impl<B: Backend> Attention<B> {
    /// Causal self-attention over `x` `[batch, seq, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::MultiHead(mha) => mha.forward(x),
        }
    }
}

/// Causal multi-head self-attention with rotary positions (interleaved pairs, as DeepSeek).
#[derive(Module, Debug)]
pub struct MultiHeadAttention<B: Backend> {
    query: Linear<B>,
    key: Linear<B>,
    value: Linear<B>,
    output: Linear<B>,
    rope: RotaryEncoding<B>,
    heads: usize,
}

impl<B: Backend> MultiHeadAttention<B> {
    /// `heads` heads over width `d`; `d / heads` must be even (the config validates it).
    pub fn new(d: usize, heads: usize, max_len: usize, theta: f64, device: &B::Device) -> Self {
        let linear = || LinearConfig::new(d, d).with_bias(false).init(device);
        Self {
            query: linear(),
            key: linear(),
            value: linear(),
            output: linear(),
            rope: RotaryEncodingConfig::new(max_len, d / heads).with_theta(theta as f32).init(device),
            heads,
        }
    }

    fn split_heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, l, d] = x.dims();
        x.reshape([b, l, self.heads, d / self.heads]).swap_dims(1, 2)
    }

    /// `x` `[batch, seq, d]` -> `[batch, seq, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, l, d] = x.dims();
        let q = self.rope.forward(self.split_heads(self.query.forward(x.clone())));
        let k = self.rope.forward(self.split_heads(self.key.forward(x.clone())));
        let v = self.split_heads(self.value.forward(x));
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        // True above the diagonal: the future, which a causal model must not see.
        let future = Tensor::<B, 2, Bool>::tril_mask([l, l], 0, &scores.device()).reshape([1, 1, l, l]);
        let weights = softmax(scores.mask_fill(future.expand([b, self.heads, l, l]), f32::NEG_INFINITY), 3);
        let out = weights.matmul(v).swap_dims(1, 2).reshape([b, l, d]);
        self.output.forward(out)
    }
}
