//! `cargo xtask bench`: runs `benches/` with criterion, then tabulates criterion's estimates.
//! `--backend cuda` (bf16 on burn-cuda) or `--backend wgpu` (f32 on burn-wgpu: WGSL has no bf16)
//! builds and runs the GPU timing binary `moe-gpu-bench` and PyTorch's baselines (bf16, on the
//! same GPU), then prints both with their ratios.

use clap::{Args, ValueEnum};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// CPU backends the benches can be built with.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum CpuBackend {
    /// burn-ndarray, pure Rust.
    Ndarray,
    /// burn-flex, pure Rust with SIMD (the default: the fastest a fresh clone builds).
    Flex,
    /// burn-ndarray on the system OpenBLAS (needs libopenblas-dev).
    Blas,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Which backend to run on: `cpu` (criterion benches), `cuda` (the GPU timing binary in
    /// bf16 and PyTorch's baselines; needs an NVIDIA GPU and, for the baselines, python3 with
    /// torch) or `wgpu` (the same with the binary in f32 on burn-wgpu; needs a Vulkan driver).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// The CPU backend to build the benches with.
    #[arg(long, value_enum, default_value = "flex")]
    cpu: CpuBackend,
    /// Only benches whose id contains this (criterion filter).
    #[arg(long)]
    filter: Option<String>,
    /// Print the table from the last run's results without running anything.
    #[arg(long)]
    report_only: bool,
    /// Time training instead of one layer: `small` with `moe-runner` beside PyTorch's
    /// `torch_train_bench.py` (GPU backends only; `--prebuilt` takes both from a folder).
    #[arg(long)]
    train: bool,
    #[command(flatten)]
    gpu: GpuArgs,
}

/// Flags of `--backend cuda` and `--backend wgpu`.
#[derive(Args)]
pub(crate) struct GpuArgs {
    /// Token counts T of the GPU rows.
    #[arg(long, default_value = "4096,8192,16384")]
    pub(crate) tokens: String,
    /// Shapes of the GPU rows: `dsv3` (d 7168, h 2048, E 256, K 8, 1 shared, 8 groups keep 4)
    /// and/or `small` (d 1024, h 512, E 64, K 6, 2 shared).
    #[arg(long, default_value = "small,dsv3")]
    pub(crate) shapes: String,
    /// Passes of the GPU rows: `fwd` and/or `fwdbwd`.
    #[arg(long, default_value = "fwd,fwdbwd")]
    pub(crate) modes: String,
    /// Untimed iterations before each GPU row (autotune and kernel compilation happen here).
    #[arg(long, default_value_t = 3)]
    pub(crate) warmup: usize,
    /// Timed iterations per GPU row (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub(crate) reps: usize,
    /// Where the GPU results go (`ours.jsonl`, `torch.json`, `memory.txt`, `table.md`); by
    /// default `target/gpu-bench`, and `target/gpu-bench-wgpu` for wgpu so that both are kept.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Copy the built binary and PyTorch's script here (for a machine without cargo), and stop.
    #[arg(long)]
    pub(crate) stage: Option<PathBuf>,
    /// Use `moe-gpu-bench` (and `torch_moe_bench.py`) from this folder instead of building.
    #[arg(long)]
    pub(crate) prebuilt: Option<PathBuf>,
    /// Skip PyTorch's baselines.
    #[arg(long)]
    pub(crate) skip_torch: bool,
    /// Wall-clock limit of each child run, in seconds (one per shape and mode); a cold start
    /// compiles and autotunes kernels first.
    #[arg(long, default_value_t = 1200)]
    pub(crate) timeout: u64,
    /// Wall-clock limit of PyTorch's run, in seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) torch_timeout: u64,
    /// Add to the results already in `--out` instead of starting afresh (to split the rows over
    /// several runs).
    #[arg(long)]
    pub(crate) append: bool,
    /// What `moe-gpu-bench` times (its `--what`), instead of the default rows per shape and mode.
    #[arg(long)]
    pub(crate) what: Option<String>,
    /// `--train`: optimizer steps of each run.
    #[arg(long, default_value_t = 30)]
    pub(crate) train_steps: usize,
    /// `--train`: our runs, one per `train.precision`.
    #[arg(long, default_value = "bf16")]
    pub(crate) precisions: String,
    /// `--train`: PyTorch's modes (`f32`, `tf32`, `bf16`, `bf16-compile`).
    #[arg(long, default_value = "bf16,bf16-compile")]
    pub(crate) torch_modes: String,
}

