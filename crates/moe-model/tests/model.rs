//! The decoder: configuration errors, causality, and that it learns.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor};
use moe_balance::{BiasBalancer, BiasUpdateConfig, LoadTracker};
use moe_model::{DeepSeekConfig, ModelConfigError, ModelError};

type B = NdArray;

fn tiny() -> DeepSeekConfig {
    serde_json::from_str(
        r#"{
        "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
        "moe_intermediate_size": 16, "num_hidden_layers": 3, "first_k_dense_replace": 1,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "n_group": 4, "topk_group": 2, "norm_topk_prob": true, "routed_scaling_factor": 2.5,
        "num_attention_heads": 4, "max_position_embeddings": 16
    }"#,
    )
    .unwrap()
}

#[test]
fn reads_the_hf_fixture_config() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tiny_a/config.json")).unwrap();
    let config: DeepSeekConfig = serde_json::from_str(&text).unwrap();
    assert_eq!((config.moe.hidden_size, config.num_hidden_layers, config.first_k_dense_replace), (64, 3, 1));
    assert_eq!(config.num_moe_layers(), 2);
    config.validate().unwrap();
}

#[test]
fn bad_keys_are_named() {
    let key_of = |c: DeepSeekConfig| match c.validate() {
        Err(ModelConfigError::Key { key, .. }) => key,
        other => panic!("expected a key error, got {other:?}"),
    };
    assert_eq!(key_of(DeepSeekConfig { num_attention_heads: 3, ..tiny() }), "num_attention_heads");
    // 32 / 32 heads leaves width 1: odd, no RoPE pairs.
    assert_eq!(key_of(DeepSeekConfig { num_attention_heads: 32, ..tiny() }), "num_attention_heads");
    assert_eq!(key_of(DeepSeekConfig { first_k_dense_replace: 4, ..tiny() }), "first_k_dense_replace");
    assert_eq!(key_of(DeepSeekConfig { vocab_size: 0, ..tiny() }), "vocab_size");
    assert_eq!(key_of(DeepSeekConfig { rms_norm_eps: -1.0, ..tiny() }), "rms_norm_eps");
    let mut bad_moe = tiny();
    bad_moe.moe.topk_group = 5;
    assert!(matches!(bad_moe.validate(), Err(ModelConfigError::Moe(m)) if m.contains("topk_groups")));
    // All-dense models ignore the MoE keys.
    let mut dense = DeepSeekConfig { first_k_dense_replace: 3, ..tiny() };
    dense.moe.topk_group = 5;
    assert_eq!(dense.validate(), Ok(()));
}

#[test]
fn future_tokens_never_change_past_logits() {
    let device = Default::default();
    let model = tiny().init::<B>(&device).unwrap();
    let a = Tensor::<B, 2, Int>::from_ints([[3, 7, 1, 9, 4, 4, 2, 8]], &device);
    let b = Tensor::<B, 2, Int>::from_ints([[3, 7, 1, 9, 20, 31, 0, 5]], &device);
    let la: Vec<f32> = model.forward(a).unwrap().logits.into_data().iter::<f32>().collect();
    let lb: Vec<f32> = model.forward(b).unwrap().logits.into_data().iter::<f32>().collect();
    let v = 32;
    // Positions 0..4 see the same prefix: identical logits. Position 4 differs.
    for i in 0..4 * v {
        assert!((la[i] - lb[i]).abs() < 1e-5, "position {} changed", i / v);
    }
    assert!((4 * v..5 * v).any(|i| (la[i] - lb[i]).abs() > 1e-4));
}

#[test]
fn too_long_a_sequence_is_a_typed_error() {
    let device = Default::default();
    let model = tiny().init::<B>(&device).unwrap();
    let tokens = Tensor::<B, 2, Int>::zeros([1, 17], &device);
    assert_eq!(model.forward(tokens).unwrap_err(), ModelError::SequenceTooLong { got: 17, max: 16 });
}

