//! Properties of the layer over random configurations, against loop references.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Distribution, Tensor, TensorData, activation};
use common::{host, host_int, max_rel, reference_route};
use moe_experts::{CapacityConfig, DropPolicy, MoeLayer, MoeLayerConfig};
use moe_kernels::CapacityLimit;
use moe_kernels::ScoreFunction;
use moe_router::RouterConfig;
use proptest::prelude::*;

type B = NdArray;

#[derive(Debug, Clone)]
struct Case {
    groups: usize,
    per_group: usize,
    kept_groups: usize,
    top_k: usize,
    d: usize,
    h: usize,
    shared: usize,
    batch: usize,
    seq: usize,
    softmax: bool,
    normalize: bool,
    scale: f64,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        1usize..=4,
        1usize..=4,
        1usize..=8,
        1usize..=12,
        0usize..=2,
        1usize..=3,
        1usize..=9,
        any::<bool>(),
        any::<bool>(),
        0.5f64..3.0,
        any::<u64>(),
    )
        .prop_flat_map(|(groups, per_group, d, h, shared, batch, seq, softmax, normalize, scale, seed)| {
            (1..=groups).prop_flat_map(move |kept_groups| {
                (1..=kept_groups * per_group).prop_map(move |top_k| Case {
                    groups,
                    per_group,
                    kept_groups,
                    top_k,
                    d,
                    h,
                    shared,
                    batch,
                    seq,
                    softmax,
                    normalize,
                    scale,
                    seed,
                })
            })
        })
}

impl Case {
    fn experts(&self) -> usize {
        self.groups * self.per_group
    }

    fn config(&self) -> MoeLayerConfig {
        let router = RouterConfig::new(self.d, self.experts(), self.top_k)
            .with_num_groups(self.groups)
            .with_topk_groups(self.kept_groups)
            .with_group_score_topk(2.min(self.per_group))
            .with_score_function(if self.softmax { ScoreFunction::Softmax } else { ScoreFunction::Sigmoid })
            .with_normalize_weights(self.normalize)
            .with_route_scale(self.scale);
        MoeLayerConfig::new(router, self.h).with_num_shared(self.shared)
    }