const TOKENS: f64 = 4096.0;

pub(crate) fn run(args: &BenchArgs) -> Result<(), String> {
    match args.backend.as_str() {
        "cpu" => {}
        "cuda" | "wgpu" if args.train => return crate::train_bench::run(&args.gpu, &args.backend),
        "cuda" | "wgpu" => return run_gpu(&args.gpu, &args.backend, args.report_only),
        _ if args.train => return Err("--train: expected a GPU backend, `--backend cuda` or `wgpu`".into()),
        other => return Err(format!("--backend {other}: expected `cpu`, `cuda` or `wgpu`")),
    }
    let root = workspace_root();
    if !args.report_only {
        let feature = match args.cpu {
            CpuBackend::Ndarray => "ndarray",
            CpuBackend::Flex => "flex",
            CpuBackend::Blas => "blas",
        };
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(&root).args([
            "bench",
            "-p",
            "moe-benches",
            "--no-default-features",
            "--features",
            feature,
            "--",
        ]);
        if let Some(filter) = &args.filter {
            cmd.arg(filter);
        }
        let status = cmd.status().map_err(|e| format!("could not start cargo: {e}"))?;
        if !status.success() {
            return Err(format!("cargo bench failed: {status}"));
        }
    }
    print_table(&root.join("target/criterion"))
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Mean time in milliseconds of one criterion bench, if it ran.
fn mean_ms(dir: &Path, group: &str, function: &str, param: &str) -> Option<f64> {
    let path = dir.join(group).join(function).join(param).join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(json["mean"]["point_estimate"].as_f64()? / 1e6)
}

/// The `(E, K, S)` shapes criterion holds results for, read from its folder names
/// (`E64_K6_S2`), so the table follows whatever the benches ran.
fn measured_shapes(dir: &Path) -> Vec<(usize, usize, usize)> {
    let mut shapes: Vec<(usize, usize, usize)> = ["moe_layer_fwd", "moe_layer_fwdbwd"]
        .iter()
        .filter_map(|group| std::fs::read_dir(dir.join(group).join("sorted")).ok())
        .flatten()
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let mut parts = name.split('_');
            let mut field = |prefix: char| parts.next()?.strip_prefix(prefix)?.parse().ok();
            Some((field('E')?, field('K')?, field('S')?))
        })
        .collect();
    shapes.sort_by_key(|&(e, k, s)| (s, e, k));
    shapes.dedup();
    shapes
}

fn print_table(dir: &Path) -> Result<(), String> {
    let shapes = measured_shapes(dir);
    println!("\nMoE layer, T = 4096, d = 512, h = 256 (mean of criterion samples)\n");
    println!(
        "| E | K | S | fwd sorted ms | fwd loop ms | speed-up | tokens/s fwd | fwd+bwd sorted ms | fwd+bwd loop ms | speed-up |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut any = false;
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}x", b / a),
        _ => "-".into(),
    };
    for (e, k, s) in shapes {
        let p = format!("E{e}_K{k}_S{s}");
        let fs = mean_ms(dir, "moe_layer_fwd", "sorted", &p);
        let fl = mean_ms(dir, "moe_layer_fwd", "loop", &p);
        let bs = mean_ms(dir, "moe_layer_fwdbwd", "sorted", &p);
        let bl = mean_ms(dir, "moe_layer_fwdbwd", "loop", &p);
        any |= fs.is_some() || bs.is_some();
        let tps = fs.map_or("-".into(), |ms| format!("{:.0}", TOKENS / (ms / 1e3)));
        println!(
            "| {e} | {k} | {s} | {} | {} | {} | {tps} | {} | {} | {} |",
            fmt(fs),
            fmt(fl),
            ratio(fs, fl),
            fmt(bs),
            fmt(bl),
            ratio(bs, bl)
        );
    }
    if !any {
        return Err(format!("no results under {}: run `cargo xtask bench` first", dir.display()));
    }
    println!("\nE-scaling, time(E=256) / time(E=8) at equal K (sorted dispatch; the MoE promise is ~1):\n");
    println!("| K | fwd | fwd+bwd |");
    println!("|---|---|---|");
    for k in [2, 6, 8] {
        let scale = |group: &str| {
            ratio(
                mean_ms(dir, group, "sorted", &format!("E8_K{k}_S0")),
                mean_ms(dir, group, "sorted", &format!("E256_K{k}_S0")),
            )
            .replace('x', "")
        };
        println!("| {k} | {} | {} |", scale("moe_layer_fwd"), scale("moe_layer_fwdbwd"));
    }
    println!("\nRouter alone:\n");
    for p in ["E8_K2_G1_1", "E64_K6_G1_1", "E256_K8_G1_1", "E256_K8_G8_4"] {
        if let Some(ms) = mean_ms(dir, "router_fwd", p, "") {
            println!("- router {p}: {ms:.2} ms");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GPU: `--backend cuda` and `--backend wgpu`.

const BIN: &str = "moe-gpu-bench";
const TORCH_SCRIPT: &str = "torch_moe_bench.py";
/// Dense bf16 peak the table's fractions are of (H200, the number).
const PEAK_TFLOPS: f64 = 759.0;

pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

/// Builds `moe-gpu-bench` (release, `--features cuda` or `wgpu`: the backend with fusion and
/// autotune).
fn build_gpu_bench(root: &Path, backend: &str) -> Result<PathBuf, String> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).args(["build", "--release", "-p", "moe-benches", "--features", backend, "--bin", BIN]);
    let status = cmd.status().map_err(|e| format!("could not start cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of {BIN} failed: {status}"));
    }
    Ok(target_dir(root).join("release").join(BIN))
}

