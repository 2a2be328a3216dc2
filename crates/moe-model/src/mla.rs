//! Multi-head latent attention (DeepSeek-V2/V3): keys and values are rebuilt per head from a
//! small shared latent, so a cache need only keep that latent and one rotary key per token.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{Bool, FloatDType, Tensor, activation::softmax, backend::Backend};
use moe_experts::MoeBackend;

use crate::cache::LatentCache;
use crate::config::MlaDims;
use crate::precision::{linear, rms_norm};
use crate::rope::RotaryEmbedding;

/// The low-rank query path: `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
#[derive(Module, Debug)]
pub struct LowRankQuery<B: Backend> {
    /// `q_a_proj`: `d -> q_lora_rank`.
    pub q_a_proj: Linear<B>,
    /// `q_a_layernorm` (RMSNorm over `q_lora_rank`).
    pub q_a_layernorm: RmsNorm<B>,
    /// `q_b_proj`: `q_lora_rank -> heads * (qk_nope + qk_rope)`.
    pub q_b_proj: Linear<B>,
}

/// How MLA forms its queries.
// One per block; burn has no `Module` for `Box` to shrink the larger variant.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum MlaQuery<B: Backend> {
    /// Through a `q_lora_rank` bottleneck (DeepSeek-V3).
    LowRank(LowRankQuery<B>),
    /// `q_proj`: `d -> heads * (qk_nope + qk_rope)` (`q_lora_rank: null`, e.g. V2-Lite).
    Direct(Linear<B>),
}

/// Causal multi-head latent attention. Linear weights are burn's `[in, out]`; field names are
/// HF's (`self_attn.<field>`).
#[derive(Module, Debug)]
pub struct MlaAttention<B: Backend> {
    /// The query projection(s).
    pub query: MlaQuery<B>,
    /// `kv_a_proj_with_mqa`: `d -> kv_lora_rank + qk_rope` (latent, then the shared rotary key).
    pub kv_a_proj_with_mqa: Linear<B>,
    /// `kv_a_layernorm` (RMSNorm over `kv_lora_rank`).
    pub kv_a_layernorm: RmsNorm<B>,
    /// `kv_b_proj`: `kv_lora_rank -> heads * (qk_nope + v_head)`, per head keys then values.
    pub kv_b_proj: Linear<B>,
    /// `o_proj`: `heads * v_head -> d`.
    pub o_proj: Linear<B>,
    rope: RotaryEmbedding<B>,
    heads: usize,
    kv_lora_rank: usize,
    qk_nope: usize,
    qk_rope: usize,
    v_head: usize,
    softmax_scale: f64,
}

impl<B: Backend> MlaAttention<B> {
    /// A randomly initialised MLA over width `d`; `softmax_scale` is `qk_head^-0.5` times any
    /// YaRN correction.
    pub fn new(
        dims: &MlaDims,
        d: usize,
        eps: f64,
        rope: RotaryEmbedding<B>,
        softmax_scale: f64,
        device: &B::Device,
    ) -> Self {
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let norm = |w| RmsNormConfig::new(w).with_epsilon(eps).init(device);
        let q_width = dims.heads * dims.qk_head();
        let query = match dims.q_lora_rank {
            Some(rank) => MlaQuery::LowRank(LowRankQuery {
                q_a_proj: linear(d, rank),
                q_a_layernorm: norm(rank),
                q_b_proj: linear(rank, q_width),
            }),
            None => MlaQuery::Direct(linear(d, q_width)),
        };
        Self {
            query,
            kv_a_proj_with_mqa: linear(d, dims.kv_lora_rank + dims.qk_rope),
            kv_a_layernorm: norm(dims.kv_lora_rank),
            kv_b_proj: linear(dims.kv_lora_rank, dims.heads * (dims.qk_nope + dims.v_head)),
            o_proj: linear(dims.heads * dims.v_head, d),
            rope,
            heads: dims.heads,
            kv_lora_rank: dims.kv_lora_rank,
            qk_nope: dims.qk_nope,
            qk_rope: dims.qk_rope,
            v_head: dims.v_head,
            softmax_scale,
        }
    }

    /// The scale applied to the query-key products.
    pub fn softmax_scale(&self) -> f64 {
        self.softmax_scale
    }
}

