use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{FloatDType, Int, Tensor, backend::Backend};
use moe_experts::{MoeAux, MoeBackend, MoeError, MoeLayer, SwiGluConfig};
use thiserror::Error;

use crate::cache::KvCache;
use crate::precision::{linear, rms_norm};
use crate::rope::{RotaryEmbedding, plain_inv_freq};
use crate::{Attention, DecoderBlock, DeepSeekConfig, FeedForward, MlaAttention, ModelConfigError, MultiHeadAttention};

/// The decoder language model.
#[derive(Module, Debug)]
pub struct DeepSeekModel<B: Backend> {
    /// Token embedding.
    pub embedding: Embedding<B>,
    /// Decoder blocks, dense first.
    pub blocks: Vec<DecoderBlock<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// LM head.
    pub lm_head: Linear<B>,
    max_len: usize,
    /// The dtype the blocks compute in (`crate::precision`); not part of the record.
    #[module(skip)]
    compute_dtype: FloatDType,
}

/// Why a forward pass could not run.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ModelError {
    /// The sequence is longer than the rotary tables.
    #[error("sequence length {got} exceeds max_position_embeddings {max}")]
    SequenceTooLong {
        /// The input's length.
        got: usize,
        /// The configured maximum.
        max: usize,
    },
    /// An MoE block failed.
    #[error(transparent)]
    Moe(#[from] MoeError),
    /// The tokens' batch size differs from the cache's.
    #[error("the cache holds {cache} sequences but the tokens have batch size {got}")]
    CacheBatch {
        /// Sequences in the cache.
        cache: usize,
        /// The tokens' batch size.
        got: usize,
    },
    /// The cache was made by a model with other blocks.
    #[error("the cache does not match this model's blocks (use DeepSeekModel::new_cache)")]
    CacheKind,
}

/// Logits and the MoE blocks' records.
#[derive(Debug, Clone)]
pub struct ModelOutput<B: Backend> {
    /// `[batch, seq, vocab]`, in f32.
    pub logits: Tensor<B, 3>,
    /// One record per MoE block, in block order.
    pub moe: Vec<MoeAux<B>>,
}

impl DeepSeekConfig {
    /// Validates the configuration and builds a randomly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<DeepSeekModel<B>, ModelConfigError> {
        self.validate()?;
        let d = self.moe.hidden_size;
        let norm = || RmsNormConfig::new(d).with_epsilon(self.rms_norm_eps).init(device);
        let blocks = (0..self.num_hidden_layers)
            .map(|i| -> Result<DecoderBlock<B>, ModelConfigError> {
                let ffn = if i < self.first_k_dense_replace {
                    FeedForward::Dense(SwiGluConfig::new(d, self.intermediate_size).init(device))
                } else {
                    let layer = self.moe_layer_config()?.init(device);
                    FeedForward::Moe(layer.map_err(|e| ModelConfigError::Moe(e.to_string()))?)
                };
                Ok(DecoderBlock { attention_norm: norm(), attention: self.attention(device)?, ffn_norm: norm(), ffn })
            })
            .collect::<Result<_, _>>()?;
        Ok(DeepSeekModel {
            embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
            blocks,
            norm: norm(),
            lm_head: LinearConfig::new(d, self.vocab_size).with_bias(false).init(device),
            max_len: self.max_position_embeddings,
            compute_dtype: FloatDType::F32,
        })
    }
}

