//! Checkpoint import: shards, skipped MTP layers, FP8 and BF16 weights, and the errors that
//! name what is wrong.

mod common;

use common::{
    B, Raw, f32_bytes, max_abs, read_raw, reference, tiny_a, tiny_config, values, write_checkpoint, write_raw,
};
use moe_experts::LoadError;
use moe_model::hf::{CheckpointError, load_checkpoint};
use moe_model::{Attention, FeedForward, MlaQuery, ModelConfigError};
use safetensors::Dtype;

/// A change to a `config.json`.
type Edit = dyn Fn(&mut serde_json::Value);

fn tiny_raw() -> Raw {
    read_raw(&tiny_a().join("model.safetensors"))
}

fn load_err(name: &str, config: &serde_json::Value, raw: &Raw) -> CheckpointError {
    let dir = write_checkpoint(name, config, raw);
    match load_checkpoint::<B>(&dir, &Default::default()) {
        Ok(_) => panic!("{name}: loaded"),
        Err(e) => e,
    }
}

fn hf_logits_error(dir: &std::path::Path) -> f32 {
    let (_, model) = load_checkpoint::<B>(dir, &Default::default()).unwrap();
    let (ids, expected, _) = reference();
    max_abs(&values(model.forward(ids).unwrap().logits), &expected)
}

#[test]
fn sharded_checkpoints_load_like_one_file() {
    let raw = tiny_raw();
    let dir = common::scratch("sharded");
    std::fs::copy(tiny_a().join("config.json"), dir.join("config.json")).unwrap();
    let (mut first, mut second) = (Raw::new(), Raw::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, tensor)) in raw.into_iter().enumerate() {
        let (shard, file) = if i % 2 == 0 { (&mut first, "a.safetensors") } else { (&mut second, "b.safetensors") };
        weight_map.insert(name.clone(), file.into());
        shard.insert(name, tensor);
    }
    write_raw(&dir.join("a.safetensors"), &first);
    write_raw(&dir.join("b.safetensors"), &second);
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert!(hf_logits_error(&dir) <= 1e-4);

    // An index that points a tensor at the wrong shard is refused, naming the tensor.
    let name = first.keys().next().unwrap().clone();
    let mut wrong = index.clone();
    wrong["weight_map"][&name] = "b.safetensors".into();
    std::fs::write(dir.join("model.safetensors.index.json"), wrong.to_string()).unwrap();
    let err = load_checkpoint::<B>(&dir, &Default::default()).unwrap_err();
    assert!(matches!(&err, CheckpointError::NotInShard { tensor, .. } if *tensor == name), "{err}");
}

/// A checkpoint with one multi-token-prediction layer (`model.layers.3`, as DeepSeek-V3 ships
/// it) loads as the same 3-block model: nothing of layer 3 lands in a block.
#[test]
fn mtp_layers_are_skipped_not_misplaced() {
    let mut raw = tiny_raw();
    let mut config = tiny_config();
    config["num_nextn_predict_layers"] = 1.into();
    let layer2: Raw =
        raw.iter().filter(|(n, _)| n.starts_with("model.layers.2.")).map(|(n, t)| (n.clone(), t.clone())).collect();
    for (name, (dtype, shape, bytes)) in layer2 {
        // Different values, so a misplaced load would change the logits.
        let scrambled: Vec<u8> = bytes.chunks_exact(4).rev().flatten().copied().collect();
        raw.insert(name.replace("model.layers.2.", "model.layers.3."), (dtype, shape, scrambled));
    }
    for (extra, shape) in [("eh_proj.weight", vec![64, 128]), ("enorm.weight", vec![64]), ("hnorm.weight", vec![64])] {
        let n: usize = shape.iter().product();
        raw.insert(format!("model.layers.3.{extra}"), (Dtype::F32, shape, f32_bytes(&vec![0.5; n])));
    }
    let dir = write_checkpoint("mtp", &config, &raw);
    let (_, model) = load_checkpoint::<B>(&dir, &Default::default()).unwrap();
    assert_eq!(model.blocks.len(), 3);
    assert!(hf_logits_error(&dir) <= 1e-4);
}

