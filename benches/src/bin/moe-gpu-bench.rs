//! GPU timing of one MoE layer on `--backend cuda` (`burn::backend::Cuda<bf16, i32>`, feature
//! `cuda`) or `--backend wgpu` (`burn::backend::Wgpu<f32, i32>`, feature `wgpu`: WGSL, the shader
//! language of wgpu on NVIDIA's Vulkan driver, has no bf16), fusion + autotune on, through the
//! CubeCL kernels of `moe_kernels::cube`, or the portable `MoeBackend` path with
//! `MOE_KERNELS=portable` (each row's JSON says which: `"path"`, and in which float type:
//! `"dtype"`). Run by `cargo xtask bench --backend cuda|wgpu`, which also runs PyTorch's
//! baselines and prints the ratios.
//!
//! Method (a plain timing binary, not criterion: see docs/performance.md, "What is measured, and how"): for each row,
//! `--warmup` untimed iterations first (cubecl autotunes and compiles kernels on first calls),
//! then `--reps` timed iterations; each timed iteration is `Instant::now()`, the work, then
//! `Backend::sync` (which flushes the fusion queue and waits for the device) before the clock
//! stops. The row reports the median, min and max, and `enqueue_ms`: the median host time until
//! the work was handed over, before the sync (burn-fusion may still run queued operations'
//! host work inside the sync). With `--batch N` a repetition is N runs back to back before one
//! sync, reported per run. The device's memory pool is cleaned between
//! rows. One JSON object per row is appended to `--out` as soon as the row is done, so a later
//! crash or timeout keeps the rows before it.
//!
//! What is timed, per (shape, T):
//! - `layer`: `MoeLayer::forward` (router + sorted dispatch, Padded layout, + shared experts);
//!   forward, or forward + backward of `mean(y^2)` (in f32) with gradients of the input and of
//!   every weight (`Autodiff` of the backend).
//! - `dense`: a dense SwiGLU of width `(K + S) * h` on the same T tokens: exactly the layer's
//!   active FLOPs, through the same burn matmuls, so the ceiling burn reaches on this work.
//! - `router`: the router alone (forward only).
//! - `gemm`: the grouped GEMM kernel alone (`moe_kernels::cube`), `[T K, d] x [E, d, h]` with
//!   every expert owning `T K / E` rows (balanced routing), forward only; `gemm_wgrad`: its
//!   weight-gradient product `[T K, d]^T [T K, h]` per expert; `gemm_down`: the down
//!   projection's shape, `[T K, h] x [E, h, d]`. `MOE_GEMM_TILE` picks the tile.
//! - `stages`: the forward's pieces one at a time on the same routing, so their sum can be set
//!   against the `layer` row: `select` and `count` (the router's selection and per-expert
//!   counts alone), `plan`, `permute`,
//!   `swiglu` (the grouped expert MLPs), `combine`, `shared` (the shared experts).
//! - `launches`: the host's cost per kernel launch, through fusion and without (see
//!   `time_launches`).
//! - `mm8192`: a plain 8192^3 matmul in the backend's float type through burn (once, forward
//!   mode), against PyTorch's `bf16_matmul_tflops`.

#![allow(missing_docs)]

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
compile_error!("moe-gpu-bench needs feature `cuda` or `wgpu`");

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, FloatDType, Tensor};
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement};
use moe_experts::{MoeLayer, MoeLayerConfig, SwiGluConfig};
use moe_kernels::MoeBackend;
use moe_kernels::cube::MoeCubeKernels;
use moe_router::RouterConfig;
use std::io::Write;
use std::time::Instant;

/// A backend the binary times, with what its `gemm` rows need to launch the kernels on the
/// cube runtime under fusion directly.
trait GpuBackend: MoeBackend {
    type Runtime: CubeRuntime;
    type Float: FloatElement;
    /// The float type's name in the JSON rows.
    const DTYPE: &'static str;
}

#[cfg(feature = "cuda")]
impl GpuBackend for burn::backend::Cuda<burn::tensor::bf16, i32> {
    type Runtime = cubecl::cuda::CudaRuntime;
    type Float = burn::tensor::bf16;
    const DTYPE: &'static str = "bf16";
}

