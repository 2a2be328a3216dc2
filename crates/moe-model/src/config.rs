use moe_experts::hf::HfMoeConfig;
use moe_experts::{MoeError, MoeLayerConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The model's shape, with the field names of an HF DeepSeek-V3 `config.json`; the MoE keys
/// (`n_routed_experts`, `num_experts_per_tok`, `n_group`, `topk_group`,
/// `moe_intermediate_size`, `n_shared_experts`, `routed_scaling_factor`, `norm_topk_prob`,
/// `scoring_func`, `topk_method`) are [`HfMoeConfig`]'s.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeepSeekConfig {
    /// The MoE keys and `hidden_size`.
    #[serde(flatten)]
    pub moe: HfMoeConfig,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width of the dense blocks' SwiGLU.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// The first this-many blocks are dense; the rest are MoE.
    #[serde(default)]
    pub first_k_dense_replace: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Longest sequence the rotary tables cover.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Weight of the sequence-wise balance loss in each MoE block (not an HF key).
    #[serde(default = "default_seq_alpha")]
    pub seq_balance_alpha: f64,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_seq_alpha() -> f64 {
    1e-4
}

/// A [`DeepSeekConfig`] that cannot build a model; names the key and what was expected.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ModelConfigError {
    /// A key out of range.
    #[error("{key} = {value} is invalid: expected {expected}")]
    Key {
        /// The `config.json` key.
        key: &'static str,
        /// What was given.
        value: String,
        /// What is allowed.
        expected: String,
    },
    /// The MoE keys describe an impossible layer.
    #[error("MoE keys: {0}")]
    Moe(String),
}

impl DeepSeekConfig {
    /// Checks every key the model uses.
    pub fn validate(&self) -> Result<(), ModelConfigError> {
        let key = |key: &'static str, value: &dyn std::fmt::Display, expected: String| {
            Err(ModelConfigError::Key { key, value: value.to_string(), expected })
        };
        let d = self.moe.hidden_size;
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", d),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return key(name, &value, "at least 1".into());
            }
        }
        if !d.is_multiple_of(self.num_attention_heads) || !(d / self.num_attention_heads).is_multiple_of(2) {
            return key(
                "num_attention_heads",
                &self.num_attention_heads,
                format!("a divisor of hidden_size ({d}) leaving an even head width for RoPE"),
            );
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return key(
                "first_k_dense_replace",
                &self.first_k_dense_replace,
                format!("at most num_hidden_layers ({})", self.num_hidden_layers),
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return key("rms_norm_eps", &self.rms_norm_eps, "finite and > 0".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return key("rope_theta", &self.rope_theta, "finite and > 1".into());
        }
        if self.num_moe_layers() > 0 {
            self.moe_layer_config()?;
        }
        Ok(())
    }

    /// Blocks with an MoE layer.
    pub fn num_moe_layers(&self) -> usize {
        self.num_hidden_layers - self.first_k_dense_replace.min(self.num_hidden_layers)
    }

    /// The configuration of each MoE block, with this model's balance-loss weight.
    pub fn moe_layer_config(&self) -> Result<MoeLayerConfig, ModelConfigError> {
        let config = self.moe.layer_config().map_err(|e| ModelConfigError::Moe(e.to_string()))?;
        let config = config.with_seq_balance_alpha(self.seq_balance_alpha);
        config.validate().map_err(|e: MoeError| ModelConfigError::Moe(e.to_string()))?;
        Ok(config)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.moe.hidden_size / self.num_attention_heads
    }
}
