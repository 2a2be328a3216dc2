use moe_experts::hf::HfMoeConfig;
use moe_experts::{MoeError, MoeLayerConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::rope::{RopeScaling, YarnScaling};

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
    /// MLA: rank of the query compression (`q_a_proj` → `q_a_layernorm` → `q_b_proj`);
    /// `null` means a plain `q_proj`. Read only when `kv_lora_rank` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q_lora_rank: Option<usize>,
    /// MLA: width of the compressed KV latent. Set: the blocks use MLA; absent: multi-head
    /// attention of width `hidden_size / num_attention_heads` (the training runner's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_lora_rank: Option<usize>,
    /// MLA: per-head width of the query/key part without rotary positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_nope_head_dim: Option<usize>,
    /// MLA: per-head width of the rotary part (the key's rotary part is shared by all heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_rope_head_dim: Option<usize>,
    /// MLA: per-head width of the values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v_head_dim: Option<usize>,
    /// RoPE scaling: `null`, or YaRN (`{"type": "yarn", "factor": ..., ...}`); MLA only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers 5's spelling of `rope_theta` and `rope_scaling` in one table
    /// (`{"rope_type": "yarn", "rope_theta": ..., "factor": ...}`); used when `rope_scaling`
    /// is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// MLA: whether the rotary part rotates adjacent pairs `(2i, 2i+1)` (DeepSeek's layout,
    /// the HF default for `deepseek_v3`) rather than halves `(i, i + r/2)`. Multi-head
    /// attention always rotates adjacent pairs.
    #[serde(default = "default_true")]
    pub rope_interleave: bool,
    /// Whether the LM head reuses the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// HF key; only `silu` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// HF key; only `false` is supported (DeepSeek-V3's projections have no bias).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// HF key; only 1 (every block after the dense ones is MoE) is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_layer_freq: Option<usize>,
    /// HF key: the multi-token-prediction modules stored as `model.layers.<num_hidden_layers>..`.
    /// They are a training aid and are not part of the next-token model: import skips them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_nextn_predict_layers: Option<usize>,
    /// HF key: block-quantized FP8 weights, dequantized on import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<QuantizationConfig>,
    /// HF key; `deepseek_v3` or `deepseek_v2` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
}

/// `rope_parameters`: the RoPE base and the `rope_scaling` keys in one table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// The RoPE base, overriding the top-level `rope_theta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// `rope_type` and the scaling keys.
    #[serde(flatten)]
    pub scaling: RopeScaling,
}

/// The `quantization_config` of DeepSeek-V3's released FP8 checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    /// Only `fp8`.
    pub quant_method: String,
    /// Only `e4m3` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fmt: Option<String>,
    /// `[rows, cols]` of one scale block; `[128, 128]` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_block_size: Option<Vec<usize>>,
    /// Activation quantization (`dynamic`): irrelevant once weights are dequantized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_scheme: Option<String>,
}

impl QuantizationConfig {
    /// The validated `[rows, cols]` of one scale block.
    pub fn block_size(&self) -> Result<[usize; 2], ModelConfigError> {
        let bad =
            |key, value: String, expected: &str| Err(ModelConfigError::Key { key, value, expected: expected.into() });
        if self.quant_method != "fp8" {
            return bad("quantization_config.quant_method", self.quant_method.clone(), "\"fp8\"");
        }
        if let Some(fmt) = &self.fmt
            && fmt != "e4m3"
        {
            return bad("quantization_config.fmt", fmt.clone(), "\"e4m3\"");
        }
        match self.weight_block_size.as_deref() {
            None => Ok([128, 128]),
            Some(&[r, c]) if r > 0 && c > 0 => Ok([r, c]),
            Some(other) => bad("quantization_config.weight_block_size", format!("{other:?}"), "two positive sizes"),
        }
    }
}

/// The attention shape of an MLA configuration, resolved from the optional keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaDims {
    /// Heads.
    pub heads: usize,
    /// `q_lora_rank` (None: plain `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// `kv_lora_rank`.
    pub kv_lora_rank: usize,
    /// `qk_nope_head_dim`.
    pub qk_nope: usize,
    /// `qk_rope_head_dim`.
    pub qk_rope: usize,
    /// `v_head_dim`.
    pub v_head: usize,
}

impl MlaDims {
    /// Query/key width of one head.
    pub fn qk_head(&self) -> usize {
        self.qk_nope + self.qk_rope
    }
}

