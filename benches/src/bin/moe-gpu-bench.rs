//! GPU timing of one MoE layer in bf16 on `burn::backend::Cuda<bf16, i32>` (fusion + autotune
//! on), through the CubeCL kernels of `moe_kernels::cube`, or the portable `MoeBackend` path
//! with `MOE_KERNELS=portable` (each row's JSON says which: `"path"`). Run by `cargo xtask bench --backend
//! cuda`, which also runs PyTorch's baselines and prints the ratios.
//!
//! Method (a plain timing binary, not criterion: see docs/performance.md, "H200"): for each row,
//! `--warmup` untimed iterations first (cubecl autotunes and compiles kernels on first calls),
//! then `--reps` timed iterations; each timed iteration is `Instant::now()`, the work, then
//! `Backend::sync` (which flushes the fusion queue and waits for the device) before the clock
//! stops. The row reports the median, min and max. The device's memory pool is cleaned between
//! rows. One JSON object per row is appended to `--out` as soon as the row is done, so a later
//! crash or timeout keeps the rows before it.
//!
//! What is timed, per (shape, T):
//! - `layer`: `MoeLayer::forward` (router + sorted dispatch, Padded layout, + shared experts);
//!   forward, or forward + backward of `mean(y^2)` (in f32) with gradients of the input and of
//!   every weight (`Autodiff<Cuda<bf16>>`).
//! - `dense`: a dense SwiGLU of width `(K + S) * h` on the same T tokens: exactly the layer's
//!   active FLOPs, through the same burn matmuls, so the ceiling burn reaches on this work.
//! - `router`: the router alone (forward only).
//! - `gemm`: the grouped GEMM kernel alone (`moe_kernels::cube`), `[T K, d] x [E, d, h]` with
//!   every expert owning `T K / E` rows (balanced routing), forward only; `gemm_wgrad`: its
//!   weight-gradient product `[T K, d]^T [T K, h]` per expert. `MOE_GEMM_TILE` picks the tile.
//! - `stages`: the forward's pieces one at a time on the same routing, so their sum can be set
//!   against the `layer` row: `select` and `count` (the router's selection and per-expert
//!   counts alone), `plan`, `permute`,
//!   `swiglu` (the grouped expert MLPs), `combine`, `shared` (the shared experts).
//! - `mm8192`: a plain bf16 8192^3 matmul through burn (once, forward mode), against PyTorch's
//!   `bf16_matmul_tflops`.

#![allow(missing_docs)]

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, FloatDType, Tensor, bf16};
use moe_experts::{MoeLayer, MoeLayerConfig, SwiGluConfig};
use moe_router::RouterConfig;
use std::io::Write;
use std::time::Instant;

type G = burn::backend::Cuda<bf16, i32>;
type Ad = Autodiff<G>;

/// One layer shape of the issue.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    d: usize,
    h: usize,
    e: usize,
    k: usize,
    s: usize,
    groups: usize,
    keep: usize,
    scale: f64,
}

const SHAPES: &[Shape] = &[
    // DeepSeek-V3: d 7168, moe_intermediate 2048, 256 experts, top-8, 1 shared, 8 groups keep 4.
    Shape { name: "dsv3", d: 7168, h: 2048, e: 256, k: 8, s: 1, groups: 8, keep: 4, scale: 2.5 },
    // Small: d 1024, h 512, 64 experts, top-6, 2 shared, no groups.
    Shape { name: "small", d: 1024, h: 512, e: 64, k: 6, s: 2, groups: 1, keep: 1, scale: 1.0 },
];

impl Shape {
    fn flops_fwd(&self, t: usize) -> f64 {
        (t * (self.k + self.s) * 3 * 2 * self.d * self.h) as f64
    }

    fn layer<B: Backend>(&self, device: &B::Device) -> MoeLayer<B> {
        let router = RouterConfig::new(self.d, self.e, self.k)
            .with_num_groups(self.groups)
            .with_topk_groups(self.keep)
            .with_route_scale(self.scale);
        MoeLayerConfig::new(router, self.h)
            .with_num_shared(self.s)
            .with_seq_balance_alpha(0.0)
            .init::<B>(device)
            .expect("bench shapes are valid")
    }
}

