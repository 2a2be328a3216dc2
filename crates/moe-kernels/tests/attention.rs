//! `Autodiff`'s own causal attention (`moe_causal_attention`, backward by
//! `causal_attention_grad`) against a host loop for the forward and against burn's autodiff of
//! the plain ops (scores, a mask built on the host, softmax, product) for the gradients: with
//! value width unlike the key width (MLA), the default and a custom scale, and only some
//! operands tracked.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Tensor, TensorData};
use moe_kernels::MoeBackend;

type B = Autodiff<NdArray<f64>>;

/// Deterministic values in [-1, 1) (splitmix64), independent of any backend's generator.
fn values(stream: u64, len: usize) -> Vec<f64> {
    let mut state = 0x5EED ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
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

fn host(t: Tensor<NdArray<f64>, 4>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-9 * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
    }
}

struct Shape {
    b: usize,
    h: usize,
    l: usize,
    e: usize,
    ev: usize,
}

/// `softmax(scale q k^T, keys up to the query) v` by loops, `[b, h, l, ev]`.
fn host_attention(s: &Shape, q: &[f64], k: &[f64], v: &[f64], scale: f64) -> Vec<f64> {
    let mut out = vec![0.0; s.b * s.h * s.l * s.ev];
    for bh in 0..s.b * s.h {
        for i in 0..s.l {
            let score = |j: usize| {
                scale * (0..s.e).map(|c| q[(bh * s.l + i) * s.e + c] * k[(bh * s.l + j) * s.e + c]).sum::<f64>()
            };
            let max = (0..=i).map(score).fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = (0..=i).map(|j| (score(j) - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for c in 0..s.ev {
                out[(bh * s.l + i) * s.ev + c] =
                    weights.iter().enumerate().map(|(j, w)| w / total * v[(bh * s.l + j) * s.ev + c]).sum::<f64>();
            }
        }
    }
    out
}

/// The same attention as plain tracked ops; the mask marks keys after the query.
fn ops_attention(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f64) -> Tensor<B, 4> {
    let [b, h, l, _] = q.dims();
    let future: Vec<bool> = (0..l * l).map(|n| n % l > n / l).collect();
    let future = Tensor::<B, 2, Bool>::from_data(TensorData::new(future, [l, l]), &q.device());
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    softmax(scores.mask_fill(future.reshape([1, 1, l, l]).expand([b, h, l, l]), f64::NEG_INFINITY), 3).matmul(v)
}

fn check(s: &Shape, scale: f64) {
    let device = Default::default();
    let (qk, vv) = ([s.b, s.h, s.l, s.e], [s.b, s.h, s.l, s.ev]);
    let [q, k] = [0, 1].map(|n| values(n, s.b * s.h * s.l * s.e).iter().map(|x| x * 2.0).collect::<Vec<_>>());
    let [v, r] = [2, 3].map(|n| values(n, s.b * s.h * s.l * s.ev));
    let want = host_attention(s, &q, &k, &v, scale);
    for tracked in [[true, true, true], [true, false, false], [false, true, false], [false, false, true]] {
        let run = |ours: bool| {
            let make = |x: &[f64], shape: [usize; 4], grad: bool| {
                let t = Tensor::<B, 4>::from_data(TensorData::new(x.to_vec(), shape), &device);
                if grad { t.require_grad() } else { t }
            };
            let (qt, kt, vt) = (make(&q, qk, tracked[0]), make(&k, qk, tracked[1]), make(&v, vv, tracked[2]));
            let out = if ours {
                B::moe_causal_attention(qt.clone(), kt.clone(), vt.clone(), scale)
            } else {
                ops_attention(qt.clone(), kt.clone(), vt.clone(), scale)
            };
            let grads = (out.clone() * make(&r, vv, false)).sum().backward();
            let grad = |t: &Tensor<B, 4>| t.grad(&grads).map(host);
            (host(out.inner()), [grad(&qt), grad(&kt), grad(&vt)])
        };
        let (ours, reference) = (run(true), run(false));
        assert_close(&format!("{tracked:?} forward"), &ours.0, &want);
        for (name, (got, want)) in ["q", "k", "v"].iter().zip(ours.1.into_iter().zip(reference.1)) {
            assert_eq!(got.is_some(), want.is_some(), "{tracked:?}: {name} tracked");
            if let (Some(got), Some(want)) = (got, want) {
                assert_close(&format!("{tracked:?} grad {name}"), &got, &want);
            }
        }
    }
}

#[test]
fn multi_head_shape_at_the_default_scale() {
    check(&Shape { b: 2, h: 3, l: 7, e: 4, ev: 4 }, 0.5);
}

#[test]
fn latent_shape_with_a_narrower_value_and_its_own_scale() {
    // MLA: keys of nope + rope width, values of v_head width, a YaRN-adjusted scale.
    check(&Shape { b: 1, h: 2, l: 6, e: 5, ev: 3 }, 0.37);
}

#[test]
fn one_token_attends_only_to_itself() {
    check(&Shape { b: 2, h: 1, l: 1, e: 3, ev: 2 }, 0.8);
}
