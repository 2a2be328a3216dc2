//! The CubeCL grouped GEMM against a float64 host loop, on whichever cube backends are
//! compiled in: wgpu (lavapipe in CI, the scalar tile product) and CUDA (the H200: both the
//! tensor-core and the scalar tile product).
//!
//! Each case is a list of segment sizes: empty experts, one expert taking every row, and
//! sizes and widths that are not tile multiples. Inputs are fresh random numbers each run
//! (the seed is printed); the measure is `||out - ref|| / ||ref||`, and NaN never passes.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use burn::backend::Autodiff;
use burn::tensor::Int;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime};
use moe_kernels::cube::{MoeCubeKernels, launch_rows, launch_weight_grad, use_tensor_cores};
use moe_kernels::{AdamWStep, MoeBackend};

/// (name, rows per expert, a, b). On the tensor-core path, cases whose widths are multiples of
/// 8 take the pipelined kernel (the first one with a depth shorter than one step and an output
/// width that is not a multiple of 16), the third and fourth the general one.
const CASES: &[(&str, &[usize], usize, usize)] = &[
    ("segments that are not tile multiples", &[3, 0, 70, 129, 1], 40, 72),
    ("one expert takes every row", &[0, 0, 200, 0], 96, 64),
    ("a single row", &[0, 1, 0], 33, 17),
    ("wide, deep and ragged", &[65, 1, 0, 64, 127], 160, 130),
    // Full and partial 128-row tiles, whole-fragment stores.
    ("aligned, full and partial tiles", &[130, 0, 64, 200, 17], 128, 96),
    // Several pipeline steps deep, several 128-wide tiles across.
    ("aligned, 128-wide tiles", &[300, 0, 128, 17, 260], 256, 256),
];

type Backend<R> = CubeBackend<R, f32, i32, u32>;

struct Lcg(u64);

impl Lcg {
    fn normal_ish(&mut self) -> f32 {
        // Sum of four uniforms, centred: enough spread for relative-error checks.
        (0..4)
            .map(|_| {
                self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .sum()
    }

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal_ish()).collect()
    }
}

/// A device tensor of `dtype` and the host values it actually holds (rounded to `dtype`).
fn upload<R: CubeRuntime, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    dtype: DType,
    device: &R::Device,
) -> (CubeTensor<R>, Vec<f64>) {
    let t = Tensor::<Backend<R>, D>::from_data(TensorData::new(values, shape), device).cast(dtype);
    let held = t.clone().cast(DType::F32).into_data().to_vec::<f32>().unwrap();
    (t.into_primitive().tensor(), held.into_iter().map(f64::from).collect())
}

fn download<R: CubeRuntime, const D: usize>(t: CubeTensor<R>) -> Vec<f64> {
    let t = Tensor::<Backend<R>, D>::from_primitive(TensorPrimitive::Float(t));
    t.cast(DType::F32).into_data().to_vec::<f32>().unwrap().into_iter().map(f64::from).collect()
}

fn relative_error(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let diff: f64 = out.iter().zip(reference).map(|(o, r)| (o - r) * (o - r)).sum();
    let norm: f64 = reference.iter().map(|r| r * r).sum();
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

fn check(label: &str, out: &[f64], reference: &[f64], tolerance: f64) {
    let err = relative_error(out, reference);
    println!("{label}: relative error {err:.2e} (tolerance {tolerance:.0e})");
    // Written so that NaN fails.
    assert!(err <= tolerance, "{label}: relative error {err:e} over {tolerance:e}");
}

/// The float64 references of the three grouped products over `segments` (rows per expert):
/// `y = x w_e`, `dx = g w_e^T` and `dw_e = x_e^T g_e`, with `x` `[rows, a]`, `w` `[E, a, b]`
/// and `g` `[rows, b]`.
fn host_products(segments: &[usize], (a, b): (usize, usize), x: &[f64], w: &[f64], g: &[f64]) -> [Vec<f64>; 3] {
    let rows: usize = segments.iter().sum();
    let (mut y, mut dx, mut dw) = (vec![0.0; rows * b], vec![0.0; rows * a], vec![0.0; segments.len() * a * b]);
    let mut first = 0;
    for (e, &n) in segments.iter().enumerate() {
        for r in first..first + n {
            for i in 0..a {
                for j in 0..b {
                    let wv = w[(e * a + i) * b + j];
                    y[r * b + j] += x[r * a + i] * wv;
                    dx[r * a + i] += g[r * b + j] * wv;
                    dw[(e * a + i) * b + j] += x[r * a + i] * g[r * b + j];
                }
            }
        }
        first += n;
    }
    [y, dx, dw]
}

/// Runs every case on `device` in `dtype`, with the tensor-core path when `tensor_cores`.
fn run_cases<R: CubeRuntime>(device: &R::Device, dtype: DType, tensor_cores: bool, tolerance: f64) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = Lcg(seed);
    for &(name, segments, a, b) in CASES {
        let label = format!("{name} ({dtype:?}, tensor cores {tensor_cores})");
        let experts = segments.len();
        let rows: usize = segments.iter().sum();
        let (x, xh) = upload::<R, 2>(rng.values(rows * a), [rows, a], dtype, device);
        let (w, wh) = upload::<R, 3>(rng.values(experts * a * b), [experts, a, b], dtype, device);
        let (g, gh) = upload::<R, 2>(rng.values(rows * b), [rows, b], dtype, device);
        let path = |_: &CubeTensor<R>| tensor_cores;

        let [y, dx, dw] = host_products(segments, (a, b), &xh, &wh, &gh);

        let out = download::<R, 2>(launch_rows(x.clone(), w.clone(), segments, path));
        check(&format!("{label} rows x weights"), &out, &y, tolerance);
        let wt = Tensor::<Backend<R>, 3>::from_primitive(TensorPrimitive::Float(w)).swap_dims(1, 2);
        let out = download::<R, 2>(launch_rows(g.clone(), wt.into_primitive().tensor(), segments, path));
        check(&format!("{label} row gradient (transposed view)"), &out, &dx, tolerance);
        let out = download::<R, 3>(launch_weight_grad(x, g, segments, path));
        check(&format!("{label} weight gradient"), &out, &dw, tolerance);
    }
}