struct Args {
    shape: Shape,
    mode: String,
    tokens: Vec<usize>,
    what: Vec<String>,
    warmup: usize,
    reps: usize,
    out: Option<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: moe-gpu-bench --shape dsv3|small --mode fwd|fwdbwd [--tokens 4096,8192,16384] \
         [--what layer,dense,router,stages,gemm,gemm_wgrad,mm8192] [--warmup 3] [--reps 10] [--out rows.jsonl]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        shape: SHAPES[1],
        mode: "fwd".into(),
        tokens: vec![4096, 8192, 16384],
        what: vec!["layer".into(), "dense".into()],
        warmup: 3,
        reps: 10,
        out: None,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--shape" => {
                let v = value();
                args.shape = *SHAPES.iter().find(|s| s.name == v).unwrap_or_else(|| usage());
            }
            "--mode" => {
                args.mode = value();
                if args.mode != "fwd" && args.mode != "fwdbwd" {
                    usage()
                }
            }
            "--tokens" => {
                args.tokens = value().split(',').map(|t| t.trim().parse().unwrap_or_else(|_| usage())).collect()
            }
            "--what" => args.what = value().split(',').map(str::to_string).collect(),
            "--warmup" => args.warmup = value().parse().unwrap_or_else(|_| usage()),
            "--reps" => args.reps = value().parse().unwrap_or_else(|_| usage()),
            "--out" => args.out = Some(value()),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if args.reps == 0 {
        usage()
    }
    args
}

/// Warmup, then `reps` timed runs of `f`, each ended by a device sync. Returns
/// (first warmup ms, sorted timed ms).
/// The closure returns what it computed, held until after the sync so that no lazy backend
/// can skip work whose result is dropped unread.
fn time<B: Backend, R>(device: &B::Device, warmup: usize, reps: usize, mut f: impl FnMut() -> R) -> (f64, Vec<f64>) {
    let mut first = f64::NAN;
    for i in 0..warmup {
        let start = Instant::now();
        let kept = f();
        B::sync(device).expect("device sync");
        drop(kept);
        if i == 0 {
            first = start.elapsed().as_secs_f64() * 1e3;
        }
    }
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            let kept = f();
            B::sync(device).expect("device sync");
            let ms = start.elapsed().as_secs_f64() * 1e3;
            drop(kept);
            ms
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (first, ms)
}

/// Times forward + backward through `forward` from `x`: the loss is `mean(y^2)` in f32, and
/// the input's gradient is read, so every weight's and the input's gradient are computed.
fn time_fwdbwd<const D: usize>(
    args: &Args,
    device: &burn::tensor::Device<Ad>,
    x: Tensor<Ad, D>,
    forward: impl Fn(Tensor<Ad, D>) -> Tensor<Ad, D>,
) -> (f64, Vec<f64>) {
    let x = x.require_grad();
    time::<Ad, _>(device, args.warmup, args.reps, || {
        let grads = forward(x.clone()).cast(FloatDType::F32).powi_scalar(2).mean().backward();
        let _ = x.grad(&grads).expect("input gradient");
        grads
    })
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]) }
}

struct Row<'a> {
    shape: &'a str,
    tokens: usize,
    mode: &'a str,
    what: &'a str,
    flops: f64,
    first_ms: f64,
    ms: Vec<f64>,
}

fn emit(args: &Args, row: Row<'_>) {
    let med = median(&row.ms);
    let tflops = if row.flops > 0.0 { row.flops / med / 1e9 } else { f64::NAN };
    let json = format!(
        "{{\"shape\":\"{}\",\"tokens\":{},\"mode\":\"{}\",\"what\":\"{}\",\"median_ms\":{:.4},\"min_ms\":{:.4},\
         \"max_ms\":{:.4},\"first_ms\":{:.2},\"reps\":{},\"warmup\":{},\"flops\":{:.6e},\"tflops\":{},\"path\":\"{}\"}}",
        row.shape,
        row.tokens,
        row.mode,
        row.what,
        med,
        row.ms[0],
        row.ms[row.ms.len() - 1],
        row.first_ms,
        row.ms.len(),
        args.warmup,
        row.flops,
        if tflops.is_finite() { format!("{tflops:.2}") } else { "null".into() },
        if moe_kernels::cube::kernels_enabled() { "kernels" } else { "portable" },
    );
    println!(
        "{:<6} T {:>6} {:<7} {:<7} median {:>9.3} ms (min {:.3}, max {:.3}, first {:.0} ms)  {:>7.1} TFLOP/s  {:>5.1}% of 759",
        row.shape,
        row.tokens,
        row.mode,
        row.what,
        med,
        row.ms[0],
        row.ms[row.ms.len() - 1],
        row.first_ms,
        tflops,
        tflops / 759.0 * 100.0
    );
    if let Some(path) = &args.out {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open --out");
        writeln!(f, "{json}").expect("write --out");
    }
}

