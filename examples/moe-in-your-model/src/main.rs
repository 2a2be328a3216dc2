//! A DeepSeek-V3 MoE layer inside your own burn model, trained with AdamW, the balance loss
//! and the loss-free bias update.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use moe_balance::{BiasBalancer, BiasUpdateConfig, LoadTracker, metrics::max_violation};
use moe_experts::{MoeAux, MoeBackend, MoeLayer, MoeLayerConfig};
use moe_router::RouterConfig;

#[derive(Module, Debug)]
struct TinyMoeLm<B: Backend> {
    embed: Embedding<B>,
    moe: MoeLayer<B>,
    head: Linear<B>,
}

impl<B: MoeBackend> TinyMoeLm<B> {
    fn forward(&self, tokens: Tensor<B, 2, Int>) -> (Tensor<B, 3>, MoeAux<B>) {
        let h = self.embed.forward(tokens);
        let (y, aux) = self.moe.forward(h.clone()).expect("shapes fixed at init");
        (self.head.forward(h + y), aux)
    }
}

fn main() {
    type B = Autodiff<NdArray>;
    let device = Default::default();
    let (vocab, d, seq, batch) = (32, 64, 16, 16);
    let moe = MoeLayerConfig::new(RouterConfig::new(d, 8, 2), 32).with_num_shared(1);
    let mut model = TinyMoeLm::<B> {
        embed: EmbeddingConfig::new(vocab, d).init(&device),
        moe: moe.init(&device).expect("valid config"),
        head: LinearConfig::new(d, vocab).init(&device),
    };
    let mut optim = AdamWConfig::new().init();
    let balancer = BiasBalancer::new(BiasUpdateConfig::new());
    let mut tracker = LoadTracker::<B>::new(1, 8);
    for step in 1..=60 {
        let tokens = Tensor::<B, 2>::random([batch, seq], Distribution::Uniform(0.0, vocab as f64), &device).int();
        // Target: a fixed permutation of the token, (7 t + 3) mod vocab.
        let targets = tokens.clone().mul_scalar(7).add_scalar(3).remainder_scalar(vocab as i64);
        let (logits, aux) = model.forward(tokens);
        tracker.record(0, aux.counts.clone());
        let task = CrossEntropyLossConfig::new()
            .init(&device)
            .forward(logits.reshape([batch * seq, vocab]), targets.reshape([batch * seq]));
        let loss = task.clone() + aux.loss().expect("the sequence-wise loss is on by default");
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
        // After the optimizer step: the loss-free bias update from this step's load.
        let load = tracker.take().remove(0);
        model.moe.apply_bias_delta(&balancer.bias_delta(&load));
        if step % 10 == 0 {
            println!("step {step:3}  loss {:.3}  MaxVio {:.2}", task.into_scalar(), max_violation(&load));
        }
    }
}
