//! The router alone (affinity, grouped top-K, weights, counts), T = 4096, d = 512.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

use burn::tensor::{Distribution, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use moe_benches::{Cpu, D_MODEL, TOKENS};
use moe_router::RouterConfig;
use std::time::Duration;

fn router(c: &mut Criterion) {
    let mut group = c.benchmark_group("router_fwd");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    let device = Default::default();
    // (E, K, groups, kept groups)
    for &(e, k, g, kg) in &[(8, 2, 1, 1), (64, 6, 1, 1), (256, 8, 1, 1), (256, 8, 8, 4)] {
        let router = RouterConfig::new(D_MODEL, e, k)
            .with_num_groups(g)
            .with_topk_groups(kg)
            .init::<Cpu>(&device)
            .expect("valid");
        let x = Tensor::<Cpu, 2>::random([TOKENS, D_MODEL], Distribution::Normal(0.0, 1.0), &device);
        group.bench_function(BenchmarkId::from_parameter(format!("E{e}_K{k}_G{g}_{kg}")), |b| {
            b.iter(|| router.forward(x.clone()).expert_ids.into_data())
        });
    }
    group.finish();
}

criterion_group!(benches, router);
criterion_main!(benches);
