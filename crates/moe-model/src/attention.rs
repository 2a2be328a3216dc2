use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Bool, FloatDType, Tensor, activation::softmax, backend::Backend};
use moe_experts::MoeBackend;

use crate::MlaAttention;
use crate::cache::{HeadCache, LatentCache, LayerCache};
use crate::precision::linear;
use crate::rope::{RotaryEmbedding, plain_inv_freq};

/// The attention of a decoder block: MLA for HF DeepSeek configurations (`kv_lora_rank` set),
/// multi-head otherwise.
// One per block, so the size gap costs nothing; burn has no `Module` for `Box` to shrink it.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Attention<B: Backend> {
    /// Multi-head attention with RoPE.
    MultiHead(MultiHeadAttention<B>),
    /// Multi-head latent attention (DeepSeek-V3).
    Latent(MlaAttention<B>),
}

impl<B: MoeBackend> Attention<B> {
    /// Causal self-attention over `x` `[batch, seq, d]`, in `x`'s dtype.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::MultiHead(mha) => mha.forward(x),
            Self::Latent(mla) => mla.forward(x),
        }
    }

    /// An empty cache of the kind this attention keeps.
    pub fn new_cache(&self) -> LayerCache<B> {
        match self {
            Self::MultiHead(_) => LayerCache::Heads(HeadCache::default()),
            Self::Latent(_) => LayerCache::Latent(LatentCache::default()),
        }
    }

    /// Self-attention for new tokens `x` after those in `cache` (which gains them); `None`
    /// when `cache` is of the other kind.
    pub fn forward_cached(&self, x: Tensor<B, 3>, cache: &mut LayerCache<B>) -> Option<Tensor<B, 3>> {
        match (self, cache) {
            (Self::MultiHead(mha), LayerCache::Heads(cache)) => Some(mha.forward_cached(x, cache)),
            (Self::Latent(mla), LayerCache::Latent(cache)) => Some(mla.forward_cached(x, cache)),
            _ => None,
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
    rope: RotaryEmbedding<B>,
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
            rope: RotaryEmbedding::new(&plain_inv_freq(d / heads, theta), max_len, 1.0, true, device),
            heads,
        }
    }
}

impl<B: MoeBackend> MultiHeadAttention<B> {
    fn split_heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, l, d] = x.dims();
        x.reshape([b, l, self.heads, d / self.heads]).swap_dims(1, 2)
    }

    /// Rotated queries and keys, and values, `[batch, heads, seq, d / heads]`, of `x` at
    /// positions `start..`.
    fn project(&self, x: Tensor<B, 3>, start: usize) -> [Tensor<B, 4>; 3] {
        let q = self.split_heads(linear(&self.query, x.clone()));
        let k = self.split_heads(linear(&self.key, x.clone()));
        let [q, k] = self.rope.apply_each([q, k], start);
        [q, k, self.split_heads(linear(&self.value, x))]
    }

    /// `[batch, heads, seq, d / heads]` -> the output projection `[batch, seq, d]`.
    fn output(&self, heads: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, h, l, e] = heads.dims();
        linear(&self.output, heads.swap_dims(1, 2).reshape([b, l, h * e]))
    }

    fn scale(&self, d: usize) -> f64 {
        ((d / self.heads) as f64).powf(-0.5)
    }
}

impl<B: MoeBackend> MultiHeadAttention<B> {
    /// `x` `[batch, seq, d]` -> `[batch, seq, d]`, in `x`'s dtype: the backend's causal
    /// attention (burn's flash attention on the cube backends).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let d = x.dims()[2];
        let [q, k, v] = self.project(x, 0);
        self.output(B::moe_causal_attention(q, k, v, self.scale(d)))
    }

    /// Attention for new tokens `x` `[batch, seq, d]` after the tokens in `cache`, which gains
    /// their rotated keys and values. The softmax runs in f32.
    pub fn forward_cached(&self, x: Tensor<B, 3>, cache: &mut HeadCache<B>) -> Tensor<B, 3> {
        let [b, l, d] = x.dims();
        let start = cache.len();
        let [q, k, v] = self.project(x, start);
        let (k, v) = cache.append(k, v);
        let t = start + l;
        let dtype = q.dtype();
        let scores = q.matmul(k.swap_dims(2, 3)).cast(FloatDType::F32).mul_scalar(self.scale(d));
        // True where the key lies after the query: the future, which a causal model must not see.
        let future = Tensor::<B, 2, Bool>::tril_mask([l, t], start as i64, &scores.device()).reshape([1, 1, l, t]);
        let weights = softmax(scores.mask_fill(future.expand([b, self.heads, l, t]), f32::NEG_INFINITY), 3);
        self.output(weights.cast(dtype).matmul(v))
    }
}