impl<B: MoeBackend> MlaAttention<B> {
    /// Per-head queries at positions `start..`: the part without positions
    /// `[b, heads, l, qk_nope]` and the rotated part `[b, heads, l, qk_rope]`.
    fn queries(&self, x: Tensor<B, 3>, start: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, l, _] = x.dims();
        let q = match &self.query {
            MlaQuery::LowRank(q) => linear(&q.q_b_proj, rms_norm(&q.q_a_layernorm, linear(&q.q_a_proj, x))),
            MlaQuery::Direct(q_proj) => linear(q_proj, x),
        };
        let q = q.reshape([b, l, self.heads, self.qk_nope + self.qk_rope]).swap_dims(1, 2);
        let q_nope = q.clone().narrow(3, 0, self.qk_nope);
        let q_rope = self.rope.apply(q.narrow(3, self.qk_nope, self.qk_rope), start);
        (q_nope, q_rope)
    }

    /// What a cache keeps per token: the normalised latent `[b, l, kv_lora_rank]` and the
    /// rotated shared key `[b, l, qk_rope]`, at positions `start..`.
    fn latent(&self, x: Tensor<B, 3>, start: usize) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [b, l, _] = x.dims();
        let kv = linear(&self.kv_a_proj_with_mqa, x);
        let latent = rms_norm(&self.kv_a_layernorm, kv.clone().narrow(2, 0, self.kv_lora_rank));
        let rope_key = kv.narrow(2, self.kv_lora_rank, self.qk_rope).reshape([b, 1, l, self.qk_rope]);
        (latent, self.rope.apply(rope_key, start).reshape([b, l, self.qk_rope]))
    }

    /// Masked softmax of `scores` `[b, heads, l, t]` for queries at positions `start..` over
    /// keys at `0..t`, in f32; the weights in the scores' dtype.
    fn attention_weights(&self, scores: Tensor<B, 4>, start: usize) -> Tensor<B, 4> {
        let [b, h, l, t] = scores.dims();
        let dtype = scores.dtype();
        let scores = scores.cast(FloatDType::F32).mul_scalar(self.softmax_scale);
        // True where the key lies after the query: the future.
        let future = Tensor::<B, 2, Bool>::tril_mask([l, t], start as i64, &scores.device()).reshape([1, 1, l, t]);
        softmax(scores.mask_fill(future.expand([b, h, l, t]), f32::NEG_INFINITY), 3).cast(dtype)
    }

    /// `[b, heads, l, v_head]` -> `o_proj` output `[b, l, d]`.
    fn output(&self, heads: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, h, l, v] = heads.dims();
        linear(&self.o_proj, heads.swap_dims(1, 2).reshape([b, l, h * v]))
    }

    /// Causal self-attention over `x` `[b, l, d]` at positions `0..l`, with per-head keys and
    /// values expanded from the latent (the training form), in `x`'s dtype: the backend's
    /// causal attention on queries and keys that hold both parts, `[q_nope, q_rope]` and
    /// `[k_nope, rope_key]`, whose product is the sum of the two parts' products.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, l, _] = x.dims();
        let (q_nope, q_rope) = self.queries(x.clone(), 0);
        let (latent, rope_key) = self.latent(x, 0);
        let kv =
            linear(&self.kv_b_proj, latent).reshape([b, l, self.heads, self.qk_nope + self.v_head]).swap_dims(1, 2);
        let k_nope = kv.clone().narrow(3, 0, self.qk_nope);
        let v = kv.narrow(3, self.qk_nope, self.v_head);
        let rope_key = rope_key.reshape([b, 1, l, self.qk_rope]).expand([b, self.heads, l, self.qk_rope]);
        let q = Tensor::cat(vec![q_nope, q_rope], 3);
        let k = Tensor::cat(vec![k_nope, rope_key], 3);
        self.output(B::moe_causal_attention(q, k, v, self.softmax_scale))
    }

    /// Attention for new tokens `x` `[b, l, d]` that follow the `cache.len()` tokens already in
    /// `cache`, which gains their latents. Absorbed form: queries are mapped into the latent
    /// space through `kv_b_proj`'s key half, and the attended latent out through its value
    /// half, so per-head keys and values are never formed. The caller checks positions.
    pub fn forward_cached(&self, x: Tensor<B, 3>, cache: &mut LatentCache<B>) -> Tensor<B, 3> {
        let [b, l, _] = x.dims();
        let (start, dtype) = (cache.len(), x.dtype());
        let (q_nope, q_rope) = self.queries(x.clone(), start);
        let (latent, rope_key) = self.latent(x, start);
        let (latent, rope_key) = cache.append(latent, rope_key);
        let t = start + l;
        let (h, c) = (self.heads, self.kv_lora_rank);
        let w = self.kv_b_proj.weight.val().cast(dtype).reshape([c, h, self.qk_nope + self.v_head]);
        // [h, qk_nope, c] and [h, c, v_head]: per-head key and value maps of the latent.
        let w_key = w.clone().narrow(2, 0, self.qk_nope).permute([1, 2, 0]).unsqueeze::<4>();
        let w_value = w.narrow(2, self.qk_nope, self.v_head).swap_dims(0, 1).unsqueeze::<4>();
        let q_latent = q_nope.matmul(w_key.expand([b, h, self.qk_nope, c]));
        let latent = latent.unsqueeze_dim::<4>(1).expand([b, h, t, c]);
        let rope_key = rope_key.unsqueeze_dim::<4>(1).expand([b, h, t, self.qk_rope]);
        let scores = q_latent.matmul(latent.clone().swap_dims(2, 3)) + q_rope.matmul(rope_key.swap_dims(2, 3));
        let attended = self.attention_weights(scores, start).matmul(latent);
        self.output(attended.matmul(w_value.expand([b, h, c, self.v_head])))
    }
}
