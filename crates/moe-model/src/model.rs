use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{Int, Tensor, backend::Backend};
use moe_experts::{MoeAux, MoeBackend, MoeError, SwiGluConfig};
use thiserror::Error;

use crate::{Attention, DecoderBlock, DeepSeekConfig, FeedForward, ModelConfigError, MultiHeadAttention};

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
}

/// Logits and the MoE blocks' records.
#[derive(Debug, Clone)]
pub struct ModelOutput<B: Backend> {
    /// `[batch, seq, vocab]`.
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
                Ok(DecoderBlock {
                    attention_norm: norm(),
                    attention: Attention::MultiHead(MultiHeadAttention::new(
                        d,
                        self.num_attention_heads,
                        self.max_position_embeddings,
                        self.rope_theta,
                        device,
                    )),
                    ffn_norm: norm(),
                    ffn,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(DeepSeekModel {
            embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
            blocks,
            norm: norm(),
            lm_head: LinearConfig::new(d, self.vocab_size).with_bias(false).init(device),
            max_len: self.max_position_embeddings,
        })
    }
}

impl<B: MoeBackend> DeepSeekModel<B> {
    /// `tokens` `[batch, seq]` (ids below `vocab_size`) -> logits and MoE records.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Result<ModelOutput<B>, ModelError> {
        let seq = tokens.dims()[1];
        if seq > self.max_len {
            return Err(ModelError::SequenceTooLong { got: seq, max: self.max_len });
        }
        let mut x = self.embedding.forward(tokens);
        let mut moe = Vec::new();
        for block in &self.blocks {
            let (y, aux) = block.forward(x)?;
            x = y;
            moe.extend(aux);
        }
        Ok(ModelOutput { logits: self.lm_head.forward(self.norm.forward(x)), moe })
    }
}

impl<B: Backend> DeepSeekModel<B> {
    /// The MoE layers, in block order (for bias updates).
    pub fn moe_layers_mut(&mut self) -> impl Iterator<Item = &mut moe_experts::MoeLayer<B>> {
        self.blocks.iter_mut().filter_map(|b| match &mut b.ffn {
            FeedForward::Moe(layer) => Some(layer),
            FeedForward::Dense(_) => None,
        })
    }
}