/// The grouped GEMM kernel alone on the inner cube backend: balanced segments of `T K / E`
/// rows (the last takes the remainder). Returns (first ms, sorted ms, FLOPs).
fn time_grouped_gemm(args: &Args, t: usize, weight_grad: bool) -> (f64, Vec<f64>, f64) {
    type Inner = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, bf16, i32, u8>;
    let device = Default::default();
    let sh = args.shape;
    let rows = t * sh.k;
    let mut segments = vec![rows / sh.e; sh.e];
    segments[sh.e - 1] += rows % sh.e;
    let normal = Distribution::Normal(0.0, 1.0);
    let x = Tensor::<Inner, 2>::random([rows, sh.d], normal, &device).into_primitive().tensor();
    let cores = moe_kernels::cube::use_tensor_cores;
    let (first, ms) = if weight_grad {
        let g = Tensor::<Inner, 2>::random([rows, sh.h], normal, &device).into_primitive().tensor();
        time::<Inner, _>(&device, args.warmup, args.reps, || {
            moe_kernels::cube::launch_weight_grad(x.clone(), g.clone(), &segments, cores)
        })
    } else {
        let w = Tensor::<Inner, 3>::random([sh.e, sh.d, sh.h], normal, &device).into_primitive().tensor();
        time::<Inner, _>(&device, args.warmup, args.reps, || {
            moe_kernels::cube::launch_rows(x.clone(), w.clone(), &segments, cores)
        })
    };
    (first, ms, 2.0 * (rows * sh.d * sh.h) as f64)
}

/// The `stages` rows: each piece of the layer's forward timed alone, on one routing of `t`
/// random tokens.
fn time_stages(args: &Args, device: &burn::tensor::Device<G>, t: usize) {
    use moe_kernels::{CapacityLimit, MoeBackend};
    let sh = args.shape;
    let layer = sh.layer::<G>(device);
    let x = Tensor::<G, 2>::random([t, sh.d], Distribution::Normal(0.0, 1.0), device);
    let routing = layer.router.forward_with(x.clone(), G::moe_select_experts, G::moe_expert_counts);
    let choice = routing.scores.clone() + layer.router.bias().reshape([1, sh.e]);
    let selection = layer.router.selection();
    let plan = G::moe_plan(routing.expert_ids.clone(), None, sh.e, CapacityLimit::Dropless).expect("valid plan");
    let rows = G::moe_permute(x.clone(), &plan);
    let bank = &layer.experts;
    let (gate, up, down) = (bank.gate.val(), bank.up.val(), bank.down.val());
    let y = G::moe_grouped_swiglu(rows.clone(), gate.clone(), up.clone(), down.clone(), &plan);
    let emit_stage = |what, (first_ms, ms)| {
        emit(args, Row { shape: sh.name, tokens: t, mode: "fwd", what, flops: 0.0, first_ms, ms });
    };
    let (w, r) = (args.warmup, args.reps);
    emit_stage("select", time::<G, _>(device, w, r, || G::moe_select_experts(choice.clone(), &selection)));
    emit_stage("count", time::<G, _>(device, w, r, || G::moe_expert_counts(routing.expert_ids.clone(), sh.e)));
    emit_stage(
        "plan",
        time::<G, _>(device, w, r, || {
            G::moe_plan(routing.expert_ids.clone(), None, sh.e, CapacityLimit::Dropless).expect("valid plan")
        }),
    );
    emit_stage("permute", time::<G, _>(device, w, r, || G::moe_permute(x.clone(), &plan)));
    emit_stage(
        "swiglu",
        time::<G, _>(device, w, r, || {
            G::moe_grouped_swiglu(rows.clone(), gate.clone(), up.clone(), down.clone(), &plan)
        }),
    );
    emit_stage("combine", time::<G, _>(device, w, r, || G::moe_combine(y.clone(), routing.weights.clone(), &plan)));
    if let Some(shared) = &layer.shared {
        emit_stage("shared", time::<G, _>(device, w, r, || shared.forward(x.clone())));
    }
}

