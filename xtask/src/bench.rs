//! `cargo xtask bench`: runs `benches/` with criterion, then tabulates criterion's estimates.

use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::Command;

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
    /// Which backend to run on. Only `cpu` exists until the GPU kernels land.
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
}

const TOKENS: f64 = 4096.0;

pub(crate) fn run(args: &BenchArgs) -> Result<(), String> {
    if args.backend != "cpu" {
        return Err(format!(
            "--backend {}: only `cpu` is benchmarked so far (GPU benches come with the CubeCL kernels)",
            args.backend
        ));
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