/// Both tile products in every dtype the device has; the tensor-core one only where
/// [`use_tensor_cores`] says the device runs it.
fn run_all<R: CubeRuntime>(device: &R::Device, dtypes: &[(DType, f64)]) {
    for &(dtype, tolerance) in dtypes {
        run_cases::<R>(device, dtype, false, tolerance);
        let probe = Tensor::<Backend<R>, 1>::zeros([1], device).cast(dtype).into_primitive().tensor();
        if use_tensor_cores::<R>(&probe) {
            run_cases::<R>(device, dtype, true, tolerance);
        } else {
            println!("{dtype:?}: no tensor-core path on this device");
        }
    }
}

/// The dispatch plan's kernels against a host count, on id lists longer than one scan block
/// (1024), with empty experts and a single expert: the scan's in-expert ranks, per-expert
/// counts and id range, and the rows placed from them (packed and padded segments), with and
/// without a per-expert limit.
/// One list holds ids outside `0..E`, which the range must show and the counts skip.
fn check_plan_kernels<R: CubeRuntime>(device: &R::Device) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("plan seed {seed}");
    let mut rng = Lcg(seed);
    let ints = |t: burn::tensor::ops::IntTensor<Backend<R>>| -> Vec<i64> {
        Tensor::<Backend<R>, 1, Int>::from_primitive(t).into_data().iter::<i64>().collect()
    };
    for (tokens, top_k, experts, used, kept) in
        [(1usize, 1usize, 1usize, 1i32, 1usize), (1000, 3, 64, 60, 40), (1250, 4, 256, 7, 5000), (512, 2, 4, 1, 300)]
    {
        let pairs = tokens * top_k;
        let ids: Vec<i32> = (0..pairs).map(|_| ((rng.normal_ish() + 2.0).abs() * 1000.0) as i32 % used).collect();
        let mut seen = vec![0i64; experts];
        let ranks: Vec<i64> = ids
            .iter()
            .map(|&e| {
                seen[e as usize] += 1;
                seen[e as usize] - 1
            })
            .collect();
        let t = Tensor::<Backend<R>, 2, Int>::from_data(TensorData::new(ids.clone(), [tokens, top_k]), device);
        let (got_ranks, summary) = Backend::<R>::scan_experts(t.clone().into_primitive(), experts);
        assert_eq!(ints(got_ranks.clone()), ranks, "ranks of {pairs} pairs over {experts} experts");
        let mut expected = seen.clone();
        expected.extend([i64::from(*ids.iter().min().unwrap()), i64::from(*ids.iter().max().unwrap())]);
        assert_eq!(ints(summary), expected, "counts and id range of {pairs} pairs over {experts} experts");
        let counts = Backend::<R>::count_experts(t.clone().into_primitive(), experts);
        assert_eq!(ints(counts), seen, "router counts of {pairs} pairs over {experts} experts");

        // Segments of min(count, kept) rows back to back, or each padded to the largest (rows
        // no pair fills read 0); later pairs of a full expert drop.
        let kept_rows: Vec<usize> = seen.iter().map(|&c| (c as usize).min(kept)).collect();
        let largest = kept_rows.iter().copied().max().unwrap_or(0);
        for padded in [false, true] {
            let segment = if padded { vec![largest; experts] } else { kept_rows.clone() };
            let starts: Vec<i64> =
                segment.iter().scan(0i64, |next, &n| Some(std::mem::replace(next, *next + n as i64))).collect();
            let rows: usize = segment.iter().sum();
            let mut source = vec![0i64; rows];
            let row_of_pair: Vec<i64> = (0..pairs)
                .map(|p| {
                    if (ranks[p] as usize) < kept {
                        let row = starts[ids[p] as usize] + ranks[p];
                        source[row as usize] = (p / top_k + 1) as i64;
                        row
                    } else {
                        rows as i64
                    }
                })
                .collect();
            let starts_t = Tensor::<Backend<R>, 1, Int>::from_ints(starts.as_slice(), device);
            let (got_rows, got_source) = Backend::<R>::place_rows(
                t.clone().into_primitive(),
                got_ranks.clone(),
                starts_t.into_primitive(),
                kept,
                rows,
                padded,
            );
            let what = format!("{pairs} pairs, {kept} kept per expert, padded {padded}");
            assert_eq!(ints(got_rows), row_of_pair, "row of each pair, {what}");
            assert_eq!(ints(got_source), source, "source of each row, {what}");
        }
    }
    // Ids outside `0..E`: counted nowhere, and the range reports them.
    let t = Tensor::<Backend<R>, 2, Int>::from_data(TensorData::new(vec![2, -3, 0, 9, 2, 1], [3, 2]), device);
    let (_, summary) = Backend::<R>::scan_experts(t.into_primitive(), 4);
    assert_eq!(ints(summary), vec![1, 1, 2, 0, -3, 9], "counts and range with ids outside 0..4");
}

#[cfg(feature = "wgpu")]
#[test]
fn plan_kernels_match_the_host_count_on_wgpu() {
    check_plan_kernels::<cubecl::wgpu::WgpuRuntime>(&Default::default());
}

#[cfg(feature = "cuda")]
#[test]
fn plan_kernels_match_the_host_count_on_cuda() {
    check_plan_kernels::<cubecl::cuda::CudaRuntime>(&Default::default());
}

#[cfg(feature = "wgpu")]
#[test]
fn grouped_gemm_matches_the_host_loop_on_wgpu() {
    // f32 only: software Vulkan drivers do not all store half precision.
    run_all::<cubecl::wgpu::WgpuRuntime>(&Default::default(), &[(DType::F32, 1e-5)]);
}

#[cfg(feature = "cuda")]
#[test]
fn grouped_gemm_matches_the_host_loop_on_cuda() {
    // Half-precision outputs are rounded once (bf16: 8 bits of mantissa, f16: 11).
    run_all::<cubecl::cuda::CudaRuntime>(
        &Default::default(),
        &[(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 2e-3)],
    );
}

