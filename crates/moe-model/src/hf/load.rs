use std::path::Path;

use burn::module::Param;
use burn::nn::{Linear, RmsNorm};
use burn::tensor::{Tensor, TensorData, backend::Backend};
use moe_experts::SwiGlu;
use moe_experts::hf::load_moe_layer_from;
use moe_experts::safetensors_source::TensorSource;

use super::{CheckpointError, TensorStore};
use crate::{Attention, DeepSeekConfig, DeepSeekModel, FeedForward, MlaAttention, MlaQuery, ModelConfigError};

/// Reads and validates `dir/config.json`. Unknown keys are ignored; known keys with values
/// this model does not implement are refused, naming the key.
pub fn load_config(dir: &Path) -> Result<DeepSeekConfig, CheckpointError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| CheckpointError::Io { path: path.clone(), source })?;
    let config: DeepSeekConfig =
        serde_json::from_str(&text).map_err(|source| CheckpointError::Json { path: path.clone(), source })?;
    config.validate()?;
    if config.kv_lora_rank.is_none() {
        return Err(ModelConfigError::Key {
            key: "kv_lora_rank",
            value: "null".into(),
            expected: "set: HF DeepSeek checkpoints hold MLA attention".into(),
        }
        .into());
    }
    Ok(config)
}

/// Tensors a checkpoint may hold that the model deliberately does not load: the
/// multi-token-prediction layers `model.layers.<n>.*` with `n >= num_hidden_layers`, and
/// precomputed `rotary_emb.inv_freq` buffers (the model derives its own from the config).
pub fn is_skipped(name: &str, num_hidden_layers: usize) -> bool {
    if name.ends_with("rotary_emb.inv_freq") {
        return true;
    }
    let layer = name.strip_prefix("model.layers.").and_then(|rest| rest.split('.').next());
    layer.and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| i >= num_hidden_layers)
}

/// Loads the config and model of an HF DeepSeek-V3 checkpoint directory.
///
/// ```no_run
/// use burn::backend::NdArray;
/// let (config, model) = moe_model::hf::load_checkpoint::<NdArray>("ckpt".as_ref(), &Default::default())?;
/// # Ok::<(), moe_model::hf::CheckpointError>(())
/// ```
pub fn load_checkpoint<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(DeepSeekConfig, DeepSeekModel<B>), CheckpointError> {
    let config = load_config(dir)?;
    let fp8_block = config.quantization_config.as_ref().map(|q| q.block_size()).transpose()?;
    let store = TensorStore::open(dir, fp8_block)?;
    let model = load_model(&config, &store, device)?;
    Ok((config, model))
}

fn param<B: Backend, const D: usize>(values: Vec<f32>, shape: [usize; D], device: &B::Device) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

/// HF's `[out, in]` as burn's `[in, out]`.
fn transposed(values: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let mut t = vec![0.0; values.len()];
    for o in 0..out {
        for i in 0..inp {
            t[i * out + o] = values[o * inp + i];
        }
    }
    t
}

/// Reads tensors into modules; the shapes come from the modules (already built from the
/// config), so a tensor that disagrees with the config is an error naming it.
struct Filler<'a, B: Backend> {
    store: &'a TensorStore,
    device: &'a B::Device,
}

impl<B: Backend> Filler<'_, B> {
    fn linear(&self, linear: &mut Linear<B>, name: &str) -> Result<(), CheckpointError> {
        let [inp, out] = linear.weight.lazy_shape().dims();
        let values = self.store.read_f32(name, &[out, inp])?;
        linear.weight = param(transposed(&values, out, inp), [inp, out], self.device);
        Ok(())
    }

    fn norm(&self, norm: &mut RmsNorm<B>, name: &str) -> Result<(), CheckpointError> {
        let [d] = norm.gamma.lazy_shape().dims();
        norm.gamma = param(self.store.read_f32(name, &[d])?, [d], self.device);
        Ok(())
    }

    fn swiglu(&self, mlp: &mut SwiGlu<B>, prefix: &str) -> Result<(), CheckpointError> {
        for (weight, proj) in [(&mut mlp.gate, "gate_proj"), (&mut mlp.up, "up_proj"), (&mut mlp.down, "down_proj")] {
            let [inp, out] = weight.lazy_shape().dims();
            let values = self.store.read_f32(&format!("{prefix}.{proj}.weight"), &[out, inp])?;
            *weight = param(transposed(&values, out, inp), [inp, out], self.device);
        }
        Ok(())
    }

    fn mla(&self, mla: &mut MlaAttention<B>, prefix: &str) -> Result<(), CheckpointError> {
        let name = |field: &str| format!("{prefix}.{field}.weight");
        match &mut mla.query {
            MlaQuery::LowRank(q) => {
                self.linear(&mut q.q_a_proj, &name("q_a_proj"))?;
                self.norm(&mut q.q_a_layernorm, &name("q_a_layernorm"))?;
                self.linear(&mut q.q_b_proj, &name("q_b_proj"))?;
            }
            MlaQuery::Direct(q_proj) => self.linear(q_proj, &name("q_proj"))?,
        }
        self.linear(&mut mla.kv_a_proj_with_mqa, &name("kv_a_proj_with_mqa"))?;
        self.norm(&mut mla.kv_a_layernorm, &name("kv_a_layernorm"))?;
        self.linear(&mut mla.kv_b_proj, &name("kv_b_proj"))?;
        self.linear(&mut mla.o_proj, &name("o_proj"))
    }
}

/// Builds the model `config` describes from the tensors in `store`; refuses tensors it would
/// leave unused (see [`is_skipped`]).
pub fn load_model<B: Backend>(
    config: &DeepSeekConfig,
    store: &TensorStore,
    device: &B::Device,
) -> Result<DeepSeekModel<B>, CheckpointError> {
    let mut model = config.init::<B>(device)?;
    let fill = Filler { store, device };
    let (vocab, d) = (config.vocab_size, config.moe.hidden_size);
    model.embedding.weight = param(store.read_f32("model.embed_tokens.weight", &[vocab, d])?, [vocab, d], device);
    for (i, block) in model.blocks.iter_mut().enumerate() {
        let prefix = format!("model.layers.{i}");
        fill.norm(&mut block.attention_norm, &format!("{prefix}.input_layernorm.weight"))?;
        fill.norm(&mut block.ffn_norm, &format!("{prefix}.post_attention_layernorm.weight"))?;
        match &mut block.attention {
            Attention::Latent(mla) => fill.mla(mla, &format!("{prefix}.self_attn"))?,
            Attention::MultiHead(_) => {
                return Err(CheckpointError::Unsupported("multi-head attention has no HF DeepSeek-V3 layout".into()));
            }
        }
        match &mut block.ffn {
            FeedForward::Dense(mlp) => fill.swiglu(mlp, &format!("{prefix}.mlp"))?,
            FeedForward::Moe(layer) => {
                *layer = load_moe_layer_from(&config.moe_layer_config()?, store, &format!("{prefix}.mlp"), device)?;
            }
        }
    }
    fill.norm(&mut model.norm, "model.norm.weight")?;
    let head = if config.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    fill.linear(&mut model.lm_head, head)?;
    let unused = store.unread(|name| is_skipped(name, config.num_hidden_layers));
    if !unused.is_empty() {
        return Err(CheckpointError::Unexpected(unused));
    }
    Ok(model)
}
