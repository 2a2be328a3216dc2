//! Sampling bytes from a trained run. The byte models here are trained on short windows, so
//! generation slides a window of the trained length over the text (a full forward per byte)
//! rather than growing one cache past the positions the model has seen; the choice of each
//! byte is `moe_model::generate::Sampling`'s (greedy, or temperature + top-p, seeded).

use std::path::Path;

use burn::tensor::backend::Backend;
use moe_experts::MoeBackend;
use moe_model::DeepSeekModel;
use moe_model::generate::{GenerateError, SampleRng, Sampling, logits_for_ids};

use crate::checkpoint;
use crate::error::TrainError;
use crate::train::build_model;

/// Continues `prompt` by `length` bytes, each predicted from at most the last `context` bytes.
pub fn continue_text<B: MoeBackend>(
    model: &DeepSeekModel<B>,
    context: usize,
    prompt: &[u8],
    length: usize,
    sampling: Sampling,
    seed: u64,
) -> Result<Vec<u8>, GenerateError> {
    let mut rng = SampleRng::new(seed);
    // An empty prompt starts from a newline, a natural boundary in the corpus.
    let mut text: Vec<i64> =
        if prompt.is_empty() { vec![i64::from(b'\n')] } else { prompt.iter().map(|&b| i64::from(b)).collect() };
    let start = text.len();
    for _ in 0..length {
        let window = &text[text.len().saturating_sub(context)..];
        let (logits, [_, _, vocab]) = logits_for_ids(model, window, [1, window.len()])?;
        text.push(sampling.sample(&logits[logits.len() - vocab..], &mut rng)? as i64);
    }
    // Byte models have a vocabulary of 256, so every id is a byte.
    Ok(text[start..].iter().map(|&t| t as u8).collect())
}

/// Loads the newest checkpoint of the run in `run_dir` for inference; returns the model and
/// its training window length.
pub fn load_run<B: Backend>(run_dir: &Path, device: &B::Device) -> Result<(DeepSeekModel<B>, usize), TrainError> {
    let ckpt = checkpoint::latest(run_dir)?;
    let state = checkpoint::read_state(&ckpt)?;
    let model = build_model::<B>(&state.config, device)?;
    let model = checkpoint::load_model(&ckpt, model, device)?;
    Ok((model, state.config.data.seq_len))
}
