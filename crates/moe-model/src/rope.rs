//! Rotary positions for MLA: the frequencies (plain or YaRN) and their application in
//! DeepSeek's interleaved-pair layout.

use burn::module::Module;
use burn::tensor::{Tensor, TensorData, backend::Backend};
use moe_experts::MoeBackend;
use serde::{Deserialize, Serialize};

use crate::ModelConfigError;

/// `rope_scaling` as written in `config.json`: `null`, or a table naming its type under
/// `type` (DeepSeek's release) or `rope_type` (newer HF).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `type`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `rope_type` (HF's newer spelling of `type`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// Context extension factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// The context length the model was pre-trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// Rotations above which a frequency is kept (extrapolated); 32 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    /// Rotations below which a frequency is divided by `factor`; 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    /// YaRN's magnitude scale of cos/sin (numerator of HF's attention factor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    /// DeepSeek's softmax-scale correction: the scale is multiplied by `mscale(factor, this)²`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
    /// An explicit cos/sin factor, overriding the one derived from the mscales.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// Round the correction range outward to whole dimensions; true when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
}

/// Validated YaRN settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnScaling {
    /// `factor`.
    pub factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: usize,
    /// `beta_fast`.
    pub beta_fast: f64,
    /// `beta_slow`.
    pub beta_slow: f64,
    /// `mscale` (None or 0: unset).
    pub mscale: Option<f64>,
    /// `mscale_all_dim` (None or 0: unset).
    pub mscale_all_dim: Option<f64>,
    /// `attention_factor`.
    pub attention_factor: Option<f64>,
    /// `truncate`.
    pub truncate: bool,
}

impl RopeScaling {
    /// YaRN settings for `yarn`, `None` for `default`; any other type is refused.
    pub fn resolve(&self) -> Result<Option<YarnScaling>, ModelConfigError> {
        let key_error = |key: &'static str, value: String, expected: &str| ModelConfigError::Key {
            key,
            value,
            expected: expected.into(),
        };
        let kind = match (&self.rope_type, &self.kind) {
            (Some(a), Some(b)) if a != b => {
                return Err(key_error("rope_scaling.rope_type", a.clone(), "the same as rope_scaling.type"));
            }
            (Some(kind), _) | (None, Some(kind)) => kind.as_str(),
            (None, None) => return Err(key_error("rope_scaling.type", "null".into(), "\"yarn\"")),
        };
        match kind {
            "default" => return Ok(None),
            "yarn" => {}
            other => return Err(key_error("rope_scaling.type", other.into(), "\"yarn\" (or \"default\")")),
        }
        let factor = match self.factor {
            Some(f) if f.is_finite() && f > 0.0 => f,
            other => return Err(key_error("rope_scaling.factor", format!("{other:?}"), "finite and > 0")),
        };
        let original = match self.original_max_position_embeddings {
            Some(n) if n > 0 => n,
            other => {
                return Err(key_error(
                    "rope_scaling.original_max_position_embeddings",
                    format!("{other:?}"),
                    "a positive integer",
                ));
            }
        };
        let positive = |key: &'static str, value: Option<f64>, default: f64| match value.unwrap_or(default) {
            v if v.is_finite() && v > 0.0 => Ok(v),
            v => Err(key_error(key, v.to_string(), "finite and > 0")),
        };
        let finite = |key: &'static str, value: Option<f64>| match value {
            Some(v) if !v.is_finite() => Err(key_error(key, v.to_string(), "finite")),
            _ => Ok(value),
        };
        Ok(Some(YarnScaling {
            factor,
            original_max_position_embeddings: original,
            beta_fast: positive("rope_scaling.beta_fast", self.beta_fast, 32.0)?,
            beta_slow: positive("rope_scaling.beta_slow", self.beta_slow, 1.0)?,
            mscale: finite("rope_scaling.mscale", self.mscale)?,
            mscale_all_dim: finite("rope_scaling.mscale_all_dim", self.mscale_all_dim)?,
            attention_factor: finite("rope_scaling.attention_factor", self.attention_factor)?,
            truncate: self.truncate.unwrap_or(true),
        }))
    }
}

/// YaRN's magnitude correction `0.1 m ln(s) + 1` (1 for `s <= 1`).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 }
}

fn set(v: Option<f64>) -> Option<f64> {
    v.filter(|&m| m != 0.0)
}