/// The Hopper `wgmma` kernel on every case whose widths it takes (multiples of 8), in both
/// half-precision types: the three products against the float64 host loop. On a CUDA device
/// that is not Hopper the kernel declines every case, and the test says so.
#[cfg(feature = "cuda")]
#[test]
fn wgmma_grouped_gemm_matches_the_host_loop_on_cuda() {
    use moe_kernels::cube::{launch_rows_wgmma, launch_weight_grad_wgmma};
    type R = cubecl::cuda::CudaRuntime;
    let device = Default::default();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = Lcg(seed);
    for (dtype, tolerance) in [(DType::BF16, 1e-2), (DType::F16, 2e-3)] {
        for &(name, segments, a, b) in CASES {
            let label = format!("{name} ({dtype:?}, wgmma)");
            let experts = segments.len();
            let rows: usize = segments.iter().sum();
            let (x, xh) = upload::<R, 2>(rng.values(rows * a), [rows, a], dtype, &device);
            let (w, wh) = upload::<R, 3>(rng.values(experts * a * b), [experts, a, b], dtype, &device);
            let (g, gh) = upload::<R, 2>(rng.values(rows * b), [rows, b], dtype, &device);
            let wt = Tensor::<Backend<R>, 3>::from_primitive(TensorPrimitive::Float(w.clone())).swap_dims(1, 2);
            let wt = wt.into_primitive().tensor();
            let outs = [
                launch_rows_wgmma(&x, &w, segments),
                launch_rows_wgmma(&g, &wt, segments),
                launch_weight_grad_wgmma(&x, &g, segments),
            ];
            let taken = outs.iter().filter(|o| o.is_some()).count();
            if !(a.is_multiple_of(8) && b.is_multiple_of(8)) {
                assert_eq!(taken, 0, "{label}: widths {a} x {b} are not multiples of 8, yet the kernel ran");
                continue;
            }
            if taken == 0 {
                println!("{label}: the device is not Hopper; the wgmma kernel declined");
                continue;
            }
            assert_eq!(taken, 3, "{label}: the kernel took only some of the three products");
            let [y, dx, dw] = host_products(segments, (a, b), &xh, &wh, &gh);
            let [out_y, out_dx, out_dw] = outs.map(Option::unwrap);
            check(&format!("{label} rows x weights"), &download::<R, 2>(out_y), &y, tolerance);
            check(&format!("{label} row gradient (transposed view)"), &download::<R, 2>(out_dx), &dx, tolerance);
            check(&format!("{label} weight gradient"), &download::<R, 3>(out_dw), &dw, tolerance);
        }
    }
}

/// The dense product (the shared experts' and the router's path) under `Autodiff` on the cube
/// backend: its output and both gradients for the loss `sum(x w * r)` against the float64 host
/// loop. These narrow shapes, and half precision on a device with tensor cores, run the grouped
/// GEMM with one segment, the row gradient that GEMM on the weights' transposed view, and the
/// weight gradient the grouped weight gradient over row blocks.
fn check_dense_product<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = Lcg(seed);
    // The second shape's weight gradient is split into four row blocks (split-K).
    for (t, a, b) in [(200, 96, 72), (1030, 64, 48)] {
        check_dense_shape::<R>(&mut rng, (t, a, b), device, dtype, tolerance);
    }
}

fn check_dense_shape<R: CubeRuntime>(
    rng: &mut Lcg,
    (t, a, b): (usize, usize, usize),
    device: &R::Device,
    dtype: DType,
    tolerance: f64,
) {
    type Tracked<R> = Autodiff<Backend<R>>;
    let (x, xh) = upload::<R, 2>(rng.values(t * a), [t, a], dtype, device);
    let (w, wh) = upload::<R, 2>(rng.values(a * b), [a, b], dtype, device);
    let (r, rh) = upload::<R, 2>(rng.values(t * b), [t, b], dtype, device);
    let [y, dx, dw] = host_products(&[t], (a, b), &xh, &wh, &rh);
    let tracked = |p: CubeTensor<R>| {
        Tensor::<Tracked<R>, 2>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(p))).require_grad()
    };
    let (xt, wt) = (tracked(x), tracked(w));
    let rt = Tensor::<Tracked<R>, 2>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(r)));
    let out = Tracked::<R>::moe_dense_matmul(xt.clone(), wt.clone());
    let label =
        format!("dense product {t}x{a}x{b} ({dtype:?}, tensor cores {})", Backend::<R>::tensor_cores(dtype, device));
    check(&label, &download::<R, 2>(out.clone().inner().into_primitive().tensor()), &y, tolerance);
    let grads = (out * rt).sum().backward();
    let grad = |p: &Tensor<Tracked<R>, 2>| download::<R, 2>(p.grad(&grads).expect("tracked").into_primitive().tensor());
    check(&format!("{label} row gradient"), &grad(&xt), &dx, tolerance);
    check(&format!("{label} weight gradient"), &grad(&wt), &dw, tolerance);
}

#[cfg(feature = "wgpu")]
#[test]
fn dense_product_matches_the_host_loop_on_wgpu() {
    check_dense_product::<cubecl::wgpu::WgpuRuntime>(&Default::default(), DType::F32, 1e-5);
}

#[cfg(feature = "cuda")]
#[test]
fn dense_product_matches_the_host_loop_on_cuda() {
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        check_dense_product::<cubecl::cuda::CudaRuntime>(&Default::default(), dtype, tolerance);
    }
}