#[test]
fn bad_tensors_are_named() {
    let config = tiny_config();
    let mut missing = tiny_raw();
    missing.remove("model.layers.1.self_attn.kv_b_proj.weight");
    let err = load_err("missing", &config, &missing);
    assert!(
        matches!(&err, CheckpointError::Tensor(LoadError::Missing(n)) if n == "model.layers.1.self_attn.kv_b_proj.weight"),
        "{err}"
    );

    let mut missing_expert = tiny_raw();
    missing_expert.remove("model.layers.2.mlp.experts.15.down_proj.weight");
    let err = load_err("missing-expert", &config, &missing_expert);
    assert!(err.to_string().contains("model.layers.2.mlp.experts.15.down_proj.weight"), "{err}");

    let mut extra = tiny_raw();
    extra.insert("model.layers.0.self_attn.q_proj.weight".into(), (Dtype::F32, vec![1], f32_bytes(&[1.0])));
    let err = load_err("extra", &config, &extra);
    assert!(
        matches!(&err, CheckpointError::Unexpected(names) if names == &["model.layers.0.self_attn.q_proj.weight"]),
        "{err}"
    );

    let mut misshaped = tiny_raw();
    misshaped
        .insert("model.layers.0.self_attn.o_proj.weight".into(), (Dtype::F32, vec![64, 32], f32_bytes(&[0.0; 2048])));
    let err = load_err("misshaped", &config, &misshaped);
    assert!(
        matches!(&err, CheckpointError::Tensor(LoadError::Shape { name, got, expected })
            if name == "model.layers.0.self_attn.o_proj.weight" && got == &[64, 32] && expected == &[64, 64]),
        "{err}"
    );

    let mut wrong_dtype = tiny_raw();
    wrong_dtype.insert("model.norm.weight".into(), (Dtype::I32, vec![64], vec![0; 256]));
    let err = load_err("dtype", &config, &wrong_dtype);
    assert!(
        matches!(&err, CheckpointError::Tensor(LoadError::Dtype { name, .. }) if name == "model.norm.weight"),
        "{err}"
    );

    // A truncated file: the header promises more bytes than there are.
    let dir = write_checkpoint("truncated", &config, &tiny_raw());
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    let err = load_checkpoint::<B>(&dir, &Default::default()).unwrap_err();
    assert!(matches!(&err, CheckpointError::Safetensors { path, .. } if path.ends_with("model.safetensors")), "{err}");
}

#[test]
fn unsupported_config_values_are_named() {
    let key_of = |edit: &Edit, name: &str| {
        let mut config = tiny_config();
        edit(&mut config);
        match load_err(name, &config, &tiny_raw()) {
            CheckpointError::Config(ModelConfigError::Key { key, .. }) => key,
            CheckpointError::Config(ModelConfigError::Moe(message)) => Box::leak(message.into_boxed_str()),
            other => panic!("{name}: {other}"),
        }
    };
    let cases: [(&Edit, &str, &str); 9] = [
        (
            &|c| c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0}),
            "rope-linear",
            "rope_scaling.type",
        ),
        (
            &|c| c["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0}),
            "rope-dyn",
            "rope_scaling.type",
        ),
        (
            &|c| c["rope_scaling"] = serde_json::json!({"type": "yarn", "original_max_position_embeddings": 64}),
            "yarn-factor",
            "rope_scaling.factor",
        ),
        (&|c| c["hidden_act"] = "gelu".into(), "act", "hidden_act"),
        (&|c| c["attention_bias"] = true.into(), "bias", "attention_bias"),
        (&|c| c["model_type"] = "llama".into(), "type", "model_type"),
        (
            &|c| c["quantization_config"] = serde_json::json!({"quant_method": "gptq"}),
            "quant",
            "quantization_config.quant_method",
        ),
        (&|c| c["qk_rope_head_dim"] = serde_json::Value::Null, "rope-dim", "qk_rope_head_dim"),
        (&|c| c.as_object_mut().unwrap().remove("kv_lora_rank").map(drop).unwrap(), "no-mla", "kv_lora_rank"),
    ];
    for (edit, name, key) in cases {
        assert_eq!(key_of(edit, name), key, "{name}");
    }
    assert!(key_of(&|c| c["scoring_func"] = "tanh".into(), "scoring").contains("scoring_func"));
    assert!(key_of(&|c| c["topk_method"] = "group_limited_greedy".into(), "topk").contains("topk_method"));

    // Harmless unknown keys and `rope_scaling: null` are accepted.
    let mut config = tiny_config();
    config["some_future_key"] = serde_json::json!({"anything": [1, 2]});
    let dir = write_checkpoint("unknown-key", &config, &tiny_raw());
    assert!(hf_logits_error(&dir) <= 1e-4);
}

/// The E4M3 value of `byte`, built from its bit fields into an f32 bit pattern (independent of
/// the library's arithmetic decoder).
fn e4m3_by_bits(byte: u8) -> f32 {
    let sign = u32::from(byte >> 7) << 31;
    let exponent = u32::from((byte >> 3) & 0xf);
    let mantissa = u32::from(byte & 0x7);
    if exponent == 0 {
        // Subnormals: mantissa * 2^-9, exact in f32.
        return f32::from_bits(sign) + if sign != 0 { -1.0 } else { 1.0 } * mantissa as f32 / 512.0;
    }
    f32::from_bits(sign | ((exponent + 127 - 7) << 23) | (mantissa << 20))
}

