//! One MoE layer, T = 4096, d = 512, h = 256: per-expert loop against sorted dispatch, forward
//! and forward + backward. Every iteration reads its result back to the host, so the clock
//! stops after the device has finished.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

use burn::backend::Autodiff;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use moe_benches::{Cpu, layer_and_input};
use std::time::Duration;

type Ad = Autodiff<Cpu>;

/// (E, K, shared): the E x K grid, then the shape of PyTorch's reference row.
const SHAPES: &[(usize, usize, usize)] = &[
    (8, 2, 0),
    (8, 6, 0),
    (8, 8, 0),
    (64, 2, 0),
    (64, 6, 0),
    (64, 8, 0),
    (256, 2, 0),
    (256, 6, 0),
    (256, 8, 0),
    (64, 6, 2),
];

fn name(e: usize, k: usize, s: usize) -> String {
    format!("E{e}_K{k}_S{s}")
}

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("moe_layer_fwd");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for &(e, k, s) in SHAPES {
        let (layer, x) = layer_and_input::<Cpu>(e, k, s);
        group.bench_function(BenchmarkId::new("sorted", name(e, k, s)), |b| {
            b.iter(|| layer.forward(x.clone()).expect("valid").0.into_data())
        });
        group.bench_function(BenchmarkId::new("loop", name(e, k, s)), |b| {
            b.iter(|| layer.forward_loop(x.clone()).expect("valid").into_data())
        });
    }
    group.finish();
}

fn forward_backward(c: &mut Criterion) {
    let mut group = c.benchmark_group("moe_layer_fwdbwd");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(6));
    for &(e, k, s) in SHAPES {
        let (layer, x) = layer_and_input::<Ad>(e, k, s);
        let x = x.require_grad();
        group.bench_function(BenchmarkId::new("sorted", name(e, k, s)), |b| {
            b.iter(|| {
                let y = layer.forward(x.clone()).expect("valid").0;
                let grads = y.powi_scalar(2).mean().backward();
                x.grad(&grads).expect("input gradient").into_data()
            })
        });
        // The oracle loop's backward writes a full-size gradient per expert (burn's `select`
        // and `narrow` backward): over 100 s an iteration at E = 256, so it stops at E = 64.
        if e > 64 {
            continue;
        }
        group.bench_function(BenchmarkId::new("loop", name(e, k, s)), |b| {
            b.iter(|| {
                let y = layer.forward_loop(x.clone()).expect("valid");
                let grads = y.powi_scalar(2).mean().backward();
                x.grad(&grads).expect("input gradient").into_data()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward, forward_backward);
criterion_main!(benches);