#[cfg(feature = "wgpu")]
impl GpuBackend for burn::backend::Wgpu<f32, i32> {
    type Runtime = cubecl::wgpu::WgpuRuntime;
    type Float = f32;
    const DTYPE: &'static str = "f32";
}

/// Every row `Args` asks for, on one backend.
type Run = fn(&Args);

/// The `--backend` values this build has, the default first, each with its run.
const BACKENDS: &[(&str, Run)] = &[
    #[cfg(feature = "cuda")]
    ("cuda", run::<burn::backend::Cuda<burn::tensor::bf16, i32>>),
    #[cfg(feature = "wgpu")]
    ("wgpu", run::<burn::backend::Wgpu<f32, i32>>),
];

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
    /// `run` on the `--backend`.
    run: Run,
    shape: Shape,
    mode: String,
    tokens: Vec<usize>,
    what: Vec<String>,
    schedule: Schedule,
    out: Option<String>,
}

/// How a row is timed: `warmup` untimed runs, then `reps` timed repetitions of `batch` runs
/// back to back before one sync each (`--batch N` spreads the sync's own latency over N runs;
/// PyTorch's script times one run between CUDA events, which leaves the host's wait out).
#[derive(Clone, Copy)]
struct Schedule {
    warmup: usize,
    reps: usize,
    batch: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: moe-gpu-bench [--backend {}] --shape dsv3|small --mode fwd|fwdbwd [--tokens 4096,8192,16384] \
         [--what layer,dense,router,stages,launches,gemm,gemm_wgrad,gemm_down,mm8192] [--warmup 3] [--reps 10] [--batch 1] [--out rows.jsonl]",
        BACKENDS.iter().map(|b| b.0).collect::<Vec<_>>().join("|")
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        run: BACKENDS[0].1,
        shape: SHAPES[1],
        mode: "fwd".into(),
        tokens: vec![4096, 8192, 16384],
        what: vec!["layer".into(), "dense".into()],
        schedule: Schedule { warmup: 3, reps: 10, batch: 1 },
        out: None,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--backend" => {
                let v = value();
                args.run = BACKENDS.iter().find(|b| b.0 == v).unwrap_or_else(|| usage()).1;
            }
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
            "--warmup" => args.schedule.warmup = value().parse().unwrap_or_else(|_| usage()),
            "--reps" => args.schedule.reps = value().parse().unwrap_or_else(|_| usage()),
            "--batch" => args.schedule.batch = value().parse().unwrap_or_else(|_| usage()),
            "--out" => args.out = Some(value()),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if args.schedule.reps == 0 || args.schedule.batch == 0 {
        usage()
    }
    args
}

/// What [`time`] measured: the first warmup run, the timed repetitions (sorted), each per run,
/// and the median host time per run until the work was handed over (before the sync): when it
/// is close to the row's time, the host's dispatch, not the device, sets the pace.
struct Timing {
    first_ms: f64,
    ms: Vec<f64>,
    enqueue_ms: f64,
}

/// Runs `f` on `schedule`, each timed repetition ended by a device sync.
/// The closure returns what it computed, held until after the sync so that no lazy backend
/// can skip work whose result is dropped unread.
fn time<B: Backend, R>(device: &B::Device, schedule: Schedule, mut f: impl FnMut() -> R) -> Timing {
    let Schedule { warmup, reps, batch } = schedule;
    let mut first_ms = f64::NAN;
    for i in 0..warmup {
        let start = Instant::now();
        let kept = f();
        B::sync(device).expect("device sync");
        drop(kept);
        if i == 0 {
            first_ms = start.elapsed().as_secs_f64() * 1e3;
        }
    }
    let per_run = |start: Instant| start.elapsed().as_secs_f64() * 1e3 / batch as f64;
    let (mut ms, mut enqueue): (Vec<f64>, Vec<f64>) = (0..reps)
        .map(|_| {
            let start = Instant::now();
            let kept: Vec<R> = (0..batch).map(|_| f()).collect();
            let enqueued = per_run(start);
            B::sync(device).expect("device sync");
            let ms = per_run(start);
            drop(kept);
            (ms, enqueued)
        })
        .unzip();
    ms.sort_by(f64::total_cmp);
    enqueue.sort_by(f64::total_cmp);
    Timing { first_ms, ms, enqueue_ms: median(&enqueue) }
}