fn main() {
    let args = parse_args();
    let device = Default::default();
    G::seed(&device, 0);
    let sh = args.shape;
    let fwd = args.mode == "fwd";
    let wants = |w: &str| args.what.iter().any(|x| x == w);

    if fwd && wants("mm8192") {
        let n = 8192;
        let a = Tensor::<G, 2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<G, 2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
        let (first, ms) = time::<G, _>(&device, args.warmup, args.reps, || a.clone().matmul(b.clone()));
        emit(
            &args,
            Row {
                shape: "mm",
                tokens: n,
                mode: "fwd",
                what: "mm8192",
                flops: 2.0 * (n as f64).powi(3),
                first_ms: first,
                ms,
            },
        );
        drop((a, b));
        G::memory_cleanup(&device);
    }

    let mode = if fwd { "fwd" } else { "fwdbwd" };
    for &t in &args.tokens {
        let flops = sh.flops_fwd(t) * if fwd { 1.0 } else { 3.0 };
        let row = |what, (first_ms, ms)| Row { shape: sh.name, tokens: t, mode, what, flops, first_ms, ms };
        if wants("layer") {
            let timed = if fwd {
                let layer = sh.layer::<G>(&device);
                let x = Tensor::<G, 3>::random([1, t, sh.d], Distribution::Normal(0.0, 1.0), &device);
                time::<G, _>(&device, args.warmup, args.reps, || layer.forward(x.clone()).expect("valid").0)
            } else {
                let layer = sh.layer::<Ad>(&device);
                let x = Tensor::<Ad, 3>::random([1, t, sh.d], Distribution::Normal(0.0, 1.0), &device);
                time_fwdbwd(&args, &device, x, |x| layer.forward(x).expect("valid").0)
            };
            emit(&args, row("layer", timed));
            G::memory_cleanup(&device);
        }
        for what in ["gemm", "gemm_wgrad"] {
            if wants(what) && fwd {
                let (first, ms, flops) = time_grouped_gemm(&args, t, what == "gemm_wgrad");
                emit(&args, Row { shape: sh.name, tokens: t, mode: "fwd", what, flops, first_ms: first, ms });
                G::memory_cleanup(&device);
            }
        }
        if wants("router") && fwd {
            let layer = sh.layer::<G>(&device);
            let x = Tensor::<G, 2>::random([t, sh.d], Distribution::Normal(0.0, 1.0), &device);
            let (first, ms) = time::<G, _>(&device, args.warmup, args.reps, || {
                use moe_kernels::MoeBackend;
                layer.router.forward_with(x.clone(), G::moe_select_experts, G::moe_expert_counts)
            });
            emit(
                &args,
                Row { shape: sh.name, tokens: t, mode: "fwd", what: "router", flops: 0.0, first_ms: first, ms },
            );
            drop(layer);
            G::memory_cleanup(&device);
        }
        if wants("stages") && fwd {
            time_stages(&args, &device, t);
            G::memory_cleanup(&device);
        }
        if wants("dense") {
            let width = (sh.k + sh.s) * sh.h;
            let timed = if fwd {
                let mlp = SwiGluConfig::new(sh.d, width).init::<G>(&device);
                let x = Tensor::<G, 2>::random([t, sh.d], Distribution::Normal(0.0, 1.0), &device);
                time::<G, _>(&device, args.warmup, args.reps, || mlp.forward(x.clone()))
            } else {
                let mlp = SwiGluConfig::new(sh.d, width).init::<Ad>(&device);
                let x = Tensor::<Ad, 2>::random([t, sh.d], Distribution::Normal(0.0, 1.0), &device);
                time_fwdbwd(&args, &device, x, |x| mlp.forward(x))
            };
            emit(&args, row("dense", timed));
            G::memory_cleanup(&device);
        }
    }
}