    fn layer(&self) -> (MoeLayer<B>, Tensor<B, 3>) {
        let device = Default::default();
        <B as burn::tensor::backend::Backend>::seed(&device, self.seed);
        let mut layer = self.config().init::<B>(&device).unwrap();
        // A random bias, so selection and weights really differ.
        let bias = Tensor::<B, 1>::random([self.experts()], Distribution::Uniform(-0.3, 0.3), &device);
        layer.router.add_to_bias(bias);
        let x = Tensor::random([self.batch, self.seq, self.d], Distribution::Normal(0.0, 1.0), &device);
        (layer, x)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn sorted_dispatch_equals_the_loop_oracle(case in cases()) {
        let (layer, x) = case.layer();
        let (fast, aux) = layer.forward(x.clone()).unwrap();
        let slow = layer.forward_loop(x).unwrap();
        prop_assert_eq!(aux.dropped, 0);
        let err = max_rel(&host(fast), &host(slow));
        prop_assert!(err < 1e-5, "max rel error {}", err);
    }

    #[test]
    fn router_matches_the_loop_reference(case in cases()) {
        let (layer, x) = case.layer();
        let tokens = case.batch * case.seq;
        let flat = x.reshape([tokens, case.d]);
        let routing = layer.router.forward(flat.clone());
        // Unbiased affinities computed independently of the router's code path.
        let logits = flat.matmul(layer.router.weight.val().transpose());
        let scores = if case.softmax { activation::softmax(logits, 1) } else { activation::sigmoid(logits) };
        let scores = host(scores);
        let bias = host(layer.router.bias());
        let ids = host_int(routing.expert_ids.clone());
        let weights = host(routing.weights.clone());
        let e = case.experts();
        let k = case.top_k;
        let mut counts = vec![0i64; e];
        for t in 0..tokens {
            let (ref_ids, ref_w) = reference_route(
                &scores[t * e..(t + 1) * e], &bias, k, case.groups, case.kept_groups, case.normalize, case.scale as f32);
            let got: Vec<usize> = ids[t * k..(t + 1) * k].iter().map(|&i| i as usize).collect();
            prop_assert_eq!(&got, &ref_ids, "token {}", t);
            prop_assert!(max_rel(&weights[t * k..(t + 1) * k], &ref_w) < 1e-5);
            // Every chosen expert lies in one of at most topk_groups groups.
            let mut groups: Vec<usize> = got.iter().map(|&i| i / case.per_group).collect();
            groups.sort();
            groups.dedup();
            prop_assert!(groups.len() <= case.kept_groups);
            if case.normalize {
                let sum: f32 = ref_w.iter().sum();
                prop_assert!((sum - case.scale as f32).abs() < 1e-4 * case.scale as f32);
            }
            got.iter().for_each(|&i| counts[i] += 1);
        }
        prop_assert_eq!(host_int(routing.counts), counts);
    }

    #[test]
    fn bias_moves_selection_but_not_the_weight_formula(case in cases()) {
        prop_assume!(case.experts() > case.top_k);
        let (mut layer, x) = case.layer();
        let tokens = case.batch * case.seq;
        let flat = x.reshape([tokens, case.d]);
        let before = layer.router.forward(flat.clone());
        // Push the expert every token ranks last far up: it must now be chosen by all tokens,
        // with its weight still from its unbiased score.
        let e = case.experts();
        let mut delta = vec![0.0f32; e];
        delta[e - 1] = 1e3;
        layer.apply_bias_delta(&delta);
        let after = layer.router.forward(flat);
        let ids = host_int(after.expert_ids.clone());
        for t in 0..tokens {
            prop_assert!(ids[t * case.top_k..(t + 1) * case.top_k].contains(&((e - 1) as i64)));
        }
        let scores = host(after.scores.clone());
        prop_assert_eq!(host(before.scores), scores.clone());
        let weights = host(after.weights);
        for t in 0..tokens {
            let chosen: Vec<f32> = ids[t * case.top_k..(t + 1) * case.top_k].iter().map(|&i| scores[t * e + i as usize]).collect();
            let total: f32 = if case.normalize { chosen.iter().sum::<f32>() + 1e-20 } else { 1.0 };
            let expected: Vec<f32> = chosen.iter().map(|s| s / total * case.scale as f32).collect();
            prop_assert!(max_rel(&weights[t * case.top_k..(t + 1) * case.top_k], &expected) < 1e-5);
        }
    }

    #[test]
    fn capacity_drops_exactly_the_pairs_past_capacity(case in cases(), factor in 0.3f64..1.5) {
        let (layer, x) = case.layer();
        let tokens = case.batch * case.seq;
        let flat = x.reshape([tokens, case.d]);
        let routing = layer.router.forward(flat.clone());
        let (out, plan) = layer.experts.forward(
            flat.clone(), routing.expert_ids.clone(), routing.weights.clone(), CapacityLimit::Factor(factor), None).unwrap();
        // Host reference: expert e keeps its first `cap` pairs in token order.
        let (e, k) = (case.experts(), case.top_k);
        let cap = (factor * (tokens * k) as f64 / e as f64).ceil() as usize;
        let ids = host_int(routing.expert_ids.clone());
        let mut seen = vec![0usize; e];
        let keep: Vec<f32> = ids.iter().map(|&i| { seen[i as usize] += 1; if seen[i as usize] <= cap { 1.0 } else { 0.0 } }).collect();
        let dropped = keep.iter().filter(|&&m| m == 0.0).count();
        prop_assert_eq!(plan.dropped(), dropped);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(keep, [tokens, k]), &flat.device());
        let expected = layer.experts.forward_loop(flat, routing.expert_ids, routing.weights * mask);
        prop_assert!(max_rel(&host(out), &host(expected)) < 1e-5);
    }
}

fn layer_with(config: MoeLayerConfig, tokens: usize, seed: u64) -> (MoeLayer<B>, Tensor<B, 3>) {
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, seed);
    let d = config.router.d_model;
    let layer = config.init::<B>(&device).unwrap();
    (layer, Tensor::random([1, tokens, d], Distribution::Normal(0.0, 1.0), &device))
}

#[test]
fn all_tokens_to_one_expert_and_empty_experts() {
    let config = MoeLayerConfig::new(RouterConfig::new(6, 8, 1), 5);
    let (mut layer, x) = layer_with(config, 13, 3);
    let mut delta = vec![0.0; 8];
    delta[5] = 1e3;
    layer.apply_bias_delta(&delta);
    let (out, aux) = layer.forward(x.clone()).unwrap();
    assert_eq!(host_int(aux.counts), vec![0, 0, 0, 0, 0, 13, 0, 0]);
    assert!(max_rel(&host(out), &host(layer.forward_loop(x).unwrap())) < 1e-5);
}