/// The combine kernel (`out[t] = sum_k w[t, k] rows[row of (t, k)]`) against the float64 host
/// sum, with rows in `dtype` and the router's f32 weights (read as they are, no cast), a width
/// that allows 16-byte vectors, one that does not and an odd one (no vectors), and dropped pairs (rows past the end);
/// and its weight gradient's kernel (`pair_dots`: each pair's row times its token's gradient).
fn check_combine<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("combine seed {seed}");
    let mut rng = Lcg(seed);
    let (tokens, top_k, rows) = (300usize, 3usize, 700usize);
    for d in [64usize, 36, 35] {
        let (x, xh) = upload::<R, 2>(rng.values(rows * d), [rows, d], dtype, device);
        let (w, wh) = upload::<R, 2>(rng.values(tokens * top_k), [tokens, top_k], DType::F32, device);
        // Pair p reads row (7 p) mod (rows + 40): about one pair in 19 points past the end.
        let row_of_pair: Vec<i32> = (0..tokens * top_k).map(|p| ((7 * p) % (rows + 40)) as i32).collect();
        let mut expected = vec![0.0f64; tokens * d];
        for (p, &r) in row_of_pair.iter().enumerate() {
            if (r as usize) < rows {
                for j in 0..d {
                    expected[(p / top_k) * d + j] += wh[p] * xh[r as usize * d + j];
                }
            }
        }
        // The weight gradient: each pair's dot product of its row with its token's gradient.
        let (g, gh) = upload::<R, 2>(rng.values(tokens * d), [tokens, d], dtype, device);
        let dots: Vec<f64> = row_of_pair
            .iter()
            .enumerate()
            .map(|(p, &r)| match r as usize {
                r if r < rows => (0..d).map(|j| xh[r * d + j] * gh[(p / top_k) * d + j]).sum(),
                _ => 0.0,
            })
            .collect();
        let index = Tensor::<Backend<R>, 1, Int>::from_data(TensorData::new(row_of_pair, [tokens * top_k]), device);
        let out = Backend::<R>::combine_rows(x.clone(), index.clone().into_primitive(), w);
        check(
            &format!("combine ({dtype:?} rows, f32 weights, width {d})"),
            &download::<R, 2>(out),
            &expected,
            tolerance,
        );
        let pairs = index.reshape([tokens, top_k]).into_primitive();
        let out = Backend::<R>::pair_dots(x, pairs, g, DType::F32);
        // f32 outputs: only the f32 sums' rounding.
        check(&format!("pair dots ({dtype:?} rows, width {d})"), &download::<R, 2>(out), &dots, 1e-5);
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn combine_matches_the_host_sum_on_wgpu() {
    check_combine::<cubecl::wgpu::WgpuRuntime>(&Default::default(), DType::F32, 1e-6);
}

#[cfg(feature = "cuda")]
#[test]
fn combine_matches_the_host_sum_on_cuda() {
    // bf16 outputs are rounded once (8 bits of mantissa).
    for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
        check_combine::<cubecl::cuda::CudaRuntime>(&Default::default(), dtype, tolerance);
    }
}

/// The selection kernel against the portable rule (`Selection::select` on NdArray), on scores
/// with many ties (values on a coarse grid), NaN, `-inf`, and rows of nothing but those.
fn check_selection<R: CubeRuntime>(device: &R::Device) {
    use burn::backend::NdArray;
    use moe_kernels::Selection;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("selection seed {seed}");
    let mut rng = Lcg(seed);
    let selection = |top_k, num_groups, topk_groups, group_score_topk| Selection {
        top_k,
        num_groups,
        topk_groups,
        group_score_topk,
    };
    // (experts, selection): no groups; DeepSeek-V3's 8 groups keep 4 by top-2 sums; a
    // 3-entry group score; K larger than the kept groups hold (masked experts fill in).
    let cases = [
        (64, selection(6, 1, 1, 2)),
        (256, selection(8, 8, 4, 2)),
        (16, selection(3, 4, 2, 3)),
        (8, selection(6, 2, 1, 2)),
        (5, selection(5, 1, 1, 2)),
    ];
    for (experts, sel) in cases {
        let tokens = 333;
        let mut values: Vec<f32> = rng.values(tokens * experts).into_iter().map(|v| (v * 4.0).round() / 4.0).collect();
        for (i, v) in values.iter_mut().enumerate() {
            match i % 37 {
                3 => *v = f32::NAN,
                11 => *v = f32::NEG_INFINITY,
                _ => {}
            }
        }
        values[..experts].fill(f32::NAN);
        values[experts..2 * experts].fill(f32::NEG_INFINITY);
        let data = TensorData::new(values, [tokens, experts]);
        let expected: Vec<i64> = sel
            .select(Tensor::<NdArray, 2>::from_data(data.clone(), &Default::default()))
            .into_data()
            .iter::<i64>()
            .collect();
        let choice = Tensor::<Backend<R>, 2>::from_data(data, device).into_primitive().tensor();
        let ids = Backend::<R>::select_experts(choice, &sel);
        let got: Vec<i64> = Tensor::<Backend<R>, 2, Int>::from_primitive(ids).into_data().iter::<i64>().collect();
        assert_eq!(got, expected, "{experts} experts, {sel:?}");
    }
}

