use std::path::Path;

use burn::nn::{Linear, RmsNorm};
use burn::tensor::{Tensor, backend::Backend};
use moe_experts::{MoeLayer, SwiGlu};
use safetensors::{Dtype, tensor::TensorView};
use serde_json::{Value, json};

use super::CheckpointError;
use crate::{Attention, DeepSeekConfig, DeepSeekModel, FeedForward, MlaAttention, MlaQuery};

/// `config` as an HF DeepSeek-V3 `config.json`: its own keys plus `architectures`,
/// `model_type` and the fixed keys HF expects (the weights are written as f32, so no
/// `quantization_config`).
pub fn hf_config_json(config: &DeepSeekConfig) -> Result<Value, CheckpointError> {
    let mut value = serde_json::to_value(config)
        .map_err(|e| CheckpointError::Unsupported(format!("config cannot be written as JSON: {e}")))?;
    let Value::Object(map) = &mut value else {
        return Err(CheckpointError::Unsupported("config did not serialize to a JSON object".into()));
    };
    map.remove("quantization_config");
    for (key, v) in [
        ("architectures", json!(["DeepseekV3ForCausalLM"])),
        ("model_type", json!("deepseek_v3")),
        ("hidden_act", json!("silu")),
        ("attention_bias", json!(false)),
        ("moe_layer_freq", json!(1)),
        ("num_key_value_heads", json!(config.num_attention_heads)),
        ("num_nextn_predict_layers", json!(0)),
        ("torch_dtype", json!("float32")),
    ] {
        map.insert(key.into(), v);
    }
    Ok(value)
}

fn values<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor.into_data().iter::<f32>().collect()
}

/// burn's `[in, out]` as HF's `[out, in]`.
fn transposed(values: &[f32], inp: usize, out: usize) -> Vec<f32> {
    let mut t = vec![0.0; values.len()];
    for i in 0..inp {
        for o in 0..out {
            t[o * inp + i] = values[i * out + o];
        }
    }
    t
}

/// Named f32 tensors in HF layout.
#[derive(Default)]
struct Tensors(Vec<(String, Vec<usize>, Vec<f32>)>);

impl Tensors {
    fn add(&mut self, name: String, shape: Vec<usize>, values: Vec<f32>) {
        self.0.push((name, shape, values));
    }

    fn linear<B: Backend>(&mut self, name: String, linear: &Linear<B>) {
        let [inp, out] = linear.weight.dims();
        self.add(name, vec![out, inp], transposed(&values(linear.weight.val()), inp, out));
    }

    fn norm<B: Backend>(&mut self, name: String, norm: &RmsNorm<B>) {
        self.add(name, norm.gamma.dims().to_vec(), values(norm.gamma.val()));
    }

    fn swiglu<B: Backend>(&mut self, prefix: &str, mlp: &SwiGlu<B>) {
        for (weight, proj) in [(&mlp.gate, "gate_proj"), (&mlp.up, "up_proj"), (&mlp.down, "down_proj")] {
            let [inp, out] = weight.dims();
            self.add(format!("{prefix}.{proj}.weight"), vec![out, inp], transposed(&values(weight.val()), inp, out));
        }
    }

    fn mla<B: Backend>(&mut self, prefix: &str, mla: &MlaAttention<B>) {
        let name = |field: &str| format!("{prefix}.{field}.weight");
        match &mla.query {
            MlaQuery::LowRank(q) => {
                self.linear(name("q_a_proj"), &q.q_a_proj);
                self.norm(name("q_a_layernorm"), &q.q_a_layernorm);
                self.linear(name("q_b_proj"), &q.q_b_proj);
            }
            MlaQuery::Direct(q_proj) => self.linear(name("q_proj"), q_proj),
        }
        self.linear(name("kv_a_proj_with_mqa"), &mla.kv_a_proj_with_mqa);
        self.norm(name("kv_a_layernorm"), &mla.kv_a_layernorm);
        self.linear(name("kv_b_proj"), &mla.kv_b_proj);
        self.linear(name("o_proj"), &mla.o_proj);
    }