#[test]
fn k_equal_to_e_uses_every_expert_once() {
    let config = MoeLayerConfig::new(RouterConfig::new(6, 5, 5), 4).with_num_shared(1);
    let (layer, x) = layer_with(config, 7, 4);
    let (out, aux) = layer.forward(x.clone()).unwrap();
    assert_eq!(host_int(aux.counts), vec![7; 5]);
    assert!(max_rel(&host(out), &host(layer.forward_loop(x).unwrap())) < 1e-5);
}

#[test]
fn non_finite_input_stays_in_its_token() {
    let config =
        MoeLayerConfig::new(RouterConfig::new(6, 8, 2).with_num_groups(4).with_topk_groups(2), 4).with_num_shared(1);
    let (layer, x) = layer_with(config, 5, 5);
    let clean = host(layer.forward(x.clone()).unwrap().0);
    let mut values = host(x.clone());
    values[2 * 6 + 1] = f32::NAN; // token 2
    values[4 * 6] = f32::INFINITY; // token 4
    let bad = Tensor::<B, 3>::from_data(TensorData::new(values, [1, 5, 6]), &x.device());
    let (out, aux) = layer.forward(bad).unwrap();
    let out = host(out);
    let ids = host_int(aux.expert_ids);
    assert!(ids.iter().all(|&i| (0..8).contains(&i)), "ids stay valid: {ids:?}");
    for t in 0..5 {
        let row = &out[t * 6..(t + 1) * 6];
        if t == 2 || t == 4 {
            assert!(row.iter().any(|v| !v.is_finite()), "token {t}: {row:?}");
        } else {
            assert!(max_rel(row, &clean[t * 6..(t + 1) * 6]) < 1e-6, "token {t} changed");
        }
    }
}

#[test]
fn probability_policy_drops_the_lowest_weights() {
    let config = MoeLayerConfig::new(RouterConfig::new(6, 2, 1), 4)
        .with_capacity(CapacityConfig::Factor { factor: 0.5, policy: DropPolicy::Probability });
    let (mut layer, x) = layer_with(config, 8, 6);
    layer.apply_bias_delta(&[1e3, 0.0]); // all 8 tokens to expert 0, capacity 2
    let (out, aux) = layer.forward(x.clone()).unwrap();
    assert_eq!(aux.dropped, 6);
    let weights = host(aux.weights.clone());
    let mut order: Vec<usize> = (0..8).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]));
    let out = host(out);
    for (rank, &t) in order.iter().enumerate() {
        let zero = out[t * 6..(t + 1) * 6].iter().all(|&v| v == 0.0);
        assert_eq!(zero, rank >= 2, "token {t} at weight rank {rank}");
    }
}

#[test]
fn wrong_input_width_is_a_typed_error() {
    let config = MoeLayerConfig::new(RouterConfig::new(6, 4, 2), 4);
    let (layer, _) = layer_with(config, 3, 7);
    let x = Tensor::<B, 3>::zeros([1, 3, 5], &Default::default());
    let err = layer.forward(x).unwrap_err();
    assert_eq!(err, moe_experts::MoeError::InputWidth { expected: 6, got: 5 });
    let bad = MoeLayerConfig::new(RouterConfig::new(6, 4, 2), 0);
    assert!(matches!(
        bad.init::<B>(&Default::default()),
        Err(moe_experts::MoeError::Setting { field: "expert_hidden", .. })
    ));
}

type AD = Autodiff<NdArray<f64>>;

