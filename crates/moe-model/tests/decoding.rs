//! Incremental decoding and generation: the multi-head cache, greedy generation against a
//! full-recompute hand loop, and sampling against the distribution it should draw from.

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use moe_model::generate::{GenerateConfig, GenerateError, SampleRng, Sampling, generate, logits_for_ids};
use moe_model::{DeepSeekConfig, ModelError};

type B = NdArray;

fn mha_config() -> DeepSeekConfig {
    serde_json::from_str(
        r#"{"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
            "num_hidden_layers": 2, "first_k_dense_replace": 1, "n_routed_experts": 8, "n_shared_experts": 1,
            "num_experts_per_tok": 2, "num_attention_heads": 4, "max_position_embeddings": 16}"#,
    )
    .unwrap()
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

#[test]
fn multi_head_cache_matches_the_full_forward() {
    let device = Default::default();
    let model = mha_config().init::<B>(&device).unwrap();
    let ids = Tensor::<B, 2, Int>::from_ints([[3, 7, 1, 9, 4, 4, 2, 8], [0, 31, 5, 5, 6, 1, 2, 30]], &device);
    let full = values(model.forward(ids.clone()).unwrap().logits);
    let mut cache = model.new_cache();
    let mut steps = vec![model.forward_with_cache(ids.clone().narrow(1, 0, 3), &mut cache).unwrap()];
    for t in 3..8 {
        steps.push(model.forward_with_cache(ids.clone().narrow(1, t, 1), &mut cache).unwrap());
    }
    let cached = values(Tensor::cat(steps, 1));
    let err = full.iter().zip(&cached).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(err <= 1e-5, "{err}");
    // Full K and V of every head: 2 * 32 values per token per block.
    assert_eq!(cache.values_per_token(), 2 * 2 * 32);
    // Another batch size is a typed error, not a shape panic.
    let one = Tensor::<B, 2, Int>::zeros([1, 1], &device);
    assert_eq!(model.forward_with_cache(one, &mut cache).unwrap_err(), ModelError::CacheBatch { cache: 2, got: 1 });
    // The cache is bounded by max_position_embeddings like the forward.
    let long = Tensor::<B, 2, Int>::zeros([2, 9], &device);
    assert_eq!(
        model.forward_with_cache(long, &mut cache).unwrap_err(),
        ModelError::SequenceTooLong { got: 17, max: 16 }
    );
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

#[test]
fn greedy_generation_matches_full_recompute() {
    let device = Default::default();
    let model = mha_config().init::<B>(&device).unwrap();
    let prompt = [4i64, 9, 2];
    let config = GenerateConfig { max_new_tokens: 6, sampling: Sampling::Greedy, seed: 0, eos_token_id: None };
    let generated = generate(&model, &prompt, &config).unwrap();
    let mut seq = prompt.to_vec();
    for _ in 0..6 {
        let (logits, [_, l, v]) = logits_for_ids(&model, &seq, [1, seq.len()]).unwrap();
        seq.push(argmax(&logits[(l - 1) * v..]) as i64);
    }
    assert_eq!(generated, seq[3..]);
    // Stops at the end of the rotary tables: 16 positions, 3 of them the prompt.
    let long = GenerateConfig { max_new_tokens: 100, ..config.clone() };
    assert_eq!(generate(&model, &prompt, &long).unwrap().len(), 14);
    // And at eos.
    let eos = GenerateConfig { eos_token_id: Some(generated[1]), ..config.clone() };
    let stopped = generate(&model, &prompt, &eos).unwrap();
    assert_eq!(*stopped.last().unwrap(), generated[1]);
    assert!(stopped.len() <= 2);
    // Bad input is a typed error.
    assert_eq!(
        generate(&model, &[4, 32], &config).unwrap_err(),
        GenerateError::Token { token: 32, index: 1, vocab: 32 }
    );
    assert!(matches!(logits_for_ids(&model, &[1, 2, 3], [2, 2]), Err(GenerateError::Shape { .. })));
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 2], [1, 2]), &device);
    assert_eq!(model.forward(tokens).unwrap().logits.dims(), [1, 2, 32]);
}

#[test]
fn sampling_draws_from_the_tempered_nucleus() {
    // Probabilities 1/6, 2/6, 3/6 at temperature 1.
    let logits = [0.0f32, 2f32.ln(), 3f32.ln()];
    let draws = |sampling: Sampling, seed: u64| -> [usize; 3] {
        let mut rng = SampleRng::new(seed);
        let mut counts = [0; 3];
        for _ in 0..30_000 {
            counts[sampling.sample(&logits, &mut rng).unwrap()] += 1;
        }
        counts
    };
    let counts = draws(Sampling::Temperature { temperature: 1.0, top_p: 1.0 }, 7);
    for (count, p) in counts.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
        assert!((*count as f64 / 30_000.0 - p).abs() < 0.015, "{counts:?}");
    }
    // Same seed, same draws.
    assert_eq!(counts, draws(Sampling::Temperature { temperature: 1.0, top_p: 1.0 }, 7));
    // top_p 0.6: the nucleus is {2, 1} (0.5 < 0.6 <= 0.5 + 1/3), renormalised to 3/5, 2/5.
    let nucleus = draws(Sampling::Temperature { temperature: 1.0, top_p: 0.6 }, 3);
    assert_eq!(nucleus[0], 0);
    assert!((nucleus[2] as f64 / 30_000.0 - 0.6).abs() < 0.015, "{nucleus:?}");
    // Temperature 1/2 squares the odds: 1, 4, 9 over 14.
    let cold = draws(Sampling::Temperature { temperature: 0.5, top_p: 1.0 }, 5);
    assert!((cold[2] as f64 / 30_000.0 - 9.0 / 14.0).abs() < 0.015, "{cold:?}");
    assert_eq!(Sampling::Greedy.sample(&logits, &mut SampleRng::new(0)).unwrap(), 2);
    let bad = Sampling::Temperature { temperature: 0.0, top_p: 1.0 };
    assert!(matches!(
        bad.sample(&logits, &mut SampleRng::new(0)),
        Err(GenerateError::Setting { name: "temperature", .. })
    ));
}
