//! The layer against HF transformers 5.17 (the workspace's one fixture,
//! `crates/moe-model/tests/data/tiny_a`, see its README).

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use moe_experts::LoadError;
use moe_experts::hf::{HfMoeConfig, load_moe_layer};
use safetensors::SafeTensors;

type B = NdArray;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../moe-model/tests/data/tiny_a");

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{DIR}/{name}")).unwrap()
}

fn tensor_f32(file: &SafeTensors, name: &str) -> (Vec<f32>, Vec<usize>) {
    let v = file.tensor(name).unwrap();
    (v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(), v.shape().to_vec())
}

fn tensor_i64(file: &SafeTensors, name: &str) -> Vec<i64> {
    let v = file.tensor(name).unwrap();
    v.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn moe_layer_matches_hf_transformers() {
    let reference_bytes = read("reference.safetensors");
    let reference = SafeTensors::deserialize(&reference_bytes).unwrap();
    let layer_index = tensor_i64(&reference, "moe_layer")[0];
    let config =
        HfMoeConfig::from_json(&String::from_utf8(read("config.json")).unwrap()).unwrap().layer_config().unwrap();
    let device = Default::default();
    let layer =
        load_moe_layer::<B>(&config, &read("model.safetensors"), &format!("model.layers.{layer_index}.mlp"), &device)
            .unwrap();

    let (input, shape) = tensor_f32(&reference, "moe_input");
    let x = Tensor::<B, 3>::from_data(TensorData::new(input, [shape[0], shape[1], shape[2]]), &device);
    let (out, aux) = layer.forward(x.clone()).unwrap();

    // Expert ids: HF sorts them ascending per token; ours are best-first.
    let ids = aux.expert_ids.clone().sort(1);
    let order = aux.expert_ids.clone().argsort(1);
    let ours_ids: Vec<i64> = ids.into_data().iter::<i64>().collect();
    assert_eq!(ours_ids, tensor_i64(&reference, "topk_indices"));
    let ours_w: Vec<f32> = aux.weights.clone().gather(1, order).into_data().iter::<f32>().collect();
    let (ref_w, _) = tensor_f32(&reference, "topk_weights");
    let w_err = max_abs(&ours_w, &ref_w);
    assert!(w_err <= 1e-5, "topk_weights max-abs error {w_err}");

    let (ref_out, _) = tensor_f32(&reference, "moe_output");
    let ours: Vec<f32> = out.into_data().iter::<f32>().collect();
    let err = max_abs(&ours, &ref_out);
    println!("moe_output max-abs error vs HF: {err:e}; topk_weights: {w_err:e}");
    assert!(err <= 1e-5, "moe_output max-abs error {err}");

    // The loop oracle agrees on the same weights.
    let looped: Vec<f32> = layer.forward_loop(x).unwrap().into_data().iter::<f32>().collect();
    assert!(max_abs(&looped, &ref_out) <= 1e-5);
}

#[test]
fn checkpoint_errors_name_the_tensor() {
    let config =
        HfMoeConfig::from_json(&String::from_utf8(read("config.json")).unwrap()).unwrap().layer_config().unwrap();
    let device = Default::default();
    // Layer 0 is dense: no experts there.
    let err = load_moe_layer::<B>(&config, &read("model.safetensors"), "model.layers.0.mlp", &device).unwrap_err();
    assert!(matches!(&err, LoadError::Missing(name) if name == "model.layers.0.mlp.gate.weight"), "{err}");
    // A config that disagrees with the tensors: the wrong expert width.
    let wrong = moe_experts::MoeLayerConfig { expert_hidden: 16, ..config.clone() };
    let err = load_moe_layer::<B>(&wrong, &read("model.safetensors"), "model.layers.1.mlp", &device).unwrap_err();
    assert!(
        matches!(&err, LoadError::Shape { name, got, expected }
            if name == "model.layers.1.mlp.experts.0.gate_proj.weight" && got == &[32, 64] && expected == &[16, 64]),
        "{err}"
    );
    // A truncated file.
    let bytes = read("model.safetensors");
    let err = load_moe_layer::<B>(&config, &bytes[..bytes.len() / 2], "model.layers.1.mlp", &device).unwrap_err();
    assert!(matches!(err, LoadError::Safetensors(_)), "{err}");
    // An unsupported scoring function names its key.
    let text = String::from_utf8(read("config.json")).unwrap().replace("\"sigmoid\"", "\"sparsemax\"");
    let err = HfMoeConfig::from_json(&text).unwrap().layer_config().unwrap_err();
    assert!(matches!(err, LoadError::Unsupported { key: "scoring_func", .. }), "{err}");
}