/// FP8 weights with block scales (blocks that do not divide the weight) are dequantized into
/// the right module, and BF16 tensors are widened exactly.
#[test]
fn fp8_and_bf16_weights_are_dequantized() {
    let block = [24usize, 40];
    let mut config = tiny_config();
    config["quantization_config"] = serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": block});
    let mut raw = tiny_raw();
    // Deterministic bytes over the whole E4M3 range except the NaN codes.
    let fp8_bytes = |n: usize, salt: usize| -> Vec<u8> {
        (0..n).map(|i| ((i * 37 + salt * 11) % 256) as u8).map(|b| if b & 0x7f == 0x7f { 0x3f } else { b }).collect()
    };
    let quantized = [
        ("model.layers.1.mlp.experts.3.up_proj.weight", 32usize, 64usize),
        ("model.layers.1.self_attn.q_b_proj.weight", 96, 32),
    ];
    let mut expected = Vec::new();
    for (salt, &(name, rows, cols)) in quantized.iter().enumerate() {
        let bytes = fp8_bytes(rows * cols, salt);
        let grid = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
        let scales: Vec<f32> = (0..grid[0] * grid[1]).map(|i| 0.001 * (i + 1) as f32).collect();
        // The hand loop: each element times its block's scale.
        let mut dense = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                dense[r * cols + c] =
                    e4m3_by_bits(bytes[r * cols + c]) * scales[(r / block[0]) * grid[1] + c / block[1]];
            }
        }
        expected.push(dense);
        raw.insert(name.into(), (Dtype::F8_E4M3, vec![rows, cols], bytes));
        raw.insert(format!("{name}_scale_inv"), (Dtype::F32, grid.to_vec(), f32_bytes(&scales)));
    }
    // model.norm.weight as BF16: each value's upper 16 bits.
    let norm: Vec<f32> = (0..64).map(|i| 1.0 + i as f32 / 7.0).collect();
    let bf16: Vec<u8> = norm.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
    raw.insert("model.norm.weight".into(), (Dtype::BF16, vec![64], bf16));

    let dir = write_checkpoint("fp8", &config, &raw);
    let (_, model) = load_checkpoint::<B>(&dir, &Default::default()).unwrap();
    // Burn holds linear weights as [in, out]: compare transposed.
    let transposed = |w: &[f32], rows: usize, cols: usize| -> Vec<f32> {
        (0..cols).flat_map(|c| (0..rows).map(move |r| w[r * cols + c])).collect()
    };
    let FeedForward::Moe(layer) = &model.blocks[1].ffn else { panic!("block 1 is MoE") };
    let up = values(layer.experts.up.val().narrow(0, 3, 1));
    assert_eq!(up, transposed(&expected[0], 32, 64));
    let Attention::Latent(mla) = &model.blocks[1].attention else { panic!("MLA") };
    let MlaQuery::LowRank(q) = &mla.query else { panic!("low-rank query") };
    assert_eq!(values(q.q_b_proj.weight.val()), transposed(&expected[1], 96, 32));
    let widened = values(model.norm.gamma.val());
    assert!(widened.iter().zip(&norm).all(|(w, v)| w.to_bits() == v.to_bits() & 0xffff_0000));

    // Without the scales, or without quantization_config, FP8 is refused naming what is missing.
    let mut no_scale = raw.clone();
    no_scale.remove("model.layers.1.self_attn.q_b_proj.weight_scale_inv");
    let err = load_err("fp8-no-scale", &config, &no_scale);
    assert!(
        matches!(&err, CheckpointError::Tensor(LoadError::Missing(n)) if n.ends_with("q_b_proj.weight_scale_inv")),
        "{err}"
    );
    config.as_object_mut().unwrap().remove("quantization_config");
    let err = load_err("fp8-no-config", &config, &raw);
    assert!(
        matches!(&err, CheckpointError::Tensor(LoadError::Unsupported { key: "quantization_config", .. })),
        "{err}"
    );
}

/// With `tie_word_embeddings` the head is the embedding: loaded from it, left out on export,
/// and an untied head is not silently dropped.
#[test]
fn tied_embeddings_load_and_export() {
    let mut config = tiny_config();
    config["tie_word_embeddings"] = true.into();
    let mut raw = tiny_raw();
    raw.remove("lm_head.weight");
    let dir = write_checkpoint("tied", &config, &raw);
    let (parsed, model) = load_checkpoint::<B>(&dir, &Default::default()).unwrap();
    let head = values(model.lm_head.weight.val().transpose());
    assert_eq!(head, values(model.embedding.weight.val()));
    let out = common::scratch("tied-export");
    moe_model::hf::save_checkpoint(&model, &parsed, &out).unwrap();
    assert!(!read_raw(&out.join("model.safetensors")).contains_key("lm_head.weight"));
    let (_, reloaded) = load_checkpoint::<B>(&out, &Default::default()).unwrap();
    assert_eq!(values(reloaded.lm_head.weight.val()), values(model.lm_head.weight.val()));

    let (_, untied) = load_checkpoint::<B>(&tiny_a(), &Default::default()).unwrap();
    let err = moe_model::hf::save_checkpoint(&untied, &parsed, &common::scratch("untied")).unwrap_err();
    assert!(matches!(err, CheckpointError::Unsupported(ref m) if m.contains("tie_word_embeddings")), "{err}");
}
