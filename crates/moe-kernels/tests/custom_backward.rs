//! `Autodiff`'s own backward of the grouped matmul, on both layouts, against host loops: the
//! gradients of the token rows and of the expert weights through `moe_grouped_matmul` and
//! `moe_grouped_swiglu`, with every operand tracked or only some; and of the dense product.

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use moe_kernels::{CapacityLimit, DispatchLayout, MoeBackend, portable};
use proptest::prelude::*;

/// Which operands require a gradient.
#[derive(Debug, Clone, Copy)]
enum Tracked {
    Both,
    RowsOnly,
    WeightsOnly,
}

impl Tracked {
    fn rows(self) -> bool {
        !matches!(self, Self::WeightsOnly)
    }

    fn weights(self) -> bool {
        !matches!(self, Self::RowsOnly)
    }
}

/// A routing of `t` tokens to `k` of `e` experts and the seed of its data; `width` is `a`
/// and `b` of the plain matmul, `d` and `h` of the SwiGLU.
#[derive(Debug, Clone)]
struct Case {
    t: usize,
    k: usize,
    e: usize,
    width: (usize, usize),
    ids: Vec<usize>,
    limit: CapacityLimit,
    seed: u64,
}

impl Case {
    /// Pairs kept under the limit: the first of each expert in token order.
    fn kept(&self) -> Vec<bool> {
        let cap = self.limit.rows_per_expert(self.t * self.k, self.e).unwrap_or(usize::MAX);
        let mut seen = vec![0; self.e];
        self.ids
            .iter()
            .map(|&i| {
                seen[i] += 1;
                seen[i] <= cap
            })
            .collect()
    }

    /// Deterministic values in [-1, 1) (splitmix64), independent of any backend's generator.
    fn values(&self, stream: u64, len: usize) -> Vec<f64> {
        let mut state = self.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (0..len)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect()
    }
}

/// The plain grouped matmul, `out[t] = sum_k w[t,k] x[t] m[e]`, and the gradients of
/// `sum(out * r)` with respect to `x` and `m`.
fn host_matmul(case: &Case, x: &[f64], m: &[f64], w: &[f64], r: &[f64]) -> [Vec<f64>; 3] {
    let (a, b) = case.width;
    let mut out = vec![0.0; case.t * b];
    let mut dx = vec![0.0; case.t * a];
    let mut dm = vec![0.0; case.e * a * b];
    for (p, kept) in case.kept().into_iter().enumerate() {
        if !kept {
            continue;
        }
        let (tok, e) = (p / case.k, case.ids[p]);
        for i in 0..a {
            for j in 0..b {
                let mij = m[(e * a + i) * b + j];
                out[tok * b + j] += w[p] * x[tok * a + i] * mij;
                dx[tok * a + i] += w[p] * mij * r[tok * b + j];
                dm[(e * a + i) * b + j] += w[p] * x[tok * a + i] * r[tok * b + j];
            }
        }
    }
    [out, dx, dm]
}