/// Gradients of the layer (through the sorted dispatch) against central finite differences.
#[test]
fn gradients_match_finite_differences() {
    let device = Default::default();
    <AD as burn::tensor::backend::Backend>::seed(&device, 11);
    let config = MoeLayerConfig::new(RouterConfig::new(4, 6, 2).with_num_groups(3).with_topk_groups(2), 3)
        .with_num_shared(1)
        .with_seq_balance_alpha(0.1);
    let layer = config.init::<AD>(&device).unwrap();
    let x = Tensor::<AD, 3>::random([1, 5, 4], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let probe = Tensor::<AD, 3>::random([1, 5, 4], Distribution::Normal(0.0, 1.0), &device);
    let loss_of = |layer: &MoeLayer<AD>, x: Tensor<AD, 3>| -> (Tensor<AD, 1>, Vec<i64>) {
        let (y, aux) = layer.forward(x).unwrap();
        let ids = aux.expert_ids.clone().into_data().iter::<i64>().collect();
        ((y * probe.clone()).sum() + aux.loss().unwrap(), ids)
    };
    let (loss, ids0) = loss_of(&layer, x.clone());
    let grads = loss.backward();

    let check = |analytic: Vec<f64>, perturb: &dyn Fn(usize, f64) -> (f64, Vec<i64>), what: &str| {
        // The router path is f32 whatever the model dtype: a larger step for what passes
        // through it (its weight, and the input) keeps its rounding out of the difference
        // quotient. Finite differences only hold where the selection stays put, so a step
        // that flips it is shrunk, and a coordinate that still flips is skipped.
        let mut checked = 0;
        for i in [0, analytic.len() / 3, analytic.len() / 2, analytic.len() - 1] {
            let mut eps = if what == "router" || what == "x" { 2e-2 } else { 1e-3 };
            let (mut plus, mut ids_p) = perturb(i, eps);
            let (mut minus, mut ids_m) = perturb(i, -eps);
            while (ids_p != ids0 || ids_m != ids0) && eps > 1e-4 {
                eps /= 4.0;
                (plus, ids_p) = perturb(i, eps);
                (minus, ids_m) = perturb(i, -eps);
            }
            if ids_p != ids0 || ids_m != ids0 {
                continue;
            }
            let numeric = (plus - minus) / (2.0 * eps);
            // 5e-5 absolute: the f32 routing weights put rounding of that size into the loss.
            let tolerance = 5e-3 * numeric.abs() + 5e-5;
            assert!(
                (numeric - analytic[i]).abs() < tolerance,
                "{what}[{i}]: numeric {numeric} analytic {}",
                analytic[i]
            );
            checked += 1;
        }
        assert!(checked >= 3, "{what}: only {checked} coordinates away from a selection boundary");
    };
    let scalar = |t: Tensor<AD, 1>| t.into_data().iter::<f64>().next().unwrap();

    let gx: Vec<f64> = x.grad(&grads).unwrap().into_data().iter::<f64>().collect();
    let xs: Vec<f64> = x.clone().into_data().iter::<f64>().collect();
    check(
        gx,
        &|i, e| {
            let mut v = xs.clone();
            v[i] += e;
            let (l, ids) = loss_of(&layer, Tensor::from_data(TensorData::new(v, [1, 5, 4]), &device));
            (scalar(l), ids)
        },
        "x",
    );

    for (name, param) in [("gate", &layer.experts.gate), ("down", &layer.experts.down)] {
        let g: Vec<f64> = param.grad(&grads).unwrap().into_data().iter::<f64>().collect();
        let w: Vec<f64> = param.val().into_data().iter::<f64>().collect();
        let dims = param.dims();
        check(
            g,
            &|i, e| {
                let mut v = w.clone();
                v[i] += e;
                let mut l2 = layer.clone();
                let t = Tensor::<AD, 3>::from_data(TensorData::new(v, dims), &device);
                if name == "gate" {
                    l2.experts.gate = burn::module::Param::from_tensor(t)
                } else {
                    l2.experts.down = burn::module::Param::from_tensor(t)
                }
                let (l, ids) = loss_of(&l2, x.clone());
                (scalar(l), ids)
            },
            name,
        );
    }

    // The router weight gets its gradient through the routing weights and the balance loss.
    let g: Vec<f64> = layer.router.weight.grad(&grads).unwrap().into_data().iter::<f64>().collect();
    let w: Vec<f64> = layer.router.weight.val().into_data().iter::<f64>().collect();
    check(
        g,
        &|i, e| {
            let mut v = w.clone();
            v[i] += e;
            let mut l2 = layer.clone();
            l2.router.weight = burn::module::Param::from_tensor(Tensor::from_data(TensorData::new(v, [6, 4]), &device));
            let (l, ids) = loss_of(&l2, x.clone());
            (scalar(l), ids)
        },
        "router",
    );
    // The bias never gets a gradient.
    assert!(layer.router.bias.grad(&grads).is_none());
}