    fn moe<B: Backend>(&mut self, prefix: &str, layer: &MoeLayer<B>) {
        self.add(
            format!("{prefix}.gate.weight"),
            layer.router.weight.dims().to_vec(),
            values(layer.router.weight.val()),
        );
        self.add(
            format!("{prefix}.gate.e_score_correction_bias"),
            layer.router.bias.dims().to_vec(),
            values(layer.router.bias.val()),
        );
        for (bank, proj) in
            [(&layer.experts.gate, "gate_proj"), (&layer.experts.up, "up_proj"), (&layer.experts.down, "down_proj")]
        {
            let [experts, inp, out] = bank.dims();
            let all = values(bank.val());
            for (e, one) in all.chunks_exact(inp * out).enumerate().take(experts) {
                self.add(format!("{prefix}.experts.{e}.{proj}.weight"), vec![out, inp], transposed(one, inp, out));
            }
        }
        if let Some(shared) = &layer.shared {
            self.swiglu(&format!("{prefix}.shared_experts"), shared);
        }
    }
}

/// Writes `model` as an HF DeepSeek-V3 checkpoint in `dir` (created if needed):
/// `config.json` ([`hf_config_json`]) and one f32 `model.safetensors` with per-expert weights
/// in HF's `[out, in]` layout. Holds the f32 copy of all weights in memory while writing.
pub fn save_checkpoint<B: Backend>(
    model: &DeepSeekModel<B>,
    config: &DeepSeekConfig,
    dir: &Path,
) -> Result<(), CheckpointError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { path, source }
    };
    let mut tensors = Tensors::default();
    tensors.add(
        "model.embed_tokens.weight".into(),
        model.embedding.weight.dims().to_vec(),
        values(model.embedding.weight.val()),
    );
    for (i, block) in model.blocks.iter().enumerate() {
        let prefix = format!("model.layers.{i}");
        tensors.norm(format!("{prefix}.input_layernorm.weight"), &block.attention_norm);
        tensors.norm(format!("{prefix}.post_attention_layernorm.weight"), &block.ffn_norm);
        match &block.attention {
            Attention::Latent(mla) => tensors.mla(&format!("{prefix}.self_attn"), mla),
            Attention::MultiHead(_) => {
                return Err(CheckpointError::Unsupported("multi-head attention has no HF DeepSeek-V3 layout".into()));
            }
        }
        match &block.ffn {
            FeedForward::Dense(mlp) => tensors.swiglu(&format!("{prefix}.mlp"), mlp),
            FeedForward::Moe(layer) => tensors.moe(&format!("{prefix}.mlp"), layer),
        }
    }
    tensors.norm("model.norm.weight".into(), &model.norm);
    if config.tie_word_embeddings {
        // HF rebuilds the head from the embedding; refuse to drop a head that differs.
        let [d, vocab] = model.lm_head.weight.dims();
        let head = transposed(&values(model.lm_head.weight.val()), d, vocab);
        if head != values(model.embedding.weight.val()) {
            return Err(CheckpointError::Unsupported(
                "tie_word_embeddings is true but the LM head differs from the token embedding".into(),
            ));
        }
    } else {
        tensors.linear("lm_head.weight".into(), &model.lm_head);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&hf_config_json(config)?)
        .map_err(|source| CheckpointError::Json { path: config_path.clone(), source })?;
    std::fs::write(&config_path, text).map_err(io(&config_path))?;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .0
        .into_iter()
        .map(|(name, shape, v)| (name, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (name, shape, data) in &bytes {
        let view = TensorView::new(Dtype::F32, shape.clone(), data)
            .map_err(|source| CheckpointError::Safetensors { path: dir.join("model.safetensors"), source })?;
        views.push((name.clone(), view));
    }
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).map_err(|source| CheckpointError::Safetensors { path, source })
}