/// The SwiGLU experts, `out[t] = sum_k w[t,k] (silu(x gate_e) * (x up_e)) down_e`, and the
/// gradients of `sum(out * r)` with respect to `x`, `gate`, `up` and `down`.
fn host_swiglu(case: &Case, x: &[f64], [gate, up, down]: [&[f64]; 3], w: &[f64], r: &[f64]) -> [Vec<f64>; 5] {
    let (d, h) = case.width;
    let mut out = vec![0.0; case.t * d];
    let mut dx = vec![0.0; case.t * d];
    let (mut dgate, mut dup, mut ddown) =
        (vec![0.0; case.e * d * h], vec![0.0; case.e * d * h], vec![0.0; case.e * h * d]);
    for (p, kept) in case.kept().into_iter().enumerate() {
        if !kept {
            continue;
        }
        let (tok, e) = (p / case.k, case.ids[p]);
        let xt = &x[tok * d..(tok + 1) * d];
        let project = |m: &[f64], j: usize| (0..d).map(|i| xt[i] * m[(e * d + i) * h + j]).sum::<f64>();
        let g: Vec<f64> = (0..h).map(|j| project(gate, j)).collect();
        let u: Vec<f64> = (0..h).map(|j| project(up, j)).collect();
        let sig: Vec<f64> = g.iter().map(|g| 1.0 / (1.0 + (-g).exp())).collect();
        let s: Vec<f64> = (0..h).map(|j| g[j] * sig[j]).collect();
        let dy: Vec<f64> = (0..d).map(|o| w[p] * r[tok * d + o]).collect();
        for j in 0..h {
            let z = s[j] * u[j];
            let mut dz = 0.0;
            for o in 0..d {
                let down_jo = down[(e * h + j) * d + o];
                out[tok * d + o] += w[p] * z * down_jo;
                ddown[(e * h + j) * d + o] += z * dy[o];
                dz += down_jo * dy[o];
            }
            let du = dz * s[j];
            let dg = dz * u[j] * sig[j] * (1.0 + g[j] * (1.0 - sig[j]));
            for i in 0..d {
                let at = (e * d + i) * h + j;
                dgate[at] += xt[i] * dg;
                dup[at] += xt[i] * du;
                dx[tok * d + i] += gate[at] * dg + up[at] * du;
            }
        }
    }
    [out, dx, dgate, dup, ddown]
}