/// The SwiGLU activation's kernels (through the backend's `moe_silu_mul` and
/// `moe_silu_mul_grad`) against a float64 host computation on the values the device holds:
/// `silu(g) u`, `dy u silu'(g)` and `dy silu(g)`, on a width that allows vectors and an odd one,
/// with large logits of both signs (the sigmoid's saturated ends).
fn check_silu_mul<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("silu_mul seed {seed}");
    let mut rng = Lcg(seed);
    let rows = 300;
    for h in [64usize, 35] {
        let mut gate = rng.values(rows * h).into_iter().map(|v| v * 4.0).collect::<Vec<_>>();
        gate[3] = 90.0;
        gate[4] = -90.0;
        let (g, gh) = upload::<R, 2>(gate, [rows, h], dtype, device);
        let (u, uh) = upload::<R, 2>(rng.values(rows * h), [rows, h], dtype, device);
        let (dy, dyh) = upload::<R, 2>(rng.values(rows * h), [rows, h], dtype, device);
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let out_ref: Vec<f64> = gh.iter().zip(&uh).map(|(&g, &u)| g * sigmoid(g) * u).collect();
        let (mut grad_gate_ref, mut grad_up_ref) = (vec![0.0; rows * h], vec![0.0; rows * h]);
        for i in 0..rows * h {
            let s = sigmoid(gh[i]);
            grad_gate_ref[i] = dyh[i] * uh[i] * s * (1.0 + gh[i] * (1.0 - s));
            grad_up_ref[i] = dyh[i] * gh[i] * s;
        }
        let tensor = |t: CubeTensor<R>| Tensor::<Backend<R>, 2>::from_primitive(TensorPrimitive::Float(t));
        let host = |t: Tensor<Backend<R>, 2>| download::<R, 2>(t.into_primitive().tensor());
        let out = <Backend<R> as MoeBackend>::moe_silu_mul(tensor(g.clone()), tensor(u.clone()));
        check(&format!("silu_mul ({dtype:?}, width {h})"), &host(out), &out_ref, tolerance);
        let (grad_gate, grad_up) = <Backend<R> as MoeBackend>::moe_silu_mul_grad(tensor(g), tensor(u), tensor(dy));
        check(&format!("silu_mul gate gradient ({dtype:?}, width {h})"), &host(grad_gate), &grad_gate_ref, tolerance);
        check(&format!("silu_mul up gradient ({dtype:?}, width {h})"), &host(grad_up), &grad_up_ref, tolerance);
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn silu_mul_matches_the_host_on_wgpu() {
    check_silu_mul::<cubecl::wgpu::WgpuRuntime>(&Default::default(), DType::F32, 1e-6);
}

#[cfg(feature = "cuda")]
#[test]
fn silu_mul_matches_the_host_on_cuda() {
    // bf16 outputs are rounded once (8 bits of mantissa).
    for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
        check_silu_mul::<cubecl::cuda::CudaRuntime>(&Default::default(), dtype, tolerance);
    }
}

/// The sigmoid gate kernel (through the backend's `moe_gate`, which takes it for sigmoid
/// scores) against the portable gate (`GateRule::apply` on NdArray): the ids exactly, scores
/// and weights to f32 rounding, with and without groups, normalisation and scale, on logits
/// with NaN and infinities and a bias that changes the choice; then its backward.
fn check_gate<R: CubeRuntime>(device: &R::Device) {
    use burn::backend::NdArray;
    use moe_kernels::{GateRule, ScoreFunction, Selection};
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("gate seed {seed}");
    let mut rng = Lcg(seed);
    let rule = |top_k, num_groups, topk_groups, normalize_weights, route_scale| GateRule {
        score_function: ScoreFunction::Sigmoid,
        selection: Selection { top_k, num_groups, topk_groups, group_score_topk: 2 },
        normalize_weights,
        route_scale,
    };
    let cases = [(64, rule(6, 1, 1, true, 1.0)), (256, rule(8, 8, 4, true, 2.5)), (16, rule(3, 4, 2, false, 0.5))];
    for (experts, rule) in cases {
        let tokens = 300;
        let mut logits: Vec<f32> = rng.values(tokens * experts).into_iter().map(|v| v * 3.0).collect();
        for (i, v) in logits.iter_mut().enumerate() {
            match i % 41 {
                5 => *v = f32::NAN,
                9 => *v = f32::INFINITY,
                13 => *v = f32::NEG_INFINITY,
                _ => {}
            }
        }
        let bias: Vec<f32> = rng.values(experts).into_iter().map(|v| v * 0.1).collect();
        let (logits, bias) = (TensorData::new(logits, [tokens, experts]), TensorData::new(bias, [experts]));
        let cpu = Default::default();
        let expected = rule.apply(
            Tensor::<NdArray, 2>::from_data(logits.clone(), &cpu),
            Tensor::<NdArray, 1>::from_data(bias.clone(), &cpu),
            |choice, selection| selection.select(choice),
        );
        let got = <Backend<R> as MoeBackend>::moe_gate(
            Tensor::from_data(logits.clone(), device),
            Tensor::from_data(bias.clone(), device),
            &rule,
        );
        let ids = |d: TensorData| d.iter::<i64>().collect::<Vec<_>>();
        let (got_ids, expected_ids) = (ids(got.expert_ids.into_data()), ids(expected.expert_ids.into_data()));
        assert_eq!(got_ids, expected_ids, "{experts} experts, {rule:?}: ids");
        let floats = |d: TensorData| d.iter::<f32>().map(f64::from).collect::<Vec<_>>();
        for (name, out, reference) in [
            ("scores", floats(got.scores.into_data()), floats(expected.scores.into_data())),
            ("weights", floats(got.weights.into_data()), floats(expected.weights.into_data())),
        ] {
            // NaN rows stay NaN in both; the rest agree to f32 rounding.
            let nan_in = |v: &[f64]| v.iter().map(|x| x.is_nan()).collect::<Vec<_>>();
            assert_eq!(nan_in(&out), nan_in(&reference), "{experts} experts: {name} NaN positions");
            let keep = |v: &[f64]| v.iter().copied().filter(|x| !x.is_nan()).collect::<Vec<_>>();
            check(&format!("gate {experts} experts {name}"), &keep(&out), &keep(&reference), 1e-6);
        }
        check_gate_grad::<R>(device, &rule, (logits, bias), &mut rng);
    }
}