impl DeepSeekConfig {
    /// One block's attention: MLA when `kv_lora_rank` is set, multi-head otherwise.
    fn attention<B: Backend>(&self, device: &B::Device) -> Result<Attention<B>, ModelConfigError> {
        let d = self.moe.hidden_size;
        let Some(dims) = self.mla()? else {
            return Ok(Attention::MultiHead(MultiHeadAttention::new(
                d,
                self.num_attention_heads,
                self.max_position_embeddings,
                self.rope_base(),
                device,
            )));
        };
        let yarn = self.yarn()?;
        let inv_freq = match &yarn {
            Some(yarn) => yarn.inv_freq(dims.qk_rope, self.rope_base()),
            None => plain_inv_freq(dims.qk_rope, self.rope_base()),
        };
        let cos_sin_factor = yarn.as_ref().map_or(1.0, |y| y.cos_sin_factor());
        let rope =
            RotaryEmbedding::new(&inv_freq, self.max_position_embeddings, cos_sin_factor, self.rope_interleave, device);
        let scale = (dims.qk_head() as f64).powf(-0.5) * yarn.as_ref().map_or(1.0, |y| y.softmax_factor());
        Ok(Attention::Latent(MlaAttention::new(&dims, d, self.rms_norm_eps, rope, scale, device)))
    }
}

impl<B: MoeBackend> DeepSeekModel<B> {
    /// An empty cache for incremental decoding with [`DeepSeekModel::forward_with_cache`].
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache { layers: self.blocks.iter().map(|b| b.attention.new_cache()).collect(), len: 0, batch: None }
    }

    /// Logits `[batch, seq, vocab]` for new `tokens` `[batch, seq]` that continue the tokens
    /// already in `cache` (which gains them). Prefill with the prompt, then feed one token at
    /// a time; the logits equal those of [`DeepSeekModel::forward`] on the whole sequence.
    pub fn forward_with_cache(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let seq = cache.len + tokens.dims()[1];
        if seq > self.max_len {
            return Err(ModelError::SequenceTooLong { got: seq, max: self.max_len });
        }
        if cache.layers.len() != self.blocks.len() {
            return Err(ModelError::CacheKind);
        }
        let batch = tokens.dims()[0];
        if let Some(cached) = cache.batch
            && cached != batch
        {
            return Err(ModelError::CacheBatch { cache: cached, got: batch });
        }
        cache.batch = Some(batch);
        let mut x = self.embed(tokens);
        for (block, layer_cache) in self.blocks.iter().zip(&mut cache.layers) {
            x = block.forward_cached(x, layer_cache)?;
        }
        cache.len = seq;
        Ok(self.logits(x))
    }

    /// `tokens` `[batch, seq]` (ids below `vocab_size`) -> logits and MoE records.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Result<ModelOutput<B>, ModelError> {
        self.forward_with(tokens, &mut crate::block::run_layer::<B, ModelError>)
    }

    /// [`DeepSeekModel::forward`] with every MoE layer run by `moe` (given the layer and its
    /// input `[batch, seq, d]`, it returns what `MoeLayer::forward` would: e.g. the layer's
    /// experts sharded over ranks).
    pub fn forward_with<E: From<ModelError> + From<MoeError>>(
        &self,
        tokens: Tensor<B, 2, Int>,
        moe: &mut impl FnMut(&MoeLayer<B>, Tensor<B, 3>) -> Result<(Tensor<B, 3>, MoeAux<B>), E>,
    ) -> Result<ModelOutput<B>, E> {
        let seq = tokens.dims()[1];
        if seq > self.max_len {
            return Err(ModelError::SequenceTooLong { got: seq, max: self.max_len }.into());
        }
        let mut x = self.embed(tokens);
        let mut records = Vec::new();
        for block in &self.blocks {
            let (y, aux) = block.forward_with(x, moe)?;
            x = y;
            records.extend(aux);
        }
        Ok(ModelOutput { logits: self.logits(x), moe: records })
    }

    /// The token embeddings in the compute dtype: in half precision a small vocabulary takes
    /// [`one_hot_embedding`].
    fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        const ONE_HOT_VOCAB: usize = 4096;
        if self.compute_dtype == FloatDType::F32 || self.vocab_size() > ONE_HOT_VOCAB {
            return self.embedding.forward(tokens).cast(self.compute_dtype);
        }
        one_hot_embedding(&self.embedding, tokens, self.compute_dtype)
    }

    /// The final norm and the LM head on the last block's output; the logits in f32.
    fn logits(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        linear(&self.lm_head, rms_norm(&self.norm, x)).cast(FloatDType::F32)
    }
}