fn assert_close(what: &str, got: Vec<f32>, want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.into_iter().zip(want).enumerate() {
        assert!((f64::from(g) - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
    }
}

fn tensor<B: AutodiffBackend, const D: usize>(values: &[f64], shape: [usize; D], grad: bool) -> Tensor<B, D> {
    let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    let t = Tensor::from_data(TensorData::new(data, shape), &Default::default());
    if grad { t.require_grad() } else { t }
}

fn host<const D: usize, B: burn::tensor::backend::Backend>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// The operands' gradient, which must exist exactly when the operand is tracked.
fn grad_of<B: AutodiffBackend, const D: usize>(
    t: &Tensor<B, D>,
    grads: &B::Gradients,
    tracked: bool,
) -> Option<Vec<f32>> {
    let grad = t.grad(grads).map(host);
    assert_eq!(grad.is_some(), tracked);
    grad
}

/// Plans `case` in `layout`, gathers the tokens and returns the plan with the token rows.
fn dispatch<B: AutodiffBackend + MoeBackend>(
    case: &Case,
    layout: DispatchLayout,
    x: Tensor<B, 2>,
) -> (moe_kernels::DispatchPlan<B>, Tensor<B, 2>) {
    let ids: Vec<i64> = case.ids.iter().map(|&i| i as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [case.t, case.k]), &Default::default());
    let plan = portable::plan(ids, None, case.e, case.limit, layout).unwrap();
    assert_eq!(plan.layout(), layout);
    let rows = B::moe_permute(x, &plan);
    (plan, rows)
}

/// `combine(moe_grouped_matmul(permute(x), m), w)` and its gradients against the host loop.
fn check_matmul<B: AutodiffBackend + MoeBackend>(case: &Case, layout: DispatchLayout, tracked: Tracked) {
    let (a, b) = case.width;
    let (t, e) = (case.t, case.e);
    let [x, m, w, r] = [t * a, e * a * b, t * case.k, t * b]
        .into_iter()
        .enumerate()
        .map(|(s, n)| case.values(s as u64, n))
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let [out_ref, dx_ref, dm_ref] = host_matmul(case, &x, &m, &w, &r);

    let xt = tensor::<B, 2>(&x, [t, a], tracked.rows());
    let mt = tensor::<B, 3>(&m, [e, a, b], tracked.weights());
    let (plan, rows) = dispatch(case, layout, xt.clone());
    let y = B::moe_grouped_matmul(rows, mt.clone(), &plan);
    let out = B::moe_combine(y, tensor(&w, [t, case.k], false), &plan);
    assert_close(&format!("{layout:?} out"), host(out.clone()), &out_ref);

    let grads = (out * tensor::<B, 2>(&r, [t, b], false)).sum().backward();
    if let Some(dx) = grad_of(&xt, &grads, tracked.rows()) {
        assert_close(&format!("{layout:?} {tracked:?} dx"), dx, &dx_ref);
    }
    if let Some(dm) = grad_of(&mt, &grads, tracked.weights()) {
        assert_close(&format!("{layout:?} {tracked:?} dm"), dm, &dm_ref);
    }
}

/// `combine(moe_grouped_swiglu(permute(x), ...), w)` and its gradients against the host loop.
fn check_swiglu<B: AutodiffBackend + MoeBackend>(case: &Case, layout: DispatchLayout, tracked: Tracked) {
    let (d, h) = case.width;
    let (t, e) = (case.t, case.e);
    let sizes = [t * d, e * d * h, e * d * h, e * h * d, t * case.k, t * d];
    let [x, gate, up, down, w, r] =
        sizes.into_iter().enumerate().map(|(s, n)| case.values(s as u64, n)).collect::<Vec<_>>().try_into().unwrap();
    let [out_ref, dx_ref, dgate_ref, dup_ref, ddown_ref] = host_swiglu(case, &x, [&gate, &up, &down], &w, &r);

    let xt = tensor::<B, 2>(&x, [t, d], tracked.rows());
    let gt = tensor::<B, 3>(&gate, [e, d, h], tracked.weights());
    let ut = tensor::<B, 3>(&up, [e, d, h], tracked.weights());
    let dt = tensor::<B, 3>(&down, [e, h, d], tracked.weights());
    let (plan, rows) = dispatch(case, layout, xt.clone());
    let y = B::moe_grouped_swiglu(rows, gt.clone(), ut.clone(), dt.clone(), &plan);
    let out = B::moe_combine(y, tensor(&w, [t, case.k], false), &plan);
    assert_close(&format!("{layout:?} out"), host(out.clone()), &out_ref);

    let grads = (out * tensor::<B, 2>(&r, [t, d], false)).sum().backward();
    if let Some(dx) = grad_of(&xt, &grads, tracked.rows()) {
        assert_close(&format!("{layout:?} {tracked:?} dx"), dx, &dx_ref);
    }
    for (name, param, reference) in [("gate", &gt, &dgate_ref), ("up", &ut, &dup_ref), ("down", &dt, &ddown_ref)] {
        if let Some(g) = grad_of(param, &grads, tracked.weights()) {
            assert_close(&format!("{layout:?} {tracked:?} d{name}"), g, reference);
        }
    }
}

/// Both ops, both layouts, every tracking on one backend.
fn check_all<B: AutodiffBackend + MoeBackend>(case: &Case) {
    for layout in [DispatchLayout::Padded, DispatchLayout::Segments] {
        for tracked in [Tracked::Both, Tracked::RowsOnly, Tracked::WeightsOnly] {
            check_matmul::<B>(case, layout, tracked);
            check_swiglu::<B>(case, layout, tracked);
        }
    }
}

fn check_all_backends(case: &Case) {
    check_all::<Autodiff<NdArray>>(case);
    // Flex implements `MoeBackend` under this crate's `flex` feature only.
    #[cfg(feature = "flex")]
    check_all::<Autodiff<burn::backend::Flex>>(case);
}

/// `t` tokens whose slot `s` goes to `ids(t, s)`.
fn case(t: usize, k: usize, e: usize, ids: impl Fn(usize, usize) -> usize) -> Case {
    Case {
        t,
        k,
        e,
        width: (3, 5),
        ids: (0..t * k).map(|p| ids(p / k, p % k)).collect(),
        limit: CapacityLimit::Dropless,
        seed: 7,
    }
}

#[test]
fn empty_experts_and_odd_segments() {
    // Expert counts 3, 0, 5, 1, 0, 3 over 6 experts (12 pairs).
    let owners = [0, 2, 2, 5, 0, 2, 3, 2, 5, 0, 2, 5];
    check_all_backends(&case(6, 2, 6, |t, s| owners[t * 2 + s]));
}

#[test]
fn one_expert_takes_every_token() {
    check_all_backends(&case(7, 1, 4, |_, _| 2));
    // Expert 1 in every token's first slot, expert 2 in none.
    check_all_backends(&case(7, 2, 4, |t, s| if s == 0 { 1 } else { [0, 3][t % 2] }));
}

#[test]
fn dropped_pairs_get_no_gradient() {
    let mut dropping = case(8, 2, 3, |t, s| if s == 0 { 0 } else { 1 + t % 2 });
    dropping.limit = CapacityLimit::Factor(0.6);
    assert!(dropping.kept().contains(&false));
    check_all_backends(&dropping);
}

#[test]
fn balanced_checkpointing_recomputes_what_the_backward_reads() {
    let owners = [0, 2, 2, 5, 0, 2, 3, 2, 5, 0, 2, 5];
    check_all::<Autodiff<NdArray, BalancedCheckpointing>>(&case(6, 2, 6, |t, s| owners[t * 2 + s]));
}

#[test]
fn autodiff_plans_the_inner_backends_layout() {
    let ids =
        Tensor::<Autodiff<NdArray>, 2, Int>::from_data(TensorData::new(vec![0i64, 1], [1, 2]), &Default::default());
    let plan = Autodiff::<NdArray>::moe_plan(ids, None, 2, CapacityLimit::Dropless).unwrap();
    assert_eq!(plan.layout(), DispatchLayout::Segments);
}

#[test]
fn untracked_inputs_still_run_forward() {
    type B = Autodiff<NdArray>;
    let case = case(5, 2, 3, |t, s| (t + s) % 3);
    let [x, m, w] = [15, 45, 10]
        .into_iter()
        .enumerate()
        .map(|(s, n)| case.values(s as u64, n))
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let r = case.values(3, 25);
    let [out_ref, _, _] = host_matmul(&case, &x, &m, &w, &r);
    for layout in [DispatchLayout::Padded, DispatchLayout::Segments] {
        let (plan, rows) = dispatch::<B>(&case, layout, tensor(&x, [5, 3], false));
        let y = B::moe_grouped_matmul(rows, tensor(&m, [3, 3, 5], false), &plan);
        let out = B::moe_combine(y, tensor(&w, [5, 2], false), &plan);
        assert_close(&format!("{layout:?}"), host(out), &out_ref);
    }
}

/// `Autodiff`'s backward of the dense product (`x w`, the shared experts) against host loops:
/// `dx = r w^T`, `dw = x^T r` for the loss `sum(x w * r)`, with every tracking.
#[test]
fn dense_product_gradients_agree_with_the_host_loop() {
    type B = Autodiff<NdArray>;
    let (t, a, b) = (7, 5, 3);
    let case = case(t, 1, 1, |_, _| 0);
    let [x, w, r] = [t * a, a * b, t * b]
        .into_iter()
        .enumerate()
        .map(|(s, n)| case.values(s as u64, n))
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let (mut out_ref, mut dx_ref, mut dw_ref) = (vec![0.0; t * b], vec![0.0; t * a], vec![0.0; a * b]);
    for row in 0..t {
        for i in 0..a {
            for j in 0..b {
                out_ref[row * b + j] += x[row * a + i] * w[i * b + j];
                dx_ref[row * a + i] += r[row * b + j] * w[i * b + j];
                dw_ref[i * b + j] += x[row * a + i] * r[row * b + j];
            }
        }
    }
    for tracked in [Tracked::Both, Tracked::RowsOnly, Tracked::WeightsOnly] {
        let xt = tensor::<B, 2>(&x, [t, a], tracked.rows());
        let wt = tensor::<B, 2>(&w, [a, b], tracked.weights());
        let out = B::moe_dense_matmul(xt.clone(), wt.clone());
        assert_close(&format!("{tracked:?} out"), host(out.clone()), &out_ref);
        let grads = (out * tensor::<B, 2>(&r, [t, b], false)).sum().backward();
        if let Some(dx) = grad_of(&xt, &grads, tracked.rows()) {
            assert_close(&format!("{tracked:?} dx"), dx, &dx_ref);
        }
        if let Some(dw) = grad_of(&wt, &grads, tracked.weights()) {
            assert_close(&format!("{tracked:?} dw"), dw, &dw_ref);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn gradients_agree_with_the_host_loop(
        t in 1usize..10, k in 1usize..4, e in 1usize..7, a in 1usize..6, b in 1usize..6,
        factor in prop::option::of(0.3f64..2.0), seed in any::<u64>(), owners in prop::collection::vec(any::<usize>(), 27),
    ) {
        let case = Case {
            t, k, e,
            width: (a, b),
            ids: owners[..t * k].iter().map(|o| o % e).collect(),
            limit: factor.map_or(CapacityLimit::Dropless, CapacityLimit::Factor),
            seed,
        };
        check_all_backends(&case);
    }
}

/// `Autodiff`'s gate (the inner backend's gate, tracked as two outputs of the logits) against
/// central differences of the loss `sum(weights * gw) + sum(scores * gs)` computed on the host
/// in f64 with the selection held at the forward's ids (it is piecewise constant), for both
/// score functions, with and without normalisation.
#[test]
fn gate_gradients_match_finite_differences() {
    use moe_kernels::{GateRule, ScoreFunction, Selection};
    type Inner = NdArray<f64>;
    type B = Autodiff<Inner>;
    let case = case(6, 2, 8, |_, _| 0);
    let (tokens, experts, top_k) = (6, 8, 2);
    let logits = case.values(0, tokens * experts).iter().map(|v| v * 3.0).collect::<Vec<_>>();
    let bias = case.values(1, experts).iter().map(|v| v * 0.1).collect::<Vec<_>>();
    let gw = case.values(2, tokens * top_k);
    let gs = case.values(3, tokens * experts);
    let device = Default::default();
    let inner =
        |v: &[f64], shape: [usize; 2]| Tensor::<Inner, 2>::from_data(TensorData::new(v.to_vec(), shape), &device);
    for score_function in [ScoreFunction::Sigmoid, ScoreFunction::Softmax] {
        for normalize_weights in [true, false] {
            let rule = GateRule {
                score_function,
                selection: Selection { top_k, num_groups: 2, topk_groups: 1, group_score_topk: 2 },
                normalize_weights,
                route_scale: 2.5,
            };
            let tracked = Tensor::<B, 2>::from_inner(inner(&logits, [tokens, experts])).require_grad();
            let bias = Tensor::<B, 1>::from_data(TensorData::new(bias.clone(), [experts]), &device);
            let gated = B::moe_gate(tracked.clone(), bias, &rule);
            let ids = gated.expert_ids.clone().into_data().iter::<i64>().map(|i| i as usize).collect::<Vec<_>>();
            let loss = (gated.weights * Tensor::from_inner(inner(&gw, [tokens, top_k]))).sum()
                + (gated.scores * Tensor::from_inner(inner(&gs, [tokens, experts]))).sum();
            let analytic = tracked.grad(&loss.backward()).unwrap().into_data().iter::<f64>().collect::<Vec<_>>();

            // The loss on the host, the chosen ids fixed.
            let host_loss = |l: &[f64]| -> f64 {
                (0..tokens)
                    .map(|t| {
                        let row = &l[t * experts..(t + 1) * experts];
                        let scores: Vec<f64> = match score_function {
                            ScoreFunction::Sigmoid => row.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect(),
                            ScoreFunction::Softmax => {
                                let total: f64 = row.iter().map(|x| x.exp()).sum();
                                row.iter().map(|x| x.exp() / total).collect()
                            }
                        };
                        let chosen: Vec<f64> = ids[t * top_k..(t + 1) * top_k].iter().map(|&e| scores[e]).collect();
                        let total = if normalize_weights { chosen.iter().sum::<f64>() + 1e-20 } else { 1.0 };
                        let weights: f64 =
                            chosen.iter().zip(&gw[t * top_k..]).map(|(s, g)| rule.route_scale * s / total * g).sum();
                        weights + scores.iter().zip(&gs[t * experts..]).map(|(s, g)| s * g).sum::<f64>()
                    })
                    .sum()
            };
            let step = 1e-6;
            for (i, &a) in analytic.iter().enumerate() {
                let mut l = logits.clone();
                l[i] += step;
                let up = host_loss(&l);
                l[i] -= 2.0 * step;
                let numeric = (up - host_loss(&l)) / (2.0 * step);
                // burn computes the sigmoid and the softmax in f32 whatever the float type.
                assert!(
                    (numeric - a).abs() <= 1e-5 * (1.0 + numeric.abs()),
                    "{score_function:?}, normalise {normalize_weights}, logit {i}: numeric {numeric}, analytic {a}"
                );
            }
        }
    }
}

/// `Autodiff`'s SwiGLU activation (`moe_silu_mul`, one tracked operation) against burn's
/// autodiff of `silu(g) * u` (the chain rule through its ops), tracking both operands or one.
#[test]
fn silu_mul_gradients_match_autodiff_of_the_ops() {
    use burn::tensor::activation::silu;
    type B = Autodiff<NdArray<f64>>;
    let (n, h) = (9, 7);
    let case = case(n, 1, 1, |_, _| 0);
    let [g, u, r] = [0, 1, 2].map(|s| case.values(s, n * h).iter().map(|v| v * 4.0).collect::<Vec<_>>());
    let device = Default::default();
    let values = |t: Tensor<NdArray<f64>, 2>| t.into_data().iter::<f64>().collect::<Vec<_>>();
    for tracked in [(true, true), (true, false), (false, true)] {
        let run = |ours: bool| {
            let make = |v: &[f64], grad: bool| {
                let t = Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), [n, h]), &device);
                if grad { t.require_grad() } else { t }
            };
            let (gt, ut) = (make(&g, tracked.0), make(&u, tracked.1));
            let out = if ours { B::moe_silu_mul(gt.clone(), ut.clone()) } else { silu(gt.clone()) * ut.clone() };
            let grads = (out.clone() * make(&r, false)).sum().backward();
            (values(out.inner()), gt.grad(&grads).map(values), ut.grad(&grads).map(values))
        };
        let (ours, reference) = (run(true), run(false));
        assert_close(&format!("{tracked:?} out"), ours.0.iter().map(|&v| v as f32).collect(), &reference.0);
        for (name, got, want) in [("gate", ours.1, reference.1), ("up", ours.2, reference.2)] {
            assert_eq!(got.is_some(), want.is_some(), "{tracked:?}: {name} tracked");
            if let (Some(got), Some(want)) = (got, want) {
                assert_close(&format!("{tracked:?} {name}"), got.iter().map(|&v| v as f32).collect(), &want);
            }
        }
    }
}

