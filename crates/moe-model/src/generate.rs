//! Inference over host token ids: full-sequence logits, next-token sampling (greedy,
//! temperature, top-p, seeded) and cached autoregressive generation.

use burn::tensor::{Int, Tensor, TensorData};
use moe_experts::MoeBackend;
use thiserror::Error;

use crate::{DeepSeekModel, ModelError};

/// Why inference could not run.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum GenerateError {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A token id outside `0..vocab_size`.
    #[error("token id {token} at index {index} is outside 0..{vocab}")]
    Token {
        /// The id.
        token: i64,
        /// Its index in the input.
        index: usize,
        /// `vocab_size`.
        vocab: usize,
    },
    /// `ids.len()` differs from `batch * seq`, or the input is empty.
    #[error("{len} token ids cannot have shape [{batch}, {seq}] (both at least 1)")]
    Shape {
        /// Ids given.
        len: usize,
        /// Batch size asked for.
        batch: usize,
        /// Sequence length asked for.
        seq: usize,
    },
    /// A sampling setting out of range.
    #[error("{name} = {value} is invalid: expected {expected}")]
    Setting {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What is allowed.
        expected: &'static str,
    },
}

fn token_tensor<B: MoeBackend>(
    model: &DeepSeekModel<B>,
    ids: &[i64],
    [batch, seq]: [usize; 2],
) -> Result<Tensor<B, 2, Int>, GenerateError> {
    if batch == 0 || seq == 0 || ids.len() != batch * seq {
        return Err(GenerateError::Shape { len: ids.len(), batch, seq });
    }
    let vocab = model.vocab_size();
    if let Some((index, &token)) = ids.iter().enumerate().find(|(_, t)| !(0..vocab as i64).contains(*t)) {
        return Err(GenerateError::Token { token, index, vocab });
    }
    Ok(Tensor::from_data(TensorData::new(ids.to_vec(), [batch, seq]), &model.device()))
}

/// Logits `[batch, seq, vocab]` (row-major f32) of token ids `[batch, seq]` (row-major), in one
/// full forward pass.
pub fn logits_for_ids<B: MoeBackend>(
    model: &DeepSeekModel<B>,
    ids: &[i64],
    shape: [usize; 2],
) -> Result<(Vec<f32>, [usize; 3]), GenerateError> {
    let logits = model.forward(token_tensor(model, ids, shape)?)?.logits;
    let dims = logits.dims();
    Ok((logits.into_data().iter::<f32>().collect(), dims))
}

/// How the next token is chosen from its logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id among ties).
    Greedy,
    /// A draw from `softmax(logits / temperature)` restricted to the smallest set of most
    /// likely tokens whose probability reaches `top_p` (nucleus sampling; 1 keeps all).
    Temperature {
        /// `> 0`.
        temperature: f64,
        /// In `(0, 1]`.
        top_p: f64,
    },
}

/// A small seeded generator (SplitMix64), private to one generation so that draws do not
/// depend on burn's global RNG or on other threads.
#[derive(Debug, Clone)]
pub struct SampleRng(u64);

impl SampleRng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Sampling {
    fn validate(&self) -> Result<(), GenerateError> {
        if let Self::Temperature { temperature, top_p } = *self {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(GenerateError::Setting {
                    name: "temperature",
                    value: temperature,
                    expected: "finite and > 0",
                });
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(GenerateError::Setting { name: "top_p", value: top_p, expected: "in (0, 1]" });
            }
        }
        Ok(())
    }

    /// Chooses a token id from one position's `logits` (NaN counts as `-inf`).
    pub fn sample(&self, logits: &[f32], rng: &mut SampleRng) -> Result<usize, GenerateError> {
        self.validate()?;
        let logit = |i: usize| if logits[i].is_nan() { f64::NEG_INFINITY } else { f64::from(logits[i]) };
        // Most likely first; ties to the lower id, so the order is the same everywhere.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logit(b).total_cmp(&logit(a)).then(a.cmp(&b)));
        let Self::Temperature { temperature, top_p } = *self else {
            return Ok(order[0]);
        };
        let top = logit(order[0]);
        let weights: Vec<f64> = order.iter().map(|&i| ((logit(i) - top) / temperature).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut kept = 0.0;
        let mut nucleus = 0;
        while nucleus < weights.len() && (nucleus == 0 || kept < top_p * total) {
            kept += weights[nucleus];
            nucleus += 1;
        }
        let mut u = rng.next_f64() * kept;
        for (rank, &w) in weights[..nucleus].iter().enumerate() {
            if u < w {
                return Ok(order[rank]);
            }
            u -= w;
        }
        Ok(order[nucleus - 1])
    }
}

/// Settings of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: Sampling,
    /// Seed of the draws.
    pub seed: u64,
    /// Stop after generating this token.
    pub eos_token_id: Option<i64>,
}

/// Continues `prompt` (one sequence) with the latent KV cache: one prefill pass, then one
/// token per pass. Returns the new tokens; stops at `eos_token_id`, at `max_new_tokens`, or
/// when the sequence fills `max_position_embeddings`.
pub fn generate<B: MoeBackend>(
    model: &DeepSeekModel<B>,
    prompt: &[i64],
    config: &GenerateConfig,
) -> Result<Vec<i64>, GenerateError> {
    config.sampling.validate()?;
    if prompt.len() > model.max_len() {
        return Err(ModelError::SequenceTooLong { got: prompt.len(), max: model.max_len() }.into());
    }
    let mut input = token_tensor(model, prompt, [1, prompt.len()])?;
    let mut cache = model.new_cache();
    let mut rng = SampleRng::new(config.seed);
    let mut out = Vec::new();
    while out.len() < config.max_new_tokens && cache.len() + input.dims()[1] <= model.max_len() {
        let logits = model.forward_with_cache(input, &mut cache)?;
        let [_, seq, vocab] = logits.dims();
        let last: Vec<f32> = logits.narrow(1, seq - 1, 1).reshape([vocab]).into_data().iter::<f32>().collect();
        let token = config.sampling.sample(&last, &mut rng)? as i64;
        out.push(token);
        if Some(token) == config.eos_token_id {
            break;
        }
        input = token_tensor(model, &[token], [1, 1])?;
    }
    Ok(out)
}