/// The model learns a fixed sequence (next-token prediction) with the balance loss and the
/// loss-free bias update, every parameter gets a gradient, and the biases move.
#[test]
fn it_learns_a_sequence() {
    type Ad = Autodiff<NdArray>;
    let device = Default::default();
    let mut model = tiny().init::<Ad>(&device).unwrap();
    let seq: Vec<i64> = (0..16).map(|i| (i * 5 + 3) % 32).collect();
    let inputs = Tensor::<Ad, 1, Int>::from_ints(&seq[..15], &device).reshape([1, 15]);
    let targets = Tensor::<Ad, 1, Int>::from_ints(&seq[1..], &device);
    let mut optim = AdamWConfig::new().init();
    let mut losses = Vec::new();
    let trainable = trainable_params(&model);
    let balancer = BiasBalancer::new(BiasUpdateConfig::new());
    let mut tracker = LoadTracker::<Ad>::new(2, 8);
    for _ in 0..40 {
        let out = model.forward(inputs.clone()).unwrap();
        assert_eq!(out.moe.len(), 2);
        for (layer, aux) in out.moe.iter().enumerate() {
            tracker.record(layer, aux.counts.clone());
        }
        let task = CrossEntropyLossConfig::new().init(&device).forward(out.logits.reshape([15, 32]), targets.clone());
        let balance = out.moe.iter().filter_map(|aux| aux.loss()).reduce(|a, b| a + b).unwrap();
        losses.push(task.clone().into_scalar());
        let grads = GradientsParams::from_grads((task + balance).backward(), &model);
        assert_eq!(grads.len(), trainable, "every trainable parameter gets a gradient");
        model = optim.step(1e-2, model, grads);
        for (layer, load) in model.moe_layers_mut().zip(tracker.take()) {
            layer.apply_bias_delta(&balancer.bias_delta(&load));
        }
    }
    // 15 tokens x top-2 over 8 experts can never balance exactly: each layer's biases moved.
    for layer in model.moe_layers_mut() {
        let bias: Vec<f32> = layer.router.bias().into_data().iter::<f32>().collect();
        assert!(bias.iter().any(|b| b.abs() > 1e-3), "{bias:?}");
    }
    assert!(losses[0] > 3.0, "starts near ln 32: {}", losses[0]);
    assert!(*losses.last().unwrap() < 0.5, "losses: {losses:?}");
}

/// Parameters that autodiff trains (router biases are parameters without gradients).
fn trainable_params<M: Module<Autodiff<NdArray>>>(model: &M) -> usize {
    struct Count(usize);
    impl burn::module::ModuleVisitor<Autodiff<NdArray>> for Count {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<Autodiff<NdArray>, D>>) {
            if param.val().is_require_grad() {
                self.0 += 1;
            }
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}

/// An MLA model (the HF DeepSeek-V3 attention) trains: every parameter gets a gradient and
/// the loss falls.
#[test]
fn an_mla_model_learns_a_sequence() {
    type Ad = Autodiff<NdArray>;
    let mut config = tiny();
    config.kv_lora_rank = Some(8);
    config.q_lora_rank = Some(12);
    config.qk_nope_head_dim = Some(8);
    config.qk_rope_head_dim = Some(4);
    config.v_head_dim = Some(8);
    let device = Default::default();
    let mut model = config.init::<Ad>(&device).unwrap();
    assert!(matches!(model.blocks[0].attention, moe_model::Attention::Latent(_)));
    let seq: Vec<i64> = (0..16).map(|i| (i * 7 + 1) % 32).collect();
    let inputs = Tensor::<Ad, 1, Int>::from_ints(&seq[..15], &device).reshape([1, 15]);
    let targets = Tensor::<Ad, 1, Int>::from_ints(&seq[1..], &device);
    let mut optim = AdamWConfig::new().init();
    let trainable = trainable_params(&model);
    let mut losses = Vec::new();
    for _ in 0..40 {
        let out = model.forward(inputs.clone()).unwrap();
        let loss = CrossEntropyLossConfig::new().init(&device).forward(out.logits.reshape([15, 32]), targets.clone());
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        assert_eq!(grads.len(), trainable, "every trainable parameter gets a gradient");
        model = optim.step(1e-2, model, grads);
    }
    assert!(*losses.last().unwrap() < 0.5, "losses: {losses:?}");
}
