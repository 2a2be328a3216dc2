//! A DeepSeek-V3 decoder language model, generic over a burn backend.
//!
//! Token embedding, pre-norm blocks (RMSNorm, causal self-attention, then a dense SwiGLU for
//! the first `first_k_dense_replace` blocks and an MoE layer after), final norm, LM head. The
//! forward returns the logits and each MoE block's [`moe_experts::MoeAux`], so the caller adds
//! the balance losses and feeds the load-balancer.
//!
//! - Attention is MLA ([`MlaAttention`], with YaRN RoPE: [`rope`]) when the config sets
//!   `kv_lora_rank`, as HF DeepSeek-V3 configs do; multi-head with RoPE otherwise.
//! - [`hf`]: HF checkpoint import (sharded, memory-mapped, BF16/F16/FP8) and export.
//! - [`cache`] and [`DeepSeekModel::forward_with_cache`]: incremental decoding; MLA caches
//!   only the latent and the rotary key per token.
//! - [`generate`]: logits over host ids, seeded sampling, cached generation.
//! - [`precision`]: f32 parameters, products in the compute dtype
//!   ([`DeepSeekModel::with_compute_dtype`], e.g. bf16), the numerically delicate parts in f32.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Int, Tensor};
//! use moe_model::DeepSeekConfig;
//!
//! let config: DeepSeekConfig = serde_json::from_str(r#"{
//!     "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
//!     "moe_intermediate_size": 16, "num_hidden_layers": 2, "first_k_dense_replace": 1,
//!     "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
//!     "num_attention_heads": 4, "max_position_embeddings": 64
//! }"#).unwrap();
//! let model = config.init::<NdArray>(&Default::default()).unwrap();
//! let tokens = Tensor::<NdArray, 2, Int>::from_ints([[1, 2, 3], [4, 5, 6]], &Default::default());
//! let out = model.forward(tokens).unwrap();
//! assert_eq!(out.logits.dims(), [2, 3, 256]);
//! assert_eq!(out.moe.len(), 1); // one MoE block after one dense block
//! ```

mod attention;
mod block;
pub mod cache;
mod config;
pub mod generate;
pub mod hf;
mod mla;
mod model;
pub mod precision;
pub mod rope;

pub use attention::{Attention, MultiHeadAttention};
pub use block::{DecoderBlock, FeedForward};
pub use cache::KvCache;
pub use config::{DeepSeekConfig, MlaDims, ModelConfigError, QuantizationConfig, RopeParameters};
pub use mla::{LowRankQuery, MlaAttention, MlaQuery};
pub use model::{DeepSeekModel, ModelError, ModelOutput};