impl<B: Backend> DeepSeekModel<B> {
    /// The same model computing in `dtype` (`crate::precision`): `BF16` or `F16` runs the
    /// products in that dtype on the f32 parameters, `F32` (the default) computes in f32.
    pub fn with_compute_dtype(mut self, dtype: FloatDType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// Longest sequence (prompt plus generated tokens) the rotary tables cover.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids run over `0..vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.embedding.weight.lazy_shape().dims::<2>()[0]
    }

    /// The device holding the weights.
    pub fn device(&self) -> B::Device {
        self.embedding.weight.val().device()
    }

    /// The MoE layers, in block order (for bias updates).
    pub fn moe_layers_mut(&mut self) -> impl Iterator<Item = &mut MoeLayer<B>> {
        self.blocks.iter_mut().filter_map(|b| match &mut b.ffn {
            FeedForward::Moe(layer) => Some(layer),
            FeedForward::Dense(_) => None,
        })
    }
}

/// `embedding` of `tokens` `[batch, seq]` in `dtype` as a one-hot product `[T, V] x [V, d]`
/// (exact: one term per row). burn's embedding backward scatter-adds each token's gradient into
/// its row with atomics, and a byte vocabulary puts thousands of tokens on one row (5.2 ms of
/// `small`'s 51 ms backward on the H200); the product's weight gradient is one GEMM
/// ([`MoeBackend::moe_dense_matmul_grad_weights`]), rounded to `dtype` as every other weight
/// gradient of a half-precision step is.
fn one_hot_embedding<B: MoeBackend>(
    embedding: &Embedding<B>,
    tokens: Tensor<B, 2, Int>,
    dtype: FloatDType,
) -> Tensor<B, 3> {
    let [batch, seq] = tokens.dims();
    let [vocab, d] = embedding.weight.dims();
    let rows = batch * seq;
    let ids = Tensor::<B, 1, Int>::arange(0..vocab as i64, &tokens.device()).reshape([1, vocab]).expand([rows, vocab]);
    let one_hot = tokens.reshape([rows, 1]).expand([rows, vocab]).equal(ids).float().cast(dtype);
    B::moe_dense_matmul(one_hot, embedding.weight.val().cast(dtype)).reshape([batch, seq, d])
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::nn::EmbeddingConfig;
    use burn::tensor::{FloatDType, Int, Tensor, Tolerance};

    use super::one_hot_embedding;

    /// The one-hot product against burn's embedding (the gather) in bf16 on a CPU backend with
    /// bf16: the same rows exactly, and the weight gradient (with repeated tokens, so rows sum)
    /// to bf16 rounding.
    #[test]
    fn one_hot_embedding_matches_the_gather() {
        type B = Autodiff<Flex>;
        let device = Default::default();
        let embedding = EmbeddingConfig::new(11, 6).init::<B>(&device);
        let tokens = Tensor::<B, 2, Int>::from_ints([[3, 0, 3, 10], [3, 7, 0, 3]], &device);
        let r = Tensor::<B, 3>::random([2, 4, 6], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        let ours = one_hot_embedding(&embedding, tokens.clone(), FloatDType::BF16);
        let gathered = embedding.forward(tokens).cast(FloatDType::BF16);
        ours.clone().into_data().assert_eq(&gathered.clone().into_data(), true);
        let grad = |y: Tensor<B, 3>| {
            let grads = (y.cast(FloatDType::F32) * r.clone()).sum().backward();
            embedding.weight.grad(&grads).expect("tracked").into_data()
        };
        let (got, want) = (grad(ours), grad(gathered));
        got.assert_approx_eq::<f32>(&want, Tolerance::rel_abs(1e-2, 1e-2));
        assert!(want.iter::<f32>().any(|v| v.abs() > 0.5), "an all-zero reference");
    }
}