/// `Autodiff`'s RMSNorm (`moe_rms_norm`, one tracked operation) against burn's `RmsNorm`
/// module and burn's autodiff of it, tracking the input and the scale, or one of them.
#[test]
fn rms_norm_matches_burns_module_and_its_autodiff() {
    use burn::module::Param;
    use burn::nn::RmsNormConfig;
    type B = Autodiff<NdArray<f64>>;
    let (n, d) = (6, 10);
    let case = case(n, 1, 1, |_, _| 0);
    let [x, r] = [0, 2].map(|s| case.values(s, n * d));
    let gamma: Vec<f64> = case.values(1, d).iter().map(|v| 1.0 + v).collect();
    let device = Default::default();
    let values = |t: Tensor<NdArray<f64>, 2>| t.into_data().iter::<f64>().collect::<Vec<_>>();
    for tracked in [(true, true), (true, false), (false, true)] {
        let run = |ours: bool| {
            let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [n, d]), &device);
            let xt = if tracked.0 { xt.require_grad() } else { xt };
            let mut norm = RmsNormConfig::new(d).with_epsilon(1e-3).init::<B>(&device);
            let gt = Tensor::<B, 1>::from_data(TensorData::new(gamma.clone(), [d]), &device);
            norm.gamma = Param::from_tensor(gt).set_require_grad(tracked.1);
            let out = if ours {
                B::moe_rms_norm(xt.clone(), norm.gamma.val(), norm.epsilon)
            } else {
                norm.forward(xt.clone())
            };
            let rt = Tensor::<B, 2>::from_data(TensorData::new(r.clone(), [n, d]), &device);
            let grads = (out.clone() * rt).sum().backward();
            let gamma_grad = norm.gamma.grad(&grads).map(|g| g.into_data().iter::<f64>().collect::<Vec<_>>());
            (values(out.inner()), xt.grad(&grads).map(values), gamma_grad)
        };
        let (ours, reference) = (run(true), run(false));
        assert_close(&format!("{tracked:?} out"), ours.0.iter().map(|&v| v as f32).collect(), &reference.0);
        for (name, got, want) in [("x", ours.1, reference.1), ("gamma", ours.2, reference.2)] {
            assert_eq!(got.is_some(), want.is_some(), "{tracked:?}: {name} tracked");
            if let (Some(got), Some(want)) = (got, want) {
                assert!(want.iter().any(|v| v.abs() > 1e-3), "{name}: an all-zero reference");
                assert_close(&format!("{tracked:?} {name}"), got.iter().map(|&v| v as f32).collect(), &want);
            }
        }
    }
}

