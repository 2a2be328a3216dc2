//! The runner's AdamW against burn's `AdamW` (the reference): the same parameters after
//! several steps, with and without per-tensor norm clipping, and burn's optimizer state, saved
//! as a checkpoint saves it, continues in the runner's.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::{Tensor, TensorData, Tolerance};
use moe_runner::adamw::FusedAdamW;

type B = Autodiff<NdArray>;

const BETAS: (f32, f32) = (0.9, 0.95);
const WEIGHT_DECAY: f32 = 0.1;
const LR: f64 = 3e-3;

fn reference(clip: Option<f32>) -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(BETAS.0)
        .with_beta_2(BETAS.1)
        .with_weight_decay(WEIGHT_DECAY)
        .with_grad_clipping(clip.map(GradientClippingConfig::Norm))
}

fn fused(clip: Option<f32>) -> OptimizerAdaptor<FusedAdamW, Linear<B>, B> {
    OptimizerAdaptor::from(FusedAdamW {
        beta_1: BETAS.0,
        beta_2: BETAS.1,
        epsilon: 1e-5,
        weight_decay: WEIGHT_DECAY,
        clip_norm: clip,
    })
}

/// A 6 -> 5 layer with fixed weights, and a fixed batch whose loss has gradients of norm
/// well above 1 (so a clip at 0.5 acts on every step).
fn start() -> (Linear<B>, Tensor<B, 2>) {
    let device = Default::default();
    let linear = LinearConfig::new(6, 5).init::<B>(&device);
    let weight: Vec<f32> = (0..30).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
    let linear = linear.load_record(burn::nn::LinearRecord {
        weight: burn::module::Param::from_data(TensorData::new(weight, [6, 5]), &device),
        bias: Some(burn::module::Param::from_data(TensorData::new(vec![0.1f32, -0.2, 0.3, 0.0, 0.05], [5]), &device)),
    });
    let x: Vec<f32> = (0..24).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.5).collect();
    (linear, Tensor::from_data(TensorData::new(x, [4, 6]), &device))
}

fn steps<O: Optimizer<Linear<B>, B>>(mut linear: Linear<B>, x: &Tensor<B, 2>, optim: &mut O, n: usize) -> Linear<B> {
    for _ in 0..n {
        let loss = linear.forward(x.clone()).mul_scalar(3.0).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &linear);
        linear = optim.step(LR, linear, grads);
    }
    linear
}

fn assert_same(ours: &Linear<B>, burn: &Linear<B>) {
    let tolerance = Tolerance::<f32>::rel_abs(1e-5, 1e-6);
    ours.weight.val().into_data().assert_approx_eq::<f32>(&burn.weight.val().into_data(), tolerance);
    let bias = |l: &Linear<B>| l.bias.as_ref().unwrap().val().into_data();
    bias(ours).assert_approx_eq::<f32>(&bias(burn), tolerance);
}

#[test]
fn matches_burns_adamw_with_and_without_clipping() {
    for clip in [None, Some(0.5)] {
        let (linear, x) = start();
        let burn = steps(linear.clone(), &x, &mut reference(clip).init(), 6);
        let ours = steps(linear.clone(), &x, &mut fused(clip), 6);
        assert_same(&ours, &burn);
        // The clip changes the trajectory, so the comparison above saw it act.
        if clip.is_some() {
            let unclipped = steps(linear, &x, &mut reference(None).init(), 6);
            let moved = (unclipped.weight.val() - burn.weight.val()).abs().max().into_scalar();
            assert!(moved > 1e-4, "the clip did not act (max difference {moved})");
        }
    }
}

#[test]
fn continues_from_burns_saved_state() {
    let (linear, x) = start();
    let mut burn_optim = reference(Some(0.5)).init();
    let halfway = steps(linear.clone(), &x, &mut burn_optim, 3);
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = recorder.record(burn_optim.to_record(), ()).unwrap();
    let burn = steps(halfway.clone(), &x, &mut burn_optim, 3);

    let record = recorder.load(bytes, &Default::default()).unwrap();
    let mut ours = fused(Some(0.5)).load_record(record);
    let ours = steps(halfway, &x, &mut ours, 3);
    assert_same(&ours, &burn);
}
