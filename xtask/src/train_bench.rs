//! `cargo xtask bench --train --backend cuda`: trains the `small` configuration with
//! `moe-runner` and PyTorch's anchor (`torch_train_bench.py`, the same model shape) in one
//! call, then prints tokens/s, the first step's time and peak GPU memory of both, with ratios.
//!
//! Throughput is the median step time of steps 4..N of each run (the first steps compile and
//! tune kernels), as the PyTorch script measures it. Peak memory is `nvidia-smi`'s used memory
//! sampled every 250 ms for both (the whole process: context, allocator pools); PyTorch's own
//! `max_memory_allocated` is shown beside it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::bench::{GpuArgs, run_limited, target_dir, workspace_root};

const RUNNER: &str = "moe-runner";
const TORCH_SCRIPT: &str = "torch_train_bench.py";

/// One run's figures.
struct Row {
    name: String,
    tokens_per_s: Option<f64>,
    first_step_s: Option<f64>,
    peak_mib: Option<u64>,
    final_loss: Option<f64>,
    note: String,
}

pub(crate) fn run(args: &GpuArgs, backend: &str) -> Result<(), String> {
    let root = match &args.prebuilt {
        Some(_) => std::env::current_dir().map_err(|e| format!("current directory: {e}"))?,
        None => workspace_root(),
    };
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("target/train-bench"));
    let out = if out.is_absolute() { out } else { root.join(out) };
    let (runner, script) = match &args.prebuilt {
        Some(dir) => (dir.join(RUNNER), dir.join(TORCH_SCRIPT)),
        None => (build_runner(&root, backend)?, root.join("..").join("shared/tools").join(TORCH_SCRIPT)),
    };
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let steps = args.train_steps;
    let mut rows = Vec::new();
    let mut log = String::new();
    if !args.skip_torch {
        if script.exists() {
            let json = out.join("torch.json");
            let _ = std::fs::remove_file(&json);
            let mut cmd = Command::new("python3");
            cmd.current_dir(&root).arg(&script).arg(&json).arg(steps.to_string()).arg(&args.torch_modes);
            let run = run_limited("pytorch", cmd, Duration::from_secs(args.torch_timeout), &mut log);
            rows.extend(torch_rows(&json, &args.torch_modes, run.peak_mib));
        } else {
            println!("PyTorch's script not found at {}: no baselines", script.display());
        }
    }
    for precision in args.precisions.split(',') {
        let run_dir = out.join(format!("run-{precision}"));
        let _ = std::fs::remove_dir_all(&run_dir);
        let mut cmd = Command::new(&runner);
        cmd.current_dir(&root).args(["train", "--backend", backend, "--config", "configs/small.toml", "--run-dir"]);
        cmd.arg(&run_dir);
        for set in [
            format!("train.steps={steps}"),
            format!("train.precision={precision}"),
            "train.eval_every=0".into(),
            "train.eval_batches=2".into(),
            "train.checkpoint_every=0".into(),
        ] {
            cmd.args(["--set", &set]);
        }
        let run = run_limited(&format!("ours {precision}"), cmd, Duration::from_secs(args.timeout), &mut log);
        rows.push(our_row(&run_dir, precision, run.peak_mib, &run.outcome));
    }
    std::fs::write(out.join("memory.txt"), &log).map_err(|e| format!("{}: {e}", out.display()))?;
    let table = table(&rows, steps);
    println!("\n{table}");
    std::fs::write(out.join("table.md"), &table).map_err(|e| format!("{}: {e}", out.display()))
}

/// Builds `moe-runner` (release) with the backend's feature.
fn build_runner(root: &Path, backend: &str) -> Result<PathBuf, String> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).args(["build", "--release", "-p", "moe-runner", "--features", backend]);
    let status = cmd.status().map_err(|e| format!("could not start cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of {RUNNER} failed: {status}"));
    }
    Ok(target_dir(root).join("release").join(RUNNER))
}

/// The median of the step times after the first three (all of them when there are fewer).
fn median_step(step_ends: &[f64]) -> Option<f64> {
    let mut steps: Vec<f64> = step_ends.windows(2).map(|w| w[1] - w[0]).collect();
    if steps.len() > 3 {
        steps.drain(..2);
    }
    steps.sort_by(f64::total_cmp);
    steps.get(steps.len() / 2).copied()
}

fn our_row(run_dir: &Path, precision: &str, peak_mib: Option<u64>, outcome: &str) -> Row {
    let records: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ends: Vec<f64> = records.iter().filter_map(|r| r["elapsed_s"].as_f64()).collect();
    // Tokens per step, from the configuration the run wrote.
    let config: serde_json::Value = std::fs::read_to_string(run_dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let tokens = config["data"]["batch_size"].as_f64().zip(config["data"]["seq_len"].as_f64()).map(|(b, l)| b * l);
    Row {
        name: format!("burn-moe {precision}"),
        tokens_per_s: median_step(&ends).zip(tokens).map(|(s, t)| t / s),
        first_step_s: ends.first().copied(),
        peak_mib,
        final_loss: records.last().and_then(|r| r["loss"].as_f64()),
        note: if records.is_empty() { format!("no steps ({outcome})") } else { String::new() },
    }
}

fn torch_rows(json: &Path, modes: &str, peak_mib: Option<u64>) -> Vec<Row> {
    let results: serde_json::Value =
        std::fs::read_to_string(json).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
    modes
        .split(',')
        .map(|mode| {
            let r = &results[mode];
            let allocated = r["peak_mem_gb"].as_f64().map(|g| format!("allocated {g:.1} GB")).unwrap_or_default();
            Row {
                name: format!("PyTorch {mode}"),
                tokens_per_s: r["tokens_per_s"].as_f64(),
                first_step_s: r["first_step_s"].as_f64(),
                // The sampler saw every mode of the one process: the largest.
                peak_mib,
                final_loss: r["loss_last"].as_f64(),
                note: if r.is_null() { "no result".into() } else { allocated },
            }
        })
        .collect()
}

fn table(rows: &[Row], steps: usize) -> String {
    let anchor = rows.iter().find(|r| r.name == "PyTorch bf16").and_then(|r| r.tokens_per_s);
    let compiled = rows.iter().find(|r| r.name == "PyTorch bf16-compile").and_then(|r| r.tokens_per_s);
    let ratio = |ours: Option<f64>, base: Option<f64>| match (ours, base) {
        (Some(a), Some(b)) => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    let mut table = format!(
        "`small`, batch 32 x 512, {steps} steps; tokens/s from the median step of steps 4..{steps}\n\n\
         | run | tokens/s | vs PyTorch bf16 | vs bf16 + compile | first step (s) | peak GPU memory (MiB, nvidia-smi) | loss at step {steps} | note |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            opt(r.tokens_per_s, 0),
            ratio(r.tokens_per_s, anchor),
            ratio(r.tokens_per_s, compiled),
            opt(r.first_step_s, 1),
            r.peak_mib.map_or("-".into(), |m| m.to_string()),
            opt(r.final_loss, 3),
            r.note
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::median_step;

    #[test]
    fn median_step_leaves_out_the_warm_up_steps() {
        // Step ends of a run whose first steps compile: 10 s, then 1, 1, then 0.1 s each.
        let ends = [10.0, 11.0, 12.0, 12.1, 12.2, 12.3, 12.5];
        let median = median_step(&ends).expect("steps");
        assert!((median - 0.1).abs() < 1e-9, "{median}");
    }
}