/// The gate's backward under `Autodiff` on the cube backend (the gate kernel forward, its
/// backward kernel for the weights) against burn's autodiff of the portable gate on NdArray:
/// the logits' gradient of `sum(weights * gw) + sum(scores * gs)` for random `gw`, `gs`.
fn check_gate_grad<R: CubeRuntime>(
    device: &R::Device,
    rule: &moe_kernels::GateRule,
    (logits, bias): (TensorData, TensorData),
    rng: &mut Lcg,
) {
    use burn::backend::NdArray;
    let [tokens, experts] = [logits.shape[0], logits.shape[1]];
    let top_k = rule.selection.top_k;
    let grad_weights = TensorData::new(rng.values(tokens * top_k), [tokens, top_k]);
    let grad_scores = TensorData::new(rng.values(tokens * experts), [tokens, experts]);
    fn logits_grad<B: burn::tensor::backend::AutodiffBackend>(
        gate: impl FnOnce(Tensor<B, 2>, Tensor<B, 1>) -> moe_kernels::Gated<B>,
        [logits, bias, grad_weights, grad_scores]: [TensorData; 4],
        device: &B::Device,
    ) -> Vec<f64> {
        let logits = Tensor::<B, 2>::from_data(logits, device).require_grad();
        let gated = gate(logits.clone(), Tensor::from_data(bias, device));
        let loss = (gated.weights * Tensor::from_data(grad_weights, device)).sum()
            + (gated.scores * Tensor::from_data(grad_scores, device)).sum();
        let grad = logits.grad(&loss.backward()).expect("the logits are tracked");
        grad.into_data().iter::<f32>().map(f64::from).collect()
    }
    let inputs = [logits, bias, grad_weights, grad_scores];
    let expected = logits_grad::<Autodiff<NdArray>>(
        |l, b| rule.apply(l, b, |choice, selection| selection.select(choice)),
        inputs.clone(),
        &Default::default(),
    );
    let got = logits_grad::<Autodiff<Backend<R>>>(|l, b| <Autodiff<Backend<R>>>::moe_gate(l, b, rule), inputs, device);
    let nan_in = |v: &[f64]| v.iter().map(|x| x.is_nan()).collect::<Vec<_>>();
    assert_eq!(nan_in(&got), nan_in(&expected), "{experts} experts: gradient NaN positions");
    let keep = |v: &[f64]| v.iter().copied().filter(|x| !x.is_nan()).collect::<Vec<_>>();
    check(&format!("gate {experts} experts logits' gradient"), &keep(&got), &keep(&expected), 1e-5);
}

#[cfg(feature = "wgpu")]
#[test]
fn gate_matches_the_portable_rule_on_wgpu() {
    check_gate::<cubecl::wgpu::WgpuRuntime>(&Default::default());
}

#[cfg(feature = "cuda")]
#[test]
fn gate_matches_the_portable_rule_on_cuda() {
    check_gate::<cubecl::cuda::CudaRuntime>(&Default::default());
}

#[cfg(feature = "wgpu")]
#[test]
fn selection_matches_the_portable_rule_on_wgpu() {
    check_selection::<cubecl::wgpu::WgpuRuntime>(&Default::default());
}

#[cfg(feature = "cuda")]
#[test]
fn selection_matches_the_portable_rule_on_cuda() {
    check_selection::<cubecl::cuda::CudaRuntime>(&Default::default());
}