/// Samples the GPU's used memory (MiB) every 250 ms through `nvidia-smi` while alive.
struct MemorySampler {
    child: std::process::Child,
    reader: std::thread::JoinHandle<Vec<u64>>,
}

impl MemorySampler {
    fn start() -> Option<Self> {
        let mut child = Command::new("nvidia-smi")
            .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "250"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdout = child.stdout.take()?;
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout).lines().map_while(Result::ok).filter_map(|l| l.trim().parse().ok()).collect()
        });
        Some(Self { child, reader })
    }

    /// Stops sampling; returns (first sample, peak) in MiB.
    fn stop(mut self) -> Option<(u64, u64)> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let samples = self.reader.join().ok()?;
        Some((*samples.first()?, *samples.iter().max()?))
    }
}

/// How a child run ended.
pub(crate) struct Finished {
    /// Its exit status, or why it has none.
    pub(crate) outcome: String,
    /// The GPU's peak used memory while it ran, when sampled.
    pub(crate) peak_mib: Option<u64>,
}

/// Runs `cmd` with a wall-clock limit; adds a line to the log.
pub(crate) fn run_limited(label: &str, mut cmd: Command, limit: Duration, memory_log: &mut String) -> Finished {
    println!("\n== {label}");
    let sampler = MemorySampler::start();
    let started = Instant::now();
    let outcome = match cmd.spawn() {
        Err(e) => format!("could not start: {e}"),
        Ok(mut child) => loop {
            match child.try_wait() {
                Ok(Some(status)) => break format!("{status}"),
                Ok(None) if started.elapsed() > limit => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break format!("killed after the {} s limit", limit.as_secs());
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => break format!("wait failed: {e}"),
            }
        },
    };
    let secs = started.elapsed().as_secs_f64();
    let memory = sampler.and_then(MemorySampler::stop);
    let line = match memory {
        Some((base, peak)) => {
            format!("{label}: {outcome}, {secs:.1} s, GPU memory used {base} MiB at start, peak {peak} MiB")
        }
        None => format!("{label}: {outcome}, {secs:.1} s, GPU memory not sampled (no nvidia-smi)"),
    };
    println!("-- {line}");
    memory_log.push_str(&line);
    memory_log.push('\n');
    Finished { outcome, peak_mib: memory.map(|(_, peak)| peak) }
}

