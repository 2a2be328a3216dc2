//! The verbs on HF-format DeepSeek-V3 checkpoints (`config.json` + safetensors): `logits` (the
//! parity contract with HF transformers) and `generate --checkpoint` (cached decoding, text
//! through the checkpoint's `tokenizer.json` when it has one).

use std::path::{Path, PathBuf};

use moe_experts::MoeBackend;
use moe_model::generate::{GenerateConfig, GenerateError, Sampling, generate};
use moe_model::hf::{CheckpointError, load_checkpoint, logits_file};
use tokenizers::Tokenizer;

/// Why a checkpoint verb failed.
#[derive(Debug, thiserror::Error)]
pub enum HfVerbError {
    /// The checkpoint or the input file.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Generation.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// The tokenizer.
    #[error("{path}: {message}")]
    Tokenizer {
        /// `tokenizer.json`.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Neither token ids nor a tokenizer to make them.
    #[error("{0} has no tokenizer.json: give the prompt as token ids (--ids 1,2,3)")]
    NoTokenizer(PathBuf),
}

/// `input_ids` of the safetensors file `input` through the checkpoint in `dir`, `logits` to
/// `output`; returns the logits' shape.
pub fn logits<B: MoeBackend>(
    dir: &Path,
    input: &Path,
    output: &Path,
    device: &B::Device,
) -> Result<[usize; 3], HfVerbError> {
    let (_, model) = load_checkpoint::<B>(dir, device)?;
    Ok(logits_file(&model, input, output)?)
}

/// What `generate --checkpoint` produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The prompt's ids.
    pub prompt_ids: Vec<i64>,
    /// The new ids.
    pub ids: Vec<i64>,
    /// The new ids decoded, when the checkpoint has a tokenizer.
    pub text: Option<String>,
}

/// Continues a prompt (token ids, or text through `dir/tokenizer.json`) with the checkpoint in
/// `dir`, decoding with its KV cache.
pub fn generate_from_checkpoint<B: MoeBackend>(
    dir: &Path,
    prompt: &str,
    ids: Option<Vec<i64>>,
    config: &GenerateConfig,
    device: &B::Device,
) -> Result<Generated, HfVerbError> {
    let path = dir.join("tokenizer.json");
    let tokenizer_err = |e: tokenizers::Error| HfVerbError::Tokenizer { path: path.clone(), message: e.to_string() };
    let tokenizer = if path.exists() { Some(Tokenizer::from_file(&path).map_err(tokenizer_err)?) } else { None };
    let prompt_ids = match (ids, &tokenizer) {
        (Some(ids), _) => ids,
        (None, Some(t)) => {
            t.encode(prompt, true).map_err(tokenizer_err)?.get_ids().iter().map(|&i| i64::from(i)).collect()
        }
        (None, None) => return Err(HfVerbError::NoTokenizer(dir.to_owned())),
    };
    let (_, model) = load_checkpoint::<B>(dir, device)?;
    let new = generate(&model, &prompt_ids, config)?;
    let text = match &tokenizer {
        Some(t) => {
            let as_u32: Vec<u32> = new.iter().map(|&i| i as u32).collect();
            Some(t.decode(&as_u32, true).map_err(tokenizer_err)?)
        }
        None => None,
    };
    Ok(Generated { prompt_ids, ids: new, text })
}

/// The sampling a command line asks for: temperature 0 is greedy.
pub fn sampling(temperature: f64, top_p: f64) -> Sampling {
    if temperature == 0.0 { Sampling::Greedy } else { Sampling::Temperature { temperature, top_p } }
}
