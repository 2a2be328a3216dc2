//! `compare-balance`: the same model, data and budget trained with no balancing, the Switch aux
//! loss and loss-free balancing; a table and a MaxVio plot of the three.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use moe_experts::MoeBackend;
use plotters::style::RGBColor;

use crate::error::TrainError;
use crate::metrics::{self, StepMetrics};
use crate::plots::{Series, line_plot, smooth};
use crate::report::ReportError;
use crate::settings::{BalanceMode, RunConfig};
use crate::train::{RunOptions, RunSummary, train};

/// One arm of the comparison.
#[derive(Debug, Clone)]
pub struct Arm {
    /// The balancing scheme.
    pub mode: BalanceMode,
    /// How its run ended.
    pub summary: RunSummary,
    /// Its per-step records.
    pub records: Vec<StepMetrics>,
}

/// Why the comparison stopped.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A run failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The report failed.
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// Trains `config` once per mode, each into `runs_root/compare-<mode>` (replacing an earlier
/// comparison's runs there); `gpu` as in `RunOptions::gpu`.
pub fn run_arms<B>(
    config: &RunConfig,
    runs_root: &Path,
    device: &B::Device,
    gpu: bool,
) -> Result<Vec<Arm>, CompareError>
where
    B: AutodiffBackend + MoeBackend,
    B::InnerBackend: MoeBackend,
{
    let mut arms = Vec::new();
    // Loss-free first: it is the default run, and the one to watch.
    for mode in [BalanceMode::LossFree, BalanceMode::AuxLoss, BalanceMode::None] {
        let mut config = config.clone();
        config.balance.mode = mode;
        let run_dir = runs_root.join(format!("compare-{}", mode_name(mode)));
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir).map_err(|source| ReportError::Io { path: run_dir.clone(), source })?;
        }
        println!("compare-balance: training with balance.mode = {} into {}", mode_name(mode), run_dir.display());
        let options =
            RunOptions { run_dir: run_dir.clone(), resume: false, progress: true, stop_at: None, gpu, profile: false };
        let summary = train::<B>(&config, device, &options)?;
        crate::report::write(&run_dir, &config, &summary)?;
        let path = run_dir.join("metrics.jsonl");
        let records = metrics::read(&path).map_err(|source| ReportError::Io { path, source })?;
        arms.push(Arm { mode, summary, records });
    }
    Ok(arms)
}

/// The config-file name of a mode.
pub fn mode_name(mode: BalanceMode) -> &'static str {
    match mode {
        BalanceMode::None => "none",
        BalanceMode::AuxLoss => "aux_loss",
        BalanceMode::LossFree => "loss_free",
    }
}

/// The worst layer's batch MaxVio at each step.
fn worst_batch_vio(records: &[StepMetrics]) -> Vec<(f64, f64)> {
    records.iter().map(|r| (r.step as f64, r.max_vio.iter().copied().fold(0.0, f64::max))).collect()
}

/// Writes the table and `plot` (PNG, MaxVio over steps); returns the markdown.
pub fn write_results(
    arms: &[Arm],
    config: &RunConfig,
    command: &str,
    markdown: &Path,
    plot: &Path,
) -> Result<String, ReportError> {
    let color = |mode| match mode {
        BalanceMode::None => RGBColor(127, 127, 127),
        BalanceMode::AuxLoss => RGBColor(255, 127, 14),
        BalanceMode::LossFree => RGBColor(31, 119, 180),
    };
    let series: Vec<Series> = arms
        .iter()
        .map(|a| Series {
            label: mode_name(a.mode),
            points: smooth(&worst_batch_vio(&a.records), 0.9),
            color: color(a.mode),
        })
        .collect();
    line_plot(plot, "Batch MaxVio, worst MoE layer (EMA 0.9)", "optimizer step", "MaxVio", &series)?;
    let mut text = String::new();
    let _ = writeln!(text, "# Balancing schemes compared\n");
    let _ = writeln!(
        text,
        "Produced by `{command}`: the `{}` configuration ({} steps of {} x {} bytes, seed {}) trained \
         three times on the same data order, changing only `balance.mode`. MaxVio = (max load - mean load) / mean load; \
         \"validation\" is over the fixed held-out windows, summing the load over the whole pass.\n",
        config.name, config.train.steps, config.data.batch_size, config.data.seq_len, config.train.seed
    );
    let _ = writeln!(
        text,
        "| balance.mode | val loss (nats/byte) | val bits/byte | val MaxVio | batch MaxVio (last 50 steps) | tokens/s |"
    );
    let _ = writeln!(text, "|---|---|---|---|---|---|");
    for a in arms {
        let recent = worst_batch_vio(&a.records);
        let tail = &recent[recent.len().saturating_sub(50)..];
        let batch_vio = tail.iter().map(|p| p.1).sum::<f64>() / tail.len().max(1) as f64;
        let e = a.summary.eval;
        let _ = writeln!(
            text,
            "| {} | {:.4} | {:.4} | {:.3} | {:.3} | {:.0} |",
            mode_name(a.mode),
            e.val_loss,
            e.val_bpb,
            e.val_max_vio,
            batch_vio,
            a.summary.tokens_per_s
        );
    }
    let find = |m| arms.iter().find(|a| a.mode == m).map(|a| a.summary.eval);
    if let (Some(aux), Some(free)) = (find(BalanceMode::AuxLoss), find(BalanceMode::LossFree)) {
        let vio_ratio = free.val_max_vio / aux.val_max_vio.max(1e-12);
        let loss_change = 100.0 * (free.val_loss - aux.val_loss) / aux.val_loss;
        let _ = writeln!(
            text,
            "\nLoss-free against the aux loss: val MaxVio ratio {vio_ratio:.3} (the paper's claim: at most 0.2), \
             val loss {loss_change:+.2}% (claim: at most +1%). {}",
            if vio_ratio <= 0.2 && loss_change <= 1.0 {
                "Both hold at this scale."
            } else {
                "Not both hold at this scale; see the numbers above."
            }
        );
    }
    let _ = writeln!(
        text,
        "\n![batch MaxVio over steps]({})",
        plot.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    );
    std::fs::write(markdown, &text).map_err(|source| ReportError::Io { path: markdown.to_owned(), source })?;
    Ok(text)
}

/// The plot's default path beside the markdown.
pub fn plot_path(markdown: &Path) -> PathBuf {
    markdown.with_file_name("results-balance.png")
}