impl YarnScaling {
    /// The factor on cos and sin (HF's `attention_factor`): 1 for DeepSeek-V3, whose
    /// `mscale` equals `mscale_all_dim`.
    pub fn cos_sin_factor(&self) -> f64 {
        if let Some(a) = self.attention_factor {
            return a;
        }
        match (set(self.mscale), set(self.mscale_all_dim)) {
            (Some(m), Some(all)) => yarn_mscale(self.factor, m) / yarn_mscale(self.factor, all),
            _ => yarn_mscale(self.factor, 1.0),
        }
    }

    /// The factor on the softmax scale: `mscale(factor, mscale_all_dim)²`, or 1 when
    /// `mscale_all_dim` is unset (DeepSeek's `softmax_scale * mscale * mscale`).
    pub fn softmax_factor(&self) -> f64 {
        set(self.mscale_all_dim).map_or(1.0, |all| yarn_mscale(self.factor, all).powi(2))
    }

    /// The `dim / 2` inverse frequencies: base frequencies blended, per dimension, between
    /// kept (fast rotations) and divided by `factor` (slow rotations) over a linear ramp.
    pub fn inv_freq(&self, dim: usize, base: f64) -> Vec<f64> {
        let correction_dim = |rotations: f64| {
            dim as f64 * (self.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let (mut low, mut high) = (correction_dim(self.beta_fast), correction_dim(self.beta_slow));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
        if low == high {
            high += 0.001;
        }
        plain_inv_freq(dim, base)
            .into_iter()
            .enumerate()
            .map(|(i, extrapolated)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                extrapolated / self.factor * (1.0 - keep) + extrapolated * keep
            })
            .collect()
    }
}

/// `base^(-2i/dim)` for `i < dim / 2`.
pub fn plain_inv_freq(dim: usize, base: f64) -> Vec<f64> {
    (0..dim / 2).map(|i| base.powf(-((2 * i) as f64) / dim as f64)).collect()
}

/// Rotary frequencies and the pair layout they rotate. cos/sin are formed per call for the
/// positions at hand, so a long context costs no table per block.
#[derive(Module, Debug)]
pub struct RotaryEmbedding<B: Backend> {
    /// `[dim / 2]` inverse frequencies.
    inv_freq: Tensor<B, 1>,
    factor: f64,
    interleave: bool,
    max_len: usize,
}

impl<B: Backend> RotaryEmbedding<B> {
    /// Rotations by `inv_freq` for positions `0..max_len`, with cos and sin multiplied by
    /// `factor`; `interleave` rotates pairs `(2i, 2i+1)`, otherwise `(i, i + dim/2)`.
    pub fn new(inv_freq: &[f64], max_len: usize, factor: f64, interleave: bool, device: &B::Device) -> Self {
        let values: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
        let inv_freq = Tensor::from_data(TensorData::new(values, [inv_freq.len()]), device);
        Self { inv_freq, factor, interleave, max_len }
    }

    /// Positions covered.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// cos and sin `[len, dim / 2]` for positions `start..start + len`, in f32 as HF computes them.
    fn cos_sin(&self, start: usize, len: usize) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let device = self.inv_freq.device();
        let half = self.inv_freq.dims()[0];
        let positions: Vec<f32> = (start..start + len).map(|p| p as f32).collect();
        let positions = Tensor::<B, 2>::from_data(TensorData::new(positions, [len, 1]), &device);
        // The outer product as a broadcast product: the same single f32 multiply per entry as
        // a matmul of depth 1, without the matmul's autotune on a cold GPU (17 candidates).
        let angles = positions * self.inv_freq.clone().reshape([1, half]);
        (angles.clone().cos().mul_scalar(self.factor), angles.sin().mul_scalar(self.factor))
    }

    /// Rotates `x` `[batch, heads, len, dim]` as positions `start..start + len`
    /// ([`MoeBackend::moe_rotary`]: one kernel on the cube backends); the caller checks that
    /// they are within [`RotaryEmbedding::max_len`].
    pub fn apply(&self, x: Tensor<B, 4>, start: usize) -> Tensor<B, 4>
    where
        B: MoeBackend,
    {
        let [x] = self.apply_each([x], start);
        x
    }

    /// [`RotaryEmbedding::apply`] on tensors of one length (queries and keys), forming cos and
    /// sin once for all of them.
    pub fn apply_each<const N: usize>(&self, xs: [Tensor<B, 4>; N], start: usize) -> [Tensor<B, 4>; N]
    where
        B: MoeBackend,
    {
        let (cos, sin) = self.cos_sin(start, xs[0].dims()[2]);
        xs.map(|x| B::moe_rotary(x, cos.clone(), sin.clone(), self.interleave))
    }
}
