//! Rotary positions: YaRN frequencies and scales as DeepSeek-V3 defines them, and the
//! rotation against a complex-number hand loop.

use burn::backend::NdArray;
use burn::tensor::{Distribution, Tensor};
use moe_model::rope::{RopeScaling, RotaryEmbedding, plain_inv_freq};
use moe_model::{Attention, DeepSeekConfig};

type B = NdArray;

/// DeepSeek-V3's released `rope_scaling`.
fn v3_scaling() -> RopeScaling {
    serde_json::from_str(
        r#"{"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "type": "yarn"}"#,
    )
    .unwrap()
}

/// DeepSeek's `precompute_freqs_cis`, transcribed step by step.
fn deepseek_freqs(dim: usize, base: f64, factor: f64, original: f64, beta_fast: f64, beta_slow: f64) -> Vec<f64> {
    let correction_dim =
        |rotations: f64| dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
    let low = correction_dim(beta_fast).floor().max(0.0);
    let high = correction_dim(beta_slow).ceil().min(dim as f64 - 1.0);
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f64 / dim as f64);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let smooth = 1.0 - ramp;
            freq / factor * (1.0 - smooth) + freq * smooth
        })
        .collect()
}

#[test]
fn yarn_matches_deepseek_v3() {
    let yarn = v3_scaling().resolve().unwrap().unwrap();
    let ours = yarn.inv_freq(64, 10_000.0);
    let theirs = deepseek_freqs(64, 10_000.0, 40.0, 4096.0, 32.0, 1.0);
    assert_eq!(ours.len(), 32);
    for (a, b) in ours.iter().zip(&theirs) {
        assert!((a - b).abs() <= 1e-15 * b.abs().max(1.0), "{a} vs {b}");
    }
    // Fast dimensions are kept, slow ones divided by the factor.
    let plain = plain_inv_freq(64, 10_000.0);
    assert_eq!(ours[0], plain[0]);
    assert!((ours[31] - plain[31] / 40.0).abs() < 1e-18);
    // mscale == mscale_all_dim: cos/sin untouched, softmax scale times (0.1 ln 40 + 1)^2.
    assert_eq!(yarn.cos_sin_factor(), 1.0);
    let m = 0.1 * 40f64.ln() + 1.0;
    assert!((yarn.softmax_factor() - m * m).abs() < 1e-12);
}

#[test]
fn the_model_uses_the_yarn_softmax_scale() {
    let mut config: DeepSeekConfig = serde_json::from_str(
        r#"{"vocab_size": 16, "hidden_size": 16, "intermediate_size": 16, "moe_intermediate_size": 8,
            "num_hidden_layers": 1, "first_k_dense_replace": 1, "n_routed_experts": 4,
            "num_experts_per_tok": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
            "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
            "rope_scaling": null}"#,
    )
    .unwrap();
    let scale = |config: &DeepSeekConfig| match &config.init::<B>(&Default::default()).unwrap().blocks[0].attention {
        Attention::Latent(mla) => mla.softmax_scale(),
        Attention::MultiHead(_) => panic!("MLA expected"),
    };
    assert!((scale(&config) - 12f64.powf(-0.5)).abs() < 1e-12);
    config.rope_scaling = Some(v3_scaling());
    let m = 0.1 * 40f64.ln() + 1.0;
    assert!((scale(&config) - 12f64.powf(-0.5) * m * m).abs() < 1e-12);
    // YaRN is implemented for MLA only.
    config.kv_lora_rank = None;
    assert!(config.validate().unwrap_err().to_string().contains("rope_scaling"));
}

/// Each pair, read as a complex number, is multiplied by `factor * e^{i p theta}`.
#[test]
fn rotation_matches_a_complex_hand_loop() {
    let device = Default::default();
    let (len, dim, start) = (5, 8, 3);
    let inv_freq = plain_inv_freq(dim, 100.0);
    let x = Tensor::<B, 4>::random([1, 2, len, dim], Distribution::Normal(0.0, 1.0), &device);
    let xs: Vec<f32> = x.clone().into_data().iter::<f32>().collect();
    for interleave in [true, false] {
        let tables = RotaryEmbedding::<B>::new(&inv_freq, 16, 0.5, interleave, &device);
        let ours: Vec<f32> = tables.apply(x.clone(), start).into_data().iter::<f32>().collect();
        for row in 0..2 * len {
            let p = (start + row % len) as f64;
            for (i, freq) in inv_freq.iter().enumerate() {
                let (a, b) = if interleave { (2 * i, 2 * i + 1) } else { (i, i + dim / 2) };
                let (re, im) = (f64::from(xs[row * dim + a]), f64::from(xs[row * dim + b]));
                let (c, s) = ((p * freq).cos() * 0.5, (p * freq).sin() * 0.5);
                let (want_re, want_im) = (re * c - im * s, re * s + im * c);
                assert!((f64::from(ours[row * dim + a]) - want_re).abs() < 1e-5);
                assert!((f64::from(ours[row * dim + b]) - want_im).abs() < 1e-5);
            }
        }
    }
}

/// transformers 5 writes `rope_parameters` instead of `rope_theta` + `rope_scaling`: the same
/// settings give the same model, and bad values name the `rope_parameters` key.
#[test]
fn rope_parameters_are_read_like_rope_scaling() {
    let base = r#""vocab_size": 16, "hidden_size": 16, "intermediate_size": 16, "moe_intermediate_size": 8,
        "num_hidden_layers": 1, "first_k_dense_replace": 1, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
        "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8"#;
    let old: DeepSeekConfig = serde_json::from_str(&format!(
        r#"{{{base}, "rope_theta": 50000, "rope_scaling": {{"type": "yarn", "factor": 40,
            "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 1.0}}}}"#
    ))
    .unwrap();
    let new: DeepSeekConfig = serde_json::from_str(&format!(
        r#"{{{base}, "rope_parameters": {{"rope_type": "yarn", "rope_theta": 50000, "factor": 40,
            "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 1.0}}}}"#
    ))
    .unwrap();
    assert_eq!(new.rope_base(), 50_000.0);
    assert_eq!(old.yarn().unwrap(), new.yarn().unwrap());
    assert!(new.yarn().unwrap().is_some());
    let plain: DeepSeekConfig = serde_json::from_str(&format!(
        r#"{{{base}, "rope_parameters": {{"rope_type": "default", "rope_theta": 500}}}}"#
    ))
    .unwrap();
    assert_eq!((plain.yarn().unwrap(), plain.rope_base()), (None, 500.0));
    let bad: DeepSeekConfig =
        serde_json::from_str(&format!(r#"{{{base}, "rope_parameters": {{"rope_type": "llama3", "factor": 8}}}}"#))
            .unwrap();
    match bad.validate() {
        Err(moe_model::ModelConfigError::Key { key, .. }) => assert_eq!(key, "rope_parameters.rope_type"),
        other => panic!("{other:?}"),
    }
}