/// `Autodiff`'s rotary embedding (`moe_rotary`, one tracked operation whose backward is the
/// inverse rotation) against burn's autodiff of the ops in `rotary::rotary`, for both pair
/// layouts, on a transposed view (as the model's `[b, l, h, r] -> [b, h, l, r]` heads).
#[test]
fn rotary_matches_autodiff_of_the_ops() {
    type B = Autodiff<NdArray<f64>>;
    let (b, l, h, r) = (2, 5, 3, 8);
    let case = case(b * l, 1, 1, |_, _| 0);
    let [x, g, angles] = [0, 1, 2].map(|s| case.values(s, b * l * h * r));
    let device = Default::default();
    let angles: Vec<f64> = angles[..l * r / 2].iter().map(|a| a * 3.0).collect();
    let cos = Tensor::<B, 2>::from_data(TensorData::new(angles.iter().map(|a| a.cos()).collect(), [l, r / 2]), &device);
    let sin = Tensor::<B, 2>::from_data(TensorData::new(angles.iter().map(|a| a.sin()).collect(), [l, r / 2]), &device);
    let values = |t: Tensor<NdArray<f64>, 4>| t.into_data().iter::<f64>().collect::<Vec<_>>();
    for interleave in [true, false] {
        let run = |ours: bool| {
            let xt = Tensor::<B, 4>::from_data(TensorData::new(x.clone(), [b, l, h, r]), &device).require_grad();
            let heads = xt.clone().swap_dims(1, 2);
            let out = if ours {
                B::moe_rotary(heads, cos.clone(), sin.clone(), interleave)
            } else {
                moe_kernels::rotary::rotary(heads, cos.clone(), sin.clone(), interleave)
            };
            let gt = Tensor::<B, 4>::from_data(TensorData::new(g.clone(), [b, h, l, r]), &device);
            let grads = (out.clone() * gt).sum().backward();
            (values(out.inner()), values(xt.grad(&grads).expect("tracked")))
        };
        let (ours, reference) = (run(true), run(false));
        assert_close(
            &format!("interleave {interleave}: out"),
            ours.0.iter().map(|&v| v as f32).collect(),
            &reference.0,
        );
        assert_close(
            &format!("interleave {interleave}: grad"),
            ours.1.iter().map(|&v| v as f32).collect(),
            &reference.1,
        );
    }
}
