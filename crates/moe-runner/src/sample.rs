//! Sampling bytes from a trained run: temperature and nucleus (top-p) sampling, seeded.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use moe_experts::MoeBackend;
use moe_model::DeepSeekModel;

use crate::checkpoint;
use crate::rng::SplitMix64;
use crate::train::{TrainError, build_model};

/// How to pick each next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches this (1 keeps all).
    pub top_p: f64,
    /// Seeds the draws.
    pub seed: u64,
}

/// Index of the token drawn from `logits` under `sampling`, using `rng`.
pub fn pick(logits: &[f32], sampling: &Sampling, rng: &mut SplitMix64) -> usize {
    let argmax =
        || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    if sampling.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax();
    }
    let mut probs: Vec<(usize, f64)> =
        logits.iter().map(|&l| ((f64::from(l) - f64::from(max)) / sampling.temperature).exp()).enumerate().collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // The nucleus: the most likely tokens until their mass reaches top_p (at least one).
    let mut mass = 0.0;
    let keep = probs
        .iter()
        .position(|p| {
            mass += p.1;
            mass >= sampling.top_p
        })
        .map_or(probs.len(), |i| i + 1);
    let nucleus = &probs[..keep];
    let kept: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut draw = rng.unit() * kept;
    for &(token, p) in nucleus {
        if draw < p {
            return token;
        }
        draw -= p;
    }
    nucleus[keep - 1].0
}

/// Continues `prompt` by `length` bytes with `model`, re-reading at most the model's context.
pub fn continue_text<B: MoeBackend>(
    model: &DeepSeekModel<B>,
    context: usize,
    prompt: &[u8],
    length: usize,
    sampling: &Sampling,
    device: &B::Device,
) -> Result<Vec<u8>, TrainError> {
    let mut rng = SplitMix64::new(sampling.seed);
    // An empty prompt starts from a newline, a natural boundary in the corpus.
    let mut text: Vec<u8> = if prompt.is_empty() { b"\n".to_vec() } else { prompt.to_vec() };
    let start = text.len();
    for _ in 0..length {
        let window = &text[text.len().saturating_sub(context)..];
        let ids: Vec<i64> = window.iter().map(|&b| i64::from(b)).collect();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, window.len()]), device);
        let logits = model.forward(input)?.logits;
        let [_, l, v] = logits.dims();
        let last =
            logits.slice([0..1, l - 1..l, 0..v]).into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
        text.push(pick(&last, sampling, &mut rng) as u8);
    }
    Ok(text.split_off(start))
}

/// Loads the newest checkpoint of the run in `run_dir` for inference.
pub fn load_run<B: Backend>(run_dir: &Path, device: &B::Device) -> Result<(DeepSeekModel<B>, usize), TrainError> {
    let ckpt = checkpoint::latest(run_dir)?;
    let state = checkpoint::read_state(&ckpt)?;
    let model = build_model::<B>(&state.config, device)?;
    let model = checkpoint::load_model(&ckpt, model, device)?;
    Ok((model, state.config.data.seq_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top_p_keeps_the_nucleus() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = SplitMix64::new(1);
        let greedy = Sampling { temperature: 0.0, top_p: 1.0, seed: 1 };
        assert_eq!(pick(&logits, &greedy, &mut rng), 1);
        // Tokens 1 and 3 hold ~0.85 of the mass at temperature 1: top_p 0.8 never draws 0 or 2.
        let nucleus = Sampling { temperature: 1.0, top_p: 0.8, seed: 1 };
        let mut seen = [0; 4];
        for _ in 0..2000 {
            seen[pick(&logits, &nucleus, &mut rng)] += 1;
        }
        assert_eq!((seen[0], seen[2]), (0, 0), "{seen:?}");
        assert!(seen[1] > seen[3] && seen[3] > 600, "{seen:?}");
    }

    #[test]
    fn full_sampling_matches_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let sampling = Sampling { temperature: 1.0, top_p: 1.0, seed: 9 };
        let mut rng = SplitMix64::new(9);
        let n = 20_000;
        let mut seen = [0usize; 3];
        for _ in 0..n {
            seen[pick(&logits, &sampling, &mut rng)] += 1;
        }
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        for (i, &c) in seen.iter().enumerate() {
            let p = f64::from(logits[i]).exp() / z;
            assert!((c as f64 / n as f64 - p).abs() < 0.015, "token {i}: {c} of {n}, expected p {p:.3}");
        }
    }
}
