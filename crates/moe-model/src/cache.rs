//! Key/value caches for incremental decoding.
//!
//! MLA blocks keep, per token, only the normalised `kv_lora_rank` latent and the rotated
//! `qk_rope_head_dim` key shared by all heads; multi-head blocks keep the rotated keys and the
//! values of every head (a plain KV cache).

use burn::tensor::{Tensor, backend::Backend};

fn append<B: Backend, const D: usize>(slot: &mut Option<Tensor<B, D>>, new: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let all = match slot.take() {
        Some(old) => Tensor::cat(vec![old, new], dim),
        None => new,
    };
    *slot = Some(all.clone());
    all
}

/// One MLA block's cache: latents `[b, t, kv_lora_rank]` and rotary keys `[b, t, qk_rope]`.
#[derive(Debug, Clone, Default)]
pub struct LatentCache<B: Backend> {
    latent: Option<Tensor<B, 3>>,
    rope_key: Option<Tensor<B, 3>>,
}

impl<B: Backend> LatentCache<B> {
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.latent.as_ref().map_or(0, |t| t.dims()[1])
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends new tokens' latents and rotary keys; returns all of them.
    pub fn append(&mut self, latent: Tensor<B, 3>, rope_key: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        (append(&mut self.latent, latent, 1), append(&mut self.rope_key, rope_key, 1))
    }

    /// Values held per token per sequence: `kv_lora_rank + qk_rope`.
    pub fn values_per_token(&self) -> usize {
        let width = |t: &Option<Tensor<B, 3>>| t.as_ref().map_or(0, |t| t.dims()[2]);
        width(&self.latent) + width(&self.rope_key)
    }
}

/// One multi-head block's cache: rotated keys and values `[b, heads, t, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct HeadCache<B: Backend> {
    key: Option<Tensor<B, 4>>,
    value: Option<Tensor<B, 4>>,
}

impl<B: Backend> HeadCache<B> {
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.key.as_ref().map_or(0, |t| t.dims()[2])
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends new tokens' keys and values; returns all of them.
    pub fn append(&mut self, key: Tensor<B, 4>, value: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (append(&mut self.key, key, 2), append(&mut self.value, value, 2))
    }

    /// Values held per token per sequence: `2 * heads * head_dim`.
    pub fn values_per_token(&self) -> usize {
        let width = |t: &Option<Tensor<B, 4>>| t.as_ref().map_or(0, |t| t.dims()[1] * t.dims()[3]);
        width(&self.key) + width(&self.value)
    }
}

/// One block's cache, matching its attention.
#[derive(Debug, Clone)]
pub enum LayerCache<B: Backend> {
    /// For an MLA block.
    Latent(LatentCache<B>),
    /// For a multi-head block.
    Heads(HeadCache<B>),
}

/// The cache of a whole model: one [`LayerCache`] per block, all at the same length. Made by
/// `DeepSeekModel::new_cache` and advanced by `DeepSeekModel::forward_with_cache`.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub(crate) layers: Vec<LayerCache<B>>,
    pub(crate) len: usize,
    /// Sequences in the cache, fixed by the first call.
    pub(crate) batch: Option<usize>,
}

impl<B: Backend> KvCache<B> {
    /// Tokens processed so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been processed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blocks' caches.
    pub fn layers(&self) -> &[LayerCache<B>] {
        &self.layers
    }

    /// Values held per token per sequence, summed over blocks (0 before the first token).
    pub fn values_per_token(&self) -> usize {
        self.layers
            .iter()
            .map(|layer| match layer {
                LayerCache::Latent(c) => c.values_per_token(),
                LayerCache::Heads(c) => c.values_per_token(),
            })
            .sum()
    }
}
