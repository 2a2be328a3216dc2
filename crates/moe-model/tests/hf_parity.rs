//! The whole model against HF transformers 5.17 on `tests/data/tiny_a`: logits, cached
//! decoding, and export.

mod common;

use burn::tensor::Tensor;
use common::{B, all_params, max_abs, reference, scratch, tiny_a, values};
use moe_model::DeepSeekConfig;
use moe_model::hf::{load_checkpoint, save_checkpoint};

#[test]
fn logits_match_hf_transformers() {
    let device = Default::default();
    let (config, model) = load_checkpoint::<B>(&tiny_a(), &device).unwrap();
    assert!(config.mla().unwrap().is_some());
    let (ids, expected, shape) = reference();
    let out = model.forward(ids).unwrap();
    assert_eq!(out.logits.dims(), shape);
    let err = max_abs(&values(out.logits), &expected);
    println!("logits max-abs error vs HF transformers: {err:e}");
    assert!(err <= 1e-4, "logits max-abs error {err}");
}

/// Prefill then one token at a time through the latent cache gives the full forward's logits,
/// and the cache holds only `kv_lora_rank + qk_rope_head_dim` values per token and block.
#[test]
fn cached_decoding_matches_the_full_forward() {
    let device = Default::default();
    let (config, model) = load_checkpoint::<B>(&tiny_a(), &device).unwrap();
    let (ids, expected, [b, l, v]) = reference();
    let full = values(model.forward(ids.clone()).unwrap().logits);
    let mut cache = model.new_cache();
    let prefill = 7;
    let mut steps = vec![model.forward_with_cache(ids.clone().narrow(1, 0, prefill), &mut cache).unwrap()];
    for t in prefill..l {
        steps.push(model.forward_with_cache(ids.clone().narrow(1, t, 1), &mut cache).unwrap());
    }
    assert_eq!(cache.len(), l);
    let per_token = config.num_hidden_layers * (16 + 8);
    assert_eq!(cache.values_per_token(), per_token);
    let cached = values(Tensor::cat(steps, 1));
    assert_eq!(cached.len(), b * l * v);
    let err = max_abs(&cached, &full);
    let hf_err = max_abs(&cached, &expected);
    println!("cached vs full forward: {err:e}; cached vs HF: {hf_err:e}");
    assert!(err <= 1e-5, "cached decoding differs from the full forward by {err}");
    assert!(hf_err <= 1e-4);
}

/// Exporting tiny_a and importing the export gives the same parameters bit for bit, and the
/// export still reproduces HF's logits.
#[test]
fn export_of_tiny_a_reproduces_its_logits() {
    let device = Default::default();
    let (config, model) = load_checkpoint::<B>(&tiny_a(), &device).unwrap();
    let dir = scratch("export-tiny-a");
    save_checkpoint(&model, &config, &dir).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["model_type"], "deepseek_v3");
    assert_eq!(written["architectures"][0], "DeepseekV3ForCausalLM");
    assert_eq!(written["kv_lora_rank"], 16);
    // Same tensor names and shapes as the HF file.
    let ours = common::read_raw(&dir.join("model.safetensors"));
    let theirs = common::read_raw(&tiny_a().join("model.safetensors"));
    let shapes = |raw: &common::Raw| raw.iter().map(|(n, (_, s, _))| (n.clone(), s.clone())).collect::<Vec<_>>();
    assert_eq!(shapes(&ours), shapes(&theirs));
    assert!(ours.iter().all(|(n, (_, _, bytes))| *bytes == theirs[n].2), "f32 weights are copied exactly");

    let (_, reloaded) = load_checkpoint::<B>(&dir, &device).unwrap();
    let (ids, expected, _) = reference();
    let err = max_abs(&values(reloaded.forward(ids).unwrap().logits), &expected);
    assert!(err <= 1e-4, "{err}");
}

/// import(export(m)) == m for a randomly initialised MLA model with a plain `q_proj` and YaRN.
#[test]
fn export_then_import_is_bit_exact() {
    let config: DeepSeekConfig = serde_json::from_str(
        r#"{
        "vocab_size": 48, "hidden_size": 32, "intermediate_size": 40, "moe_intermediate_size": 12,
        "num_hidden_layers": 2, "first_k_dense_replace": 1, "n_routed_experts": 6,
        "n_shared_experts": 2, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
        "norm_topk_prob": true, "routed_scaling_factor": 2.0, "num_attention_heads": 2,
        "max_position_embeddings": 32, "q_lora_rank": null, "kv_lora_rank": 8,
        "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 5,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    }"#,
    )
    .unwrap();
    let device = Default::default();
    let mut model = config.init::<B>(&device).unwrap();
    // A non-zero router bias, so that the bias is exported too.
    for layer in model.moe_layers_mut() {
        layer.apply_bias_delta(&[0.5, -0.25, 0.125, 0.0, -1.0, 2.0]);
    }
    let dir = scratch("export-random");
    save_checkpoint(&model, &config, &dir).unwrap();
    let (reread, reloaded) = load_checkpoint::<B>(&dir, &device).unwrap();
    assert_eq!(reread.rope_scaling, config.rope_scaling);
    let (a, b) = (all_params(&model), all_params(&reloaded));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()));
        assert_eq!(x.len(), y.len());
    }
    let tokens = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_ints([[1, 5, 9, 47, 0, 3]], &device);
    let before = values(model.forward(tokens.clone()).unwrap().logits);
    let after = values(reloaded.forward(tokens).unwrap().logits);
    assert!(before.iter().zip(&after).all(|(p, q)| p.to_bits() == q.to_bits()));
}

/// The file-to-file path the command line uses: `input_ids` in, `logits` out.
#[test]
fn logits_file_writes_hf_logits() {
    let device = Default::default();
    let (_, model) = load_checkpoint::<B>(&tiny_a(), &device).unwrap();
    let out = scratch("logits-file").join("logits.safetensors");
    let shape = moe_model::hf::logits_file(&model, &tiny_a().join("reference.safetensors"), &out).unwrap();
    let (_, expected, expected_shape) = reference();
    assert_eq!(shape, expected_shape);
    let raw = common::read_raw(&out);
    let (dtype, dims, bytes) = &raw["logits"];
    assert_eq!((*dtype, dims.as_slice()), (safetensors::Dtype::F32, &shape[..]));
    let ours: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert!(max_abs(&ours, &expected) <= 1e-4);
}