/// Times forward + backward through `forward` from `x`: the loss is `mean(y^2)` in f32, and
/// the input's gradient is read, so every weight's and the input's gradient are computed.
fn time_fwdbwd<B: Backend, const D: usize>(
    args: &Args,
    device: &B::Device,
    x: Tensor<Autodiff<B>, D>,
    forward: impl Fn(Tensor<Autodiff<B>, D>) -> Tensor<Autodiff<B>, D>,
) -> Timing {
    let x = x.require_grad();
    time::<Autodiff<B>, _>(device, args.schedule, || {
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
    timing: Timing,
}

fn emit<B: GpuBackend>(args: &Args, row: Row<'_>) {
    let Timing { first_ms, ms, enqueue_ms } = &row.timing;
    let med = median(ms);
    let tflops = if row.flops > 0.0 { row.flops / med / 1e9 } else { f64::NAN };
    let json = format!(
        "{{\"shape\":\"{}\",\"tokens\":{},\"mode\":\"{}\",\"what\":\"{}\",\"median_ms\":{:.4},\"min_ms\":{:.4},\
         \"max_ms\":{:.4},\"first_ms\":{:.2},\"reps\":{},\"warmup\":{},\"flops\":{:.6e},\"tflops\":{},\"path\":\"{}\",\"dtype\":\"{}\",\"enqueue_ms\":{:.4},\"batch\":{}}}",
        row.shape,
        row.tokens,
        row.mode,
        row.what,
        med,
        ms[0],
        ms[ms.len() - 1],
        first_ms,
        ms.len(),
        args.schedule.warmup,
        row.flops,
        if tflops.is_finite() { format!("{tflops:.2}") } else { "null".into() },
        if moe_kernels::cube::kernels_enabled() { "kernels" } else { "portable" },
        B::DTYPE,
        enqueue_ms,
        args.schedule.batch,
    );
    println!(
        "{:<6} T {:>6} {:<7} {:<7} median {:>9.3} ms (min {:.3}, max {:.3}, first {:.0} ms, host {:.3} ms)  {:>7.1} TFLOP/s  {:>5.1}% of 759",
        row.shape,
        row.tokens,
        row.mode,
        row.what,
        med,
        ms[0],
        ms[ms.len() - 1],
        first_ms,
        enqueue_ms,
        tflops,
        tflops / 759.0 * 100.0
    );
    if let Some(path) = &args.out {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open --out");
        writeln!(f, "{json}").expect("write --out");
    }
}

/// The grouped GEMM kernel alone on the cube runtime `R` in float `F`: balanced segments of
/// `T K / E` rows (the last takes the remainder), for `what` = `gemm`, `gemm_wgrad` or
/// `gemm_down`. Returns the timing and the FLOPs.
fn time_grouped_gemm<R: CubeRuntime, F: FloatElement>(args: &Args, t: usize, what: &str) -> (Timing, f64) {
    // No bool tensor is made here, so the bool element does not matter.
    type Inner<R, F> = CubeBackend<R, F, i32, u8>;
    let device = Default::default();
    let sh = args.shape;
    let rows = t * sh.k;
    let mut segments = vec![rows / sh.e; sh.e];
    segments[sh.e - 1] += rows % sh.e;
    let normal = Distribution::Normal(0.0, 1.0);
    let (d, h) = if what == "gemm_down" { (sh.h, sh.d) } else { (sh.d, sh.h) };
    let x = Tensor::<Inner<R, F>, 2>::random([rows, d], normal, &device).into_primitive().tensor();
    // The backend's own choice of kernel, as the layer makes it (`MOE_WGMMA=off` for the cube one).
    let timing = if what == "gemm_wgrad" {
        let g = Tensor::<Inner<R, F>, 2>::random([rows, h], normal, &device).into_primitive().tensor();
        time::<Inner<R, F>, _>(&device, args.schedule, || {
            <Inner<R, F> as MoeCubeKernels>::grouped_gemm_weight_grad(x.clone(), g.clone(), &segments)
        })
    } else {
        let w = Tensor::<Inner<R, F>, 3>::random([sh.e, d, h], normal, &device).into_primitive().tensor();
        time::<Inner<R, F>, _>(&device, args.schedule, || {
            <Inner<R, F> as MoeCubeKernels>::grouped_gemm(x.clone(), w.clone(), &segments)
        })
    };
    (timing, 2.0 * (rows * sh.d * sh.h) as f64)
}

/// The `stages` rows: each piece of the layer's forward timed alone, on one routing of `t`
/// random tokens.
fn time_stages<B: GpuBackend>(args: &Args, device: &B::Device, t: usize) {
    use moe_kernels::CapacityLimit;
    let sh = args.shape;
    let layer = sh.layer::<B>(device);
    let x = Tensor::<B, 2>::random([t, sh.d], Distribution::Normal(0.0, 1.0), device);
    let routing = layer.router.forward(x.clone());
    let choice = routing.scores.clone() + layer.router.bias().reshape([1, sh.e]);
    let selection = layer.router.selection();
    let plan = B::moe_plan(routing.expert_ids.clone(), None, sh.e, CapacityLimit::Dropless).expect("valid plan");
    let rows = B::moe_permute(x.clone(), &plan);
    let bank = &layer.experts;
    let (gate, up, down) = (bank.gate.val(), bank.up.val(), bank.down.val());
    let y = B::moe_grouped_swiglu(rows.clone(), gate.clone(), up.clone(), down.clone(), &plan);
    let emit_stage = |what, timing| {
        emit::<B>(args, Row { shape: sh.name, tokens: t, mode: "fwd", what, flops: 0.0, timing });
    };
    let s = args.schedule;
    emit_stage("select", time::<B, _>(device, s, || B::moe_select_experts(choice.clone(), &selection)));
    emit_stage("count", time::<B, _>(device, s, || B::moe_expert_counts(routing.expert_ids.clone(), sh.e)));
    emit_stage(
        "plan",
        time::<B, _>(device, s, || {
            B::moe_plan(routing.expert_ids.clone(), None, sh.e, CapacityLimit::Dropless).expect("valid plan")
        }),
    );
    emit_stage("permute", time::<B, _>(device, s, || B::moe_permute(x.clone(), &plan)));
    emit_stage(
        "swiglu",
        time::<B, _>(device, s, || B::moe_grouped_swiglu(rows.clone(), gate.clone(), up.clone(), down.clone(), &plan)),
    );
    emit_stage("combine", time::<B, _>(device, s, || B::moe_combine(y.clone(), routing.weights.clone(), &plan)));
    if let Some(shared) = &layer.shared {
        // As the layer runs them, and on burn's matmul (the before of routing them through
        // the backend's dense product).
        emit_stage("shared", time::<B, _>(device, s, || shared.forward_moe(x.clone())));
        emit_stage("shared_burn", time::<B, _>(device, s, || shared.forward(x.clone())));
    }
}

/// The `launches` rows: the host's cost per kernel launch, from 1 and from 33 launches of the
/// router's count kernel (a few microseconds of device work each) before one sync, through
/// fusion (`launch1`, `launch33`) and on the cube backend under it (`launch1_raw`,
/// `launch33_raw`). (33-launch row - 1-launch row) / 32 is the cost of a launch when the
/// device is not the bottleneck.
fn time_launches<B: GpuBackend>(args: &Args, device: &B::Device, t: usize) {
    type Inner<R, F> = CubeBackend<R, F, i32, u8>;
    let sh = args.shape;
    let uniform = Distribution::Uniform(0.0, sh.e as f64);
    let ids = Tensor::<B, 2>::random([t, sh.k], uniform, device).int();
    let raw_device = Default::default();
    let raw_ids = Tensor::<Inner<B::Runtime, B::Float>, 2>::random([t, sh.k], uniform, &raw_device).int();
    let s = args.schedule;
    let emit_row =
        |what, timing| emit::<B>(args, Row { shape: sh.name, tokens: t, mode: "fwd", what, flops: 0.0, timing });
    for (what, n) in [("launch1", 1), ("launch33", 33)] {
        emit_row(
            what,
            time::<B, _>(device, s, || (0..n).map(|_| B::moe_expert_counts(ids.clone(), sh.e)).collect::<Vec<_>>()),
        );
        let timing = time::<Inner<B::Runtime, B::Float>, _>(&raw_device, s, || {
            (0..n)
                .map(|_| <Inner<B::Runtime, B::Float> as MoeBackend>::moe_expert_counts(raw_ids.clone(), sh.e))
                .collect::<Vec<_>>()
        });
        emit_row(if n == 1 { "launch1_raw" } else { "launch33_raw" }, timing);
    }
}

fn main() {
    let args = parse_args();
    (args.run)(&args);
}

/// Every row `args` asks for, on backend `B`.
fn run<B: GpuBackend>(args: &Args) {
    let device = Default::default();
    B::seed(&device, 0);
    let sh = args.shape;
    let fwd = args.mode == "fwd";
    let wants = |w: &str| args.what.iter().any(|x| x == w);

    if fwd && wants("mm8192") {
        let n = 8192;
        let a = Tensor::<B, 2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<B, 2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
        let timing = time::<B, _>(&device, args.schedule, || a.clone().matmul(b.clone()));
        emit::<B>(
            args,
            Row { shape: "mm", tokens: n, mode: "fwd", what: "mm8192", flops: 2.0 * (n as f64).powi(3), timing },
        );
        drop((a, b));
        B::memory_cleanup(&device);
    }

    let mode = if fwd { "fwd" } else { "fwdbwd" };
    for &t in &args.tokens {
        let flops = sh.flops_fwd(t) * if fwd { 1.0 } else { 3.0 };
        let row = |what, timing| Row { shape: sh.name, tokens: t, mode, what, flops, timing };
        if wants("layer") {
            let timed = if fwd {
                let layer = sh.layer::<B>(&device);
                let x = Tensor::<B, 3>::random([1, t, sh.d], Distribution::Normal(0.0, 1.0), &device);
                time::<B, _>(&device, args.schedule, || layer.forward(x.clone()).expect("valid").0)
            } else {
                let layer = sh.layer::<Autodiff<B>>(&device);
                let x = Tensor::<Autodiff<B>, 3>::random([1, t, sh.d], Distribution::Normal(0.0, 1.0), &device);
                time_fwdbwd::<B, 3>(args, &device, x, |x| layer.forward(x).expect("valid").0)
            };
            emit::<B>(args, row("layer", timed));
            B::memory_cleanup(&device);
        }
        for what in ["gemm", "gemm_wgrad", "gemm_down"] {
            if wants(what) && fwd {
                let (timing, flops) = time_grouped_gemm::<B::Runtime, B::Float>(args, t, what);
                emit::<B>(args, Row { shape: sh.name, tokens: t, mode: "fwd", what, flops, timing });
                B::memory_cleanup(&device);
            }
        }
        if wants("router") && fwd {
            let layer = sh.layer::<B>(&device);
            let x = Tensor::<B, 2>::random([t, sh.d], Distribution::Normal(0.0, 1.0), &device);
            let timing = time::<B, _>(&device, args.schedule, || layer.router.forward(x.clone()));
            emit::<B>(args, Row { shape: sh.name, tokens: t, mode: "fwd", what: "router", flops: 0.0, timing });
            drop(layer);
            B::memory_cleanup(&device);
        }
        if wants("stages") && fwd {
            time_stages::<B>(args, &device, t);
            B::memory_cleanup(&device);
        }
        if wants("launches") && fwd {
            time_launches::<B>(args, &device, t);
            B::memory_cleanup(&device);
        }
        if wants("dense") {
            let width = (sh.k + sh.s) * sh.h;
            let timed = if fwd {
                let mlp = SwiGluConfig::new(sh.d, width).init::<B>(&device);
                let x = Tensor::<B, 2>::random([t, sh.d], Distribution::Normal(0.0, 1.0), &device);
                time::<B, _>(&device, args.schedule, || mlp.forward(x.clone()))
            } else {
                let mlp = SwiGluConfig::new(sh.d, width).init::<Autodiff<B>>(&device);
                let x = Tensor::<Autodiff<B>, 2>::random([t, sh.d], Distribution::Normal(0.0, 1.0), &device);
                time_fwdbwd::<B, 2>(args, &device, x, |x| mlp.forward(x))
            };
            emit::<B>(args, row("dense", timed));
            B::memory_cleanup(&device);
        }
    }
}