fn run_gpu(args: &GpuArgs, backend: &str, report_only: bool) -> Result<(), String> {
    // With --prebuilt the checkout may sit elsewhere than where xtask was built (a GPU machine
    // without cargo): work from the current directory, the repository's root there.
    let root = match &args.prebuilt {
        Some(_) => std::env::current_dir().map_err(|e| format!("current directory: {e}"))?,
        None => workspace_root(),
    };
    let out = match &args.out {
        Some(out) => out.clone(),
        None if backend == "cuda" => PathBuf::from("target/gpu-bench"),
        None => PathBuf::from(format!("target/gpu-bench-{backend}")),
    };
    let out = if out.is_absolute() { out } else { root.join(out) };
    if !report_only {
        let (bin, script) = match &args.prebuilt {
            Some(dir) => (dir.join(BIN), dir.join(TORCH_SCRIPT)),
            None => (build_gpu_bench(&root, backend)?, root.join("..").join("shared/tools").join(TORCH_SCRIPT)),
        };
        if let Some(stage) = &args.stage {
            std::fs::create_dir_all(stage).map_err(|e| format!("{}: {e}", stage.display()))?;
            std::fs::copy(&bin, stage.join(BIN)).map_err(|e| format!("copy {}: {e}", bin.display()))?;
            match std::fs::copy(&script, stage.join(TORCH_SCRIPT)) {
                Ok(_) => {}
                Err(e) => println!("note: PyTorch's script not staged ({}: {e})", script.display()),
            }
            println!("staged {BIN} and {TORCH_SCRIPT} in {}", stage.display());
            return Ok(());
        }
        std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let rows = out.join("ours.jsonl");
        let mut memory_log = String::new();
        if args.append {
            memory_log = std::fs::read_to_string(out.join("memory.txt")).unwrap_or_default();
        } else {
            let _ = std::fs::remove_file(&rows);
            let _ = std::fs::remove_file(out.join("torch.json"));
        }
        let limit = Duration::from_secs(args.timeout);
        for shape in args.shapes.split(',') {
            for mode in args.modes.split(',') {
                let what = match (args.what.as_deref(), shape, mode) {
                    (Some(what), _, _) => what,
                    (None, "small", "fwd") => "mm8192,layer,router,dense",
                    (None, _, "fwd") => "layer,router,dense",
                    (None, _, _) => "layer,dense",
                };
                let mut cmd = Command::new(&bin);
                cmd.current_dir(&root).args([
                    "--backend",
                    backend,
                    "--shape",
                    shape,
                    "--mode",
                    mode,
                    "--tokens",
                    &args.tokens,
                    "--what",
                    what,
                ]);
                cmd.args(["--warmup", &args.warmup.to_string(), "--reps", &args.reps.to_string()]);
                cmd.arg("--out").arg(&rows);
                run_limited(&format!("ours {shape} {mode}"), cmd, limit, &mut memory_log);
            }
        }
        if !args.skip_torch {
            if script.exists() {
                let mut cmd = Command::new("python3");
                cmd.current_dir(&root).arg(&script).arg(out.join("torch.json")).arg(&args.tokens);
                run_limited("pytorch", cmd, Duration::from_secs(args.torch_timeout), &mut memory_log);
            } else {
                println!("PyTorch's script not found at {}: no baselines", script.display());
            }
        }
        std::fs::write(out.join("memory.txt"), &memory_log).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let table = gpu_table(&out, backend)?;
    println!("\n{table}");
    std::fs::write(out.join("table.md"), &table).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(())
}

/// Our rows, from `ours.jsonl`.
fn our_rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("ours.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn our_ms(rows: &[serde_json::Value], shape: &str, tokens: u64, mode: &str, what: &str) -> Option<f64> {
    rows.iter()
        .find(|r| r["shape"] == shape && r["tokens"].as_u64() == Some(tokens) && r["mode"] == mode && r["what"] == what)
        .and_then(|r| r["median_ms"].as_f64())
}

/// The markdown table: ours against PyTorch's per row, with TFLOP/s on active FLOPs.
fn gpu_table(out: &Path, backend: &str) -> Result<String, String> {
    use std::fmt::Write;
    let rows = our_rows(out);
    let torch: serde_json::Value = std::fs::read_to_string(out.join("torch.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    if rows.is_empty() && torch.is_null() {
        return Err(format!(
            "no GPU results under {}: run `cargo xtask bench --backend {backend}` first",
            out.display()
        ));
    }
    // Rows written before the binary recorded its float type were all bf16.
    let dtype = |r: &serde_json::Value| r["dtype"].as_str().unwrap_or("bf16").to_string();
    let ours_dtype = rows.first().map_or_else(|| "bf16".into(), dtype);
    let shapes: &[(&str, usize, usize, usize, usize, usize)] =
        &[("dsv3", 7168, 2048, 256, 8, 1), ("small", 1024, 512, 64, 6, 2)];
    let mut tokens: Vec<u64> =
        rows.iter().filter(|r| r["what"] != "mm8192").filter_map(|r| r["tokens"].as_u64()).collect();
    if let Some(obj) = torch.as_object() {
        tokens.extend(obj.keys().filter_map(|k| k.split('/').next()?.rsplit("_T").next()?.parse::<u64>().ok()));
    }
    tokens.sort_unstable();
    tokens.dedup();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "One MoE layer, ours in {ours_dtype} and PyTorch in bf16, median ms; TFLOP/s on active FLOPs (T (K+S) 3 2 d h forward, 3x for fwd+bwd), % of {PEAK_TFLOPS} TFLOP/s."
    );
    let _ = writeln!(
        s,
        "ours = MoeLayer::forward on the CubeCL kernels of moe-kernels (the portable Padded path under MOE_KERNELS=portable); dense = a dense SwiGLU of width (K+S) h in burn (same FLOPs); torch-g = sort + torch._grouped_mm, torch-l = per-expert loop.\n"
    );
    let _ = writeln!(
        s,
        "| shape | T | pass | ours ms | ours TFLOP/s | % peak | dense ms | ours/dense | torch-g ms | torch-g TFLOP/s | torch-l ms | ours/torch-g | ours/torch-l |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let fmt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    for &(shape, d, h, _e, k, sh) in shapes {
        for &t in &tokens {
            for (mode, torch_key, mult) in [("fwd", "fwd_ms", 1.0), ("fwdbwd", "fwdbwd_ms", 3.0)] {
                let flops = (t as usize * (k + sh) * 3 * 2 * d * h) as f64 * mult;
                let ours = our_ms(&rows, shape, t, mode, "layer");
                let dense = our_ms(&rows, shape, t, mode, "dense");
                let tg = torch[format!("{shape}_T{t}/grouped")][torch_key].as_f64();
                let tl = torch[format!("{shape}_T{t}/loop")][torch_key].as_f64();
                if ours.is_none() && tg.is_none() && tl.is_none() {
                    continue;
                }
                let tf = |ms: Option<f64>| ms.map(|ms| flops / ms / 1e9);
                let _ = writeln!(
                    s,
                    "| {shape} | {t} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    if mode == "fwd" { "fwd" } else { "fwd+bwd" },
                    fmt(ours, 2),
                    fmt(tf(ours), 1),
                    fmt(tf(ours).map(|v| v / PEAK_TFLOPS * 100.0), 1),
                    fmt(dense, 2),
                    ratio(ours, dense),
                    fmt(tg, 2),
                    fmt(tf(tg), 1),
                    fmt(tl, 2),
                    ratio(ours, tg),
                    ratio(ours, tl),
                );
            }
        }
    }
    let router: Vec<String> = rows
        .iter()
        .filter(|r| r["what"] == "router")
        .map(|r| {
            format!(
                "{} T {}: {:.2} ms",
                r["shape"].as_str().unwrap_or("?"),
                r["tokens"],
                r["median_ms"].as_f64().unwrap_or(f64::NAN)
            )
        })
        .collect();
    if !router.is_empty() {
        let _ = writeln!(s, "\nRouter alone (forward, ours): {}", router.join("; "));
    }
    if let Some(mm) = rows.iter().find(|r| r["what"] == "mm8192") {
        let _ =
            write!(s, "\n{} 8192^3 matmul: burn {:.1} TFLOP/s", dtype(mm), mm["tflops"].as_f64().unwrap_or(f64::NAN));
    }
    if let Some(v) = torch["bf16_matmul_tflops"].as_f64() {
        let _ = write!(s, "; PyTorch {v:.1} TFLOP/s; copy {:.2} TB/s", torch["copy_tbps"].as_f64().unwrap_or(f64::NAN));
    }
    let errors: Vec<String> = torch
        .as_object()
        .map(|o| {
            o.iter().filter(|(_, v)| v.get("error").is_some()).map(|(k, v)| format!("{k}: {}", v["error"])).collect()
        })
        .unwrap_or_default();
    if !errors.is_empty() {
        let _ = write!(s, "\n\nPyTorch errors: {}", errors.join("; "));
    }
    if let Ok(mem) = std::fs::read_to_string(out.join("memory.txt")) {
        let _ = write!(s, "\n\nRuns:\n{mem}");
    }
    Ok(s)
}