/// The same error, naming the `rope_parameters` key that held the value.
fn in_rope_parameters(error: ModelConfigError) -> ModelConfigError {
    let ModelConfigError::Key { key, value, expected } = error else { return error };
    let key = match key {
        "rope_scaling.type" | "rope_scaling.rope_type" => "rope_parameters.rope_type",
        "rope_scaling.factor" => "rope_parameters.factor",
        "rope_scaling.original_max_position_embeddings" => "rope_parameters.original_max_position_embeddings",
        "rope_scaling.beta_fast" => "rope_parameters.beta_fast",
        "rope_scaling.beta_slow" => "rope_parameters.beta_slow",
        "rope_scaling.mscale" => "rope_parameters.mscale",
        "rope_scaling.mscale_all_dim" => "rope_parameters.mscale_all_dim",
        "rope_scaling.attention_factor" => "rope_parameters.attention_factor",
        other => other,
    };
    ModelConfigError::Key { key, value, expected }
}

fn default_true() -> bool {
    true
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
        self.validate_hf_keys()?;
        let mla = self.mla()?;
        if mla.is_none()
            && (!d.is_multiple_of(self.num_attention_heads) || !(d / self.num_attention_heads).is_multiple_of(2))
        {
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
        if !(self.rope_base().is_finite() && self.rope_base() > 1.0) {
            return key("rope_theta", &self.rope_base(), "finite and > 1".into());
        }
        if self.num_moe_layers() > 0 {
            self.moe_layer_config()?;
        }
        let yarn = self.yarn()?;
        if mla.is_none() && yarn.is_some() {
            return key(
                "rope_scaling",
                &"yarn",
                "null unless kv_lora_rank is set (YaRN is implemented for MLA)".into(),
            );
        }
        Ok(())
    }

    /// The keys only HF checkpoints carry: refuse what this model does not implement.
    fn validate_hf_keys(&self) -> Result<(), ModelConfigError> {
        let bad = |key: &'static str, value: String, expected: &str| {
            Err(ModelConfigError::Key { key, value, expected: expected.into() })
        };
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return bad("hidden_act", act.clone(), "\"silu\"");
        }
        if self.attention_bias == Some(true) {
            return bad("attention_bias", "true".into(), "false");
        }
        if let Some(freq) = self.moe_layer_freq
            && freq != 1
        {
            return bad("moe_layer_freq", freq.to_string(), "1");
        }
        if let Some(model_type) = &self.model_type
            && model_type != "deepseek_v3"
            && model_type != "deepseek_v2"
        {
            return bad("model_type", model_type.clone(), "\"deepseek_v3\" or \"deepseek_v2\"");
        }
        if let Some(quant) = &self.quantization_config {
            quant.block_size()?;
        }
        Ok(())
    }

    /// The MLA shape when `kv_lora_rank` is set (then the other MLA keys are required).
    pub fn mla(&self) -> Result<Option<MlaDims>, ModelConfigError> {
        let Some(kv_lora_rank) = self.kv_lora_rank else { return Ok(None) };
        let required = |key: &'static str, value: Option<usize>| match value {
            Some(v) if v > 0 => Ok(v),
            other => Err(ModelConfigError::Key {
                key,
                value: other.map_or("null".into(), |v| v.to_string()),
                expected: "a positive integer when kv_lora_rank is set".into(),
            }),
        };
        let dims = MlaDims {
            heads: self.num_attention_heads,
            q_lora_rank: self.q_lora_rank.map(|r| required("q_lora_rank", Some(r))).transpose()?,
            kv_lora_rank: required("kv_lora_rank", Some(kv_lora_rank))?,
            qk_nope: required("qk_nope_head_dim", self.qk_nope_head_dim)?,
            qk_rope: required("qk_rope_head_dim", self.qk_rope_head_dim)?,
            v_head: required("v_head_dim", self.v_head_dim)?,
        };
        if !dims.qk_rope.is_multiple_of(2) {
            return Err(ModelConfigError::Key {
                key: "qk_rope_head_dim",
                value: dims.qk_rope.to_string(),
                expected: "even (RoPE rotates pairs)".into(),
            });
        }
        Ok(Some(dims))
    }

    /// The YaRN settings, if `rope_scaling` (or, without it, `rope_parameters`) asks for YaRN.
    pub fn yarn(&self) -> Result<Option<YarnScaling>, ModelConfigError> {
        match (&self.rope_scaling, &self.rope_parameters) {
            (Some(scaling), _) => scaling.resolve(),
            (None, Some(parameters)) if parameters.scaling.kind.is_some() || parameters.scaling.rope_type.is_some() => {
                parameters.scaling.resolve().map_err(in_rope_parameters)
            }
            _ => Ok(None),
        }
    }

    /// The RoPE base: `rope_parameters.rope_theta` when given, else `rope_theta`.
    pub fn rope_base(&self) -> f64 {
        self.rope_parameters.as_ref().and_then(|p| p.rope_theta).unwrap_or(self.rope_theta)
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