/// The causal attention under `Autodiff` on the cube backend (the grouped products in half
/// precision on tensor cores, burn's `module::attention` otherwise): its output and the
/// gradients of `q`, `k` and `v` for the loss `sum(out * r)` against burn's autodiff of the
/// plain ops in float64 on NdArray, with a value width unlike the key width (MLA) and a length
/// that is not a tile multiple.
fn check_attention<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    use burn::backend::NdArray;
    use burn::tensor::{Bool, activation::softmax};
    type Tracked<R> = Autodiff<Backend<R>>;
    type Reference = Autodiff<NdArray<f64>>;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = Lcg(seed);
    let (b, h, l, e, ev, scale) = (2, 3, 40, 24, 16, 0.3);
    let (qk, vv) = ([b, h, l, e], [b, h, l, ev]);
    let uploads =
        [qk, qk, vv, vv].map(|shape| upload::<R, 4>(rng.values(shape.iter().product()), shape, dtype, device));
    let [(q, qh), (k, kh), (v, vh), (r, rh)] = uploads;

    let tracked = |p: CubeTensor<R>| {
        Tensor::<Tracked<R>, 4>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(p))).require_grad()
    };
    let (qt, kt, vt) = (tracked(q), tracked(k), tracked(v));
    let rt = Tensor::<Tracked<R>, 4>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(r)));
    let out = Tracked::<R>::moe_causal_attention(qt.clone(), kt.clone(), vt.clone(), scale);
    let ours_out = download::<R, 4>(out.clone().inner().into_primitive().tensor());
    let grads = (out * rt).sum().backward();
    let grad = |p: &Tensor<Tracked<R>, 4>| download::<R, 4>(p.grad(&grads).expect("tracked").into_primitive().tensor());
    let ours = [grad(&qt), grad(&kt), grad(&vt)];

    let host = |values: &[f64], shape: [usize; 4]| {
        Tensor::<Reference, 4>::from_data(TensorData::new(values.to_vec(), shape), &Default::default()).require_grad()
    };
    let (qr, kr, vr) = (host(&qh, qk), host(&kh, qk), host(&vh, vv));
    let future: Vec<bool> = (0..l * l).map(|n| n % l > n / l).collect();
    let future = Tensor::<Reference, 2, Bool>::from_data(TensorData::new(future, [l, l]), &Default::default());
    let scores = qr.clone().matmul(kr.clone().swap_dims(2, 3)).mul_scalar(scale);
    let probs = softmax(scores.mask_fill(future.reshape([1, 1, l, l]).expand([b, h, l, l]), f64::NEG_INFINITY), 3);
    let reference = probs.matmul(vr.clone());
    let values = |t: Tensor<NdArray<f64>, 4>| t.into_data().iter::<f64>().collect::<Vec<_>>();
    let reference_out = values(reference.clone().inner());
    let rr = Tensor::<Reference, 4>::from_data(TensorData::new(rh, vv), &Default::default());
    let grads = (reference * rr).sum().backward();
    let label = format!("attention ({dtype:?})");
    check(&label, &ours_out, &reference_out, tolerance);
    for (name, (got, t)) in ["q", "k", "v"].iter().zip(ours.iter().zip([qr, kr, vr])) {
        check(&format!("{label} {name} gradient"), got, &values(t.grad(&grads).expect("tracked")), tolerance);
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn attention_matches_the_host_ops_on_wgpu() {
    check_attention::<cubecl::wgpu::WgpuRuntime>(&Default::default(), DType::F32, 1e-4);
}

#[cfg(feature = "cuda")]
#[test]
fn attention_matches_the_host_ops_on_cuda() {
    // f32 runs burn's attention and matmuls (TF32 on the H200); bf16 the grouped products.
    for (dtype, tolerance) in [(DType::F32, 5e-3), (DType::BF16, 2e-2)] {
        check_attention::<cubecl::cuda::CudaRuntime>(&Default::default(), dtype, tolerance);
    }
}

/// The AdamW kernel (through the backend's `moe_adamw`) against a float64 host loop of the
/// update, with and without the clip (which acts: the gradient's norm is about 10 x the clip),
/// on lengths that take 4-element vectors and none, from nonzero moments at step 3.
fn check_adamw<R: CubeRuntime>(device: &R::Device) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("adamw seed {seed}");
    let mut rng = Lcg(seed);
    for n in [1000usize, 1001] {
        for clip_norm in [None, Some(2.0f32)] {
            let step =
                AdamWStep { lr: 1e-2, beta_1: 0.9, beta_2: 0.95, epsilon: 1e-5, weight_decay: 0.1, time: 3, clip_norm };
            let (p, ph) = upload::<R, 1>(rng.values(n), [n], DType::F32, device);
            let (g, gh) = upload::<R, 1>(rng.values(n), [n], DType::F32, device);
            let (m, mh) = upload::<R, 1>(rng.values(n).into_iter().map(|v| v * 0.1).collect(), [n], DType::F32, device);
            let (v, vh) =
                upload::<R, 1>(rng.values(n).into_iter().map(|v| v * v * 0.01).collect(), [n], DType::F32, device);
            let norm = gh.iter().map(|g| g * g).sum::<f64>().sqrt();
            let scale = clip_norm.map_or(1.0, |c| (c as f64 / norm).min(1.0));
            let (b1, b2, t) = (step.beta_1 as f64, step.beta_2 as f64, step.time as i32);
            let mut expected = [vec![0.0; n], vec![0.0; n], vec![0.0; n]];
            for i in 0..n {
                let g = gh[i] * scale;
                let m = b1 * mh[i] + (1.0 - b1) * g;
                let v = b2 * vh[i] + (1.0 - b2) * g * g;
                let delta = (m / (1.0 - b1.powi(t))) / ((v / (1.0 - b2.powi(t))).sqrt() + step.epsilon as f64);
                expected[0][i] = ph[i] * (1.0 - step.lr * step.weight_decay as f64) - step.lr * delta;
                expected[1][i] = m;
                expected[2][i] = v;
            }
            let tensor = |t: CubeTensor<R>| Tensor::<Backend<R>, 1>::from_primitive(TensorPrimitive::Float(t));
            let out = <Backend<R> as MoeBackend>::moe_adamw(tensor(p), tensor(g), tensor(m), tensor(v), &step);
            for (name, (out, expected)) in
                ["parameter", "first moment", "second moment"].iter().zip(out.into_iter().zip(&expected))
            {
                check(
                    &format!("adamw {name} (n {n}, clip {clip_norm:?})"),
                    &download::<R, 1>(out.into_primitive().tensor()),
                    expected,
                    1e-5,
                );
            }
        }
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn adamw_matches_the_host_loop_on_wgpu() {
    check_adamw::<cubecl::wgpu::WgpuRuntime>(&Default::default());
}

#[cfg(feature = "cuda")]
#[test]
fn adamw_matches_the_host_loop_on_cuda() {
    check_adamw::<cubecl::cuda::CudaRuntime>(&Default::default());
}

/// RMSNorm under `Autodiff` on the cube backend (the row kernel each way) against a float64
/// host loop: the output and the gradients of `x` and `gamma` for the loss `sum(y * r)`, on a
/// row wider than the kernel's 128 units and one narrower.
fn check_rms_norm<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    type Tracked<R> = Autodiff<Backend<R>>;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("rms_norm seed {seed}");
    let mut rng = Lcg(seed);
    let epsilon = 1e-6;
    for (rows, d) in [(70usize, 520usize), (9, 37)] {
        let (x, xh) = upload::<R, 2>(rng.values(rows * d), [rows, d], dtype, device);
        let (r, rh) = upload::<R, 2>(rng.values(rows * d), [rows, d], dtype, device);
        let (gamma, gh) = upload::<R, 1>(rng.values(d).into_iter().map(|v| 1.0 + v).collect(), [d], DType::F32, device);
        let (mut y, mut dx, mut dgamma) = (vec![0.0; rows * d], vec![0.0; rows * d], vec![0.0; d]);
        for t in 0..rows {
            let row = &xh[t * d..(t + 1) * d];
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + epsilon).sqrt();
            let dot = (0..d).map(|i| rh[t * d + i] * gh[i] * row[i] * inv).sum::<f64>() / d as f64;
            for i in 0..d {
                let normed = row[i] * inv;
                y[t * d + i] = normed * gh[i];
                dx[t * d + i] = inv * (rh[t * d + i] * gh[i] - normed * dot);
                dgamma[i] += rh[t * d + i] * normed;
            }
        }
        let xt = Tensor::<Tracked<R>, 2>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(x))).require_grad();
        let gt =
            Tensor::<Tracked<R>, 1>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(gamma))).require_grad();
        let rt = Tensor::<Tracked<R>, 2>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(r)));
        let out = Tracked::<R>::moe_rms_norm(xt.clone(), gt.clone(), epsilon);
        let label = format!("rms_norm ({dtype:?}, {rows} x {d})");
        check(&label, &download::<R, 2>(out.clone().inner().into_primitive().tensor()), &y, tolerance);
        let grads = (out * rt).sum().backward();
        check(
            &format!("{label} x gradient"),
            &download::<R, 2>(xt.grad(&grads).unwrap().into_primitive().tensor()),
            &dx,
            tolerance,
        );
        check(
            &format!("{label} gamma gradient"),
            &download::<R, 1>(gt.grad(&grads).unwrap().into_primitive().tensor()),
            &dgamma,
            tolerance,
        );
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn rms_norm_matches_the_host_loop_on_wgpu() {
    check_rms_norm::<cubecl::wgpu::WgpuRuntime>(&Default::default(), DType::F32, 1e-5);
}

