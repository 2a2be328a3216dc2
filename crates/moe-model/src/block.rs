use burn::module::Module;
use burn::nn::RmsNorm;
use burn::tensor::{Tensor, backend::Backend};
use moe_experts::{MoeAux, MoeBackend, MoeError, MoeLayer, SwiGlu};

use crate::cache::LayerCache;
use crate::precision::rms_norm;
use crate::{Attention, ModelError};

/// A block's feed-forward: dense in the first `first_k_dense_replace` blocks, MoE after.
// One per block, so the size gap costs nothing; burn has no `Module` for `Box` to shrink it.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FeedForward<B: Backend> {
    /// A dense SwiGLU of width `intermediate_size`.
    Dense(SwiGlu<B>),
    /// An MoE layer.
    Moe(MoeLayer<B>),
}

/// Pre-norm decoder block: `x + attn(norm(x))`, then `h + ffn(norm(h))`, in `x`'s dtype.
#[derive(Module, Debug)]
pub struct DecoderBlock<B: Backend> {
    /// Norm before attention.
    pub attention_norm: RmsNorm<B>,
    /// Attention.
    pub attention: Attention<B>,
    /// Norm before the feed-forward.
    pub ffn_norm: RmsNorm<B>,
    /// Feed-forward.
    pub ffn: FeedForward<B>,
}

impl<B: MoeBackend> DecoderBlock<B> {
    /// `x` `[batch, seq, d]` -> the block's output and, for an MoE block, its aux record.
    pub fn forward(&self, x: Tensor<B, 3>) -> Result<(Tensor<B, 3>, Option<MoeAux<B>>), MoeError> {
        self.forward_with(x, &mut run_layer::<B, MoeError>)
    }

    /// [`DecoderBlock::forward`] with the MoE layer run by `moe` (its result must be what
    /// `MoeLayer::forward` gives, e.g. the same layer sharded over ranks).
    pub fn forward_with<E: From<MoeError>>(
        &self,
        x: Tensor<B, 3>,
        moe: &mut impl FnMut(&MoeLayer<B>, Tensor<B, 3>) -> Result<(Tensor<B, 3>, MoeAux<B>), E>,
    ) -> Result<(Tensor<B, 3>, Option<MoeAux<B>>), E> {
        let h = x.clone() + self.attention.forward(rms_norm(&self.attention_norm, x));
        self.feed_forward(h, moe)
    }

    /// The block over new tokens `x` after those in `cache` (which gains them).
    pub fn forward_cached(&self, x: Tensor<B, 3>, cache: &mut LayerCache<B>) -> Result<Tensor<B, 3>, ModelError> {
        let attended = self
            .attention
            .forward_cached(rms_norm(&self.attention_norm, x.clone()), cache)
            .ok_or(ModelError::CacheKind)?;
        Ok(self.feed_forward(x + attended, &mut run_layer::<B, ModelError>)?.0)
    }

    /// `h + ffn(norm(h))`.
    fn feed_forward<E: From<MoeError>>(
        &self,
        h: Tensor<B, 3>,
        moe: &mut impl FnMut(&MoeLayer<B>, Tensor<B, 3>) -> Result<(Tensor<B, 3>, MoeAux<B>), E>,
    ) -> Result<(Tensor<B, 3>, Option<MoeAux<B>>), E> {
        let normed = rms_norm(&self.ffn_norm, h.clone());
        Ok(match &self.ffn {
            FeedForward::Dense(mlp) => {
                let [b, l, d] = normed.dims();
                (h + mlp.forward_moe(normed.reshape([b * l, d])).reshape([b, l, d]), None)
            }
            FeedForward::Moe(layer) => {
                let (y, aux) = moe(layer, normed)?;
                (h + y, Some(aux))
            }
        })
    }
}

/// The MoE layer run in place: what `forward_with` does by default.
pub(crate) fn run_layer<B: MoeBackend, E: From<MoeError>>(
    layer: &MoeLayer<B>,
    x: Tensor<B, 3>,
) -> Result<(Tensor<B, 3>, MoeAux<B>), E> {
    Ok(layer.forward(x)?)
}
