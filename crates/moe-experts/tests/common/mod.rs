//! Helpers shared by the integration tests: host-side references.

#![allow(dead_code, unreachable_pub)]

use burn::tensor::{Tensor, backend::Backend};

pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

pub fn host_int<B: Backend, const D: usize>(t: Tensor<B, D, burn::tensor::Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}

/// Largest |a - b| / (1 + |b|).
pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f32::max)
}

/// Indices of the `k` largest values, best first, ties to the lower index.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// DeepSeek-V3 routing of one token written as plain loops: the reference for the tensor
/// router. Returns (ids best-first, weights).
pub fn reference_route(
    scores: &[f32],
    bias: &[f32],
    k: usize,
    groups: usize,
    kept_groups: usize,
    normalize: bool,
    scale: f32,
) -> (Vec<usize>, Vec<f32>) {
    let e = scores.len();
    let per = e / groups;
    let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    if groups > 1 {
        let group_score: Vec<f32> = (0..groups)
            .map(|g| top_k(&choice[g * per..(g + 1) * per], 2.min(per)).iter().map(|&i| choice[g * per + i]).sum())
            .collect();
        let keep = top_k(&group_score, kept_groups);
        for (i, c) in choice.iter_mut().enumerate() {
            if !keep.contains(&(i / per)) {
                *c = f32::NEG_INFINITY;
            }
        }
    }
    let ids = top_k(&choice, k);
    let mut w: Vec<f32> = ids.iter().map(|&i| scores[i]).collect();
    if normalize {
        let total: f32 = w.iter().sum::<f32>() + 1e-20;
        w.iter_mut().for_each(|x| *x /= total);
    }
    w.iter_mut().for_each(|x| *x *= scale);
    (ids, w)
}