#[cfg(feature = "cuda")]
#[test]
fn rms_norm_matches_the_host_loop_on_cuda() {
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        check_rms_norm::<cubecl::cuda::CudaRuntime>(&Default::default(), dtype, tolerance);
    }
}

/// The rotary kernel under `Autodiff` on the cube backend against a float64 host rotation: the
/// output and the input's gradient (the inverse rotation) for both pair layouts, reading a
/// transposed view.
fn check_rotary<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    type Tracked<R> = Autodiff<Backend<R>>;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("rotary seed {seed}");
    let mut rng = Lcg(seed);
    let (b, l, h, r) = (2, 7, 3, 10);
    let half = r / 2;
    let angles: Vec<f64> = rng.values(l * half).into_iter().map(|a| f64::from(a) * 3.0).collect();
    let (cos, ch) = upload::<R, 2>(angles.iter().map(|a| a.cos() as f32).collect(), [l, half], DType::F32, device);
    let (sin, sh) = upload::<R, 2>(angles.iter().map(|a| a.sin() as f32).collect(), [l, half], DType::F32, device);
    let constant =
        |p: CubeTensor<R>| Tensor::<Tracked<R>, 2>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(p)));
    let (cos, sin) = (constant(cos), constant(sin));
    for interleave in [true, false] {
        let (x, xh) = upload::<R, 4>(rng.values(b * l * h * r), [b, l, h, r], dtype, device);
        let (g, gh) = upload::<R, 4>(rng.values(b * h * l * r), [b, h, l, r], dtype, device);
        let pair = |i: usize| if interleave { (2 * i, 2 * i + 1) } else { (i, i + half) };
        let (mut y, mut dx) = (vec![0.0; b * h * l * r], vec![0.0; b * l * h * r]);
        for bi in 0..b {
            for hi in 0..h {
                for p in 0..l {
                    for i in 0..half {
                        let (i0, i1) = pair(i);
                        let src = |k: usize| ((bi * l + p) * h + hi) * r + k;
                        let dst = |k: usize| ((bi * h + hi) * l + p) * r + k;
                        let (c, s) = (ch[p * half + i], sh[p * half + i]);
                        y[dst(i0)] = xh[src(i0)] * c - xh[src(i1)] * s;
                        y[dst(i1)] = xh[src(i0)] * s + xh[src(i1)] * c;
                        dx[src(i0)] = gh[dst(i0)] * c + gh[dst(i1)] * s;
                        dx[src(i1)] = -gh[dst(i0)] * s + gh[dst(i1)] * c;
                    }
                }
            }
        }
        let xt = Tensor::<Tracked<R>, 4>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(x))).require_grad();
        let gt = Tensor::<Tracked<R>, 4>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(g)));
        let out = Tracked::<R>::moe_rotary(xt.clone().swap_dims(1, 2), cos.clone(), sin.clone(), interleave);
        let label = format!("rotary ({dtype:?}, interleave {interleave})");
        check(&label, &download::<R, 4>(out.clone().inner().into_primitive().tensor()), &y, tolerance);
        let grads = (out * gt).sum().backward();
        check(
            &format!("{label} gradient"),
            &download::<R, 4>(xt.grad(&grads).unwrap().into_primitive().tensor()),
            &dx,
            tolerance,
        );
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn rotary_matches_the_host_loop_on_wgpu() {
    check_rotary::<cubecl::wgpu::WgpuRuntime>(&Default::default(), DType::F32, 1e-6);
}

#[cfg(feature = "cuda")]
#[test]
fn rotary_matches_the_host_loop_on_cuda() {
    for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
        check_rotary::<cubecl::cuda::CudaRuntime>(&Default::default(), dtype, tolerance);
    }
}

/// The causal softmax kernels (the attention's, on the grouped-GEMM route) against a float64
/// host loop: the probabilities, and the backward's probabilities and scores' gradient, on
/// sequences longer than the kernel's 128 units and shorter.
fn check_causal_softmax<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("causal_softmax seed {seed}");
    let mut rng = Lcg(seed);
    let scale = 0.7;
    for (sequences, l) in [(3usize, 200usize), (4, 5)] {
        let rows = sequences * l;
        let (scores, sh) =
            upload::<R, 2>(rng.values(rows * l).iter().map(|v| 4.0 * v).collect(), [rows, l], dtype, device);
        let (grad, gh) = upload::<R, 2>(rng.values(rows * l), [rows, l], dtype, device);
        let (mut probs, mut grad_scores) = (vec![0.0; rows * l], vec![0.0; rows * l]);
        for r in 0..rows {
            let (row, query) = (r * l, r % l);
            let max = (0..=query).map(|j| sh[row + j] * scale).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = (0..=query).map(|j| (sh[row + j] * scale - max).exp()).sum();
            for j in 0..=query {
                probs[row + j] = (sh[row + j] * scale - max).exp() / sum;
            }
            let dot: f64 = (0..=query).map(|j| probs[row + j] * gh[row + j]).sum();
            for j in 0..=query {
                grad_scores[row + j] = scale * probs[row + j] * (gh[row + j] - dot);
            }
        }
        let label = format!("causal_softmax ({dtype:?}, {sequences} x {l})");
        let out = Backend::<R>::causal_softmax(scores.clone(), scale);
        check(&label, &download::<R, 2>(out), &probs, tolerance);
        let (again, grad_out) = Backend::<R>::causal_softmax_grad(scores, grad, scale);
        check(&format!("{label} backward probabilities"), &download::<R, 2>(again), &probs, tolerance);
        check(&format!("{label} scores gradient"), &download::<R, 2>(grad_out), &grad_scores, tolerance);
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn causal_softmax_matches_the_host_loop_on_wgpu() {
    check_causal_softmax::<cubecl::wgpu::WgpuRuntime>(&Default::default(), DType::F32, 1e-5);
}

#[cfg(feature = "cuda")]
#[test]
fn causal_softmax_matches_the_host_loop_on_cuda() {
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        check_causal_softmax::<cubecl::cuda::CudaRuntime>(&Default::default(), dtype, tolerance);
    }
}
