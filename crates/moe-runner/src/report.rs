//! The end of a run: PNG plots and `summary.md` in the run directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::metrics::{self, RankMetrics, StepMetrics};
use crate::plots::{self, PlotError};
use crate::settings::RunConfig;
use crate::train::RunSummary;

/// Why the report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A plot failed.
    #[error(transparent)]
    Plot(#[from] PlotError),
}

/// Mean of the last `n` values (all of them if fewer).
fn tail_mean(values: impl DoubleEndedIterator<Item = f64>, n: usize) -> f64 {
    let tail: Vec<f64> = values.rev().take(n).collect();
    tail.iter().sum::<f64>() / tail.len().max(1) as f64
}

/// Writes `loss.png`, `load_layer<i>.png` per MoE layer and `summary.md`; returns the summary text.
pub fn write(run_dir: &Path, config: &RunConfig, summary: &RunSummary) -> Result<String, ReportError> {
    let path = run_dir.join("metrics.jsonl");
    let records: Vec<StepMetrics> =
        metrics::read(&path).map_err(|source| ReportError::Io { path: path.clone(), source })?;
    plots::plot_losses(&run_dir.join("loss.png"), &records)?;
    let layers = config.model.num_moe_layers();
    for layer in 0..layers {
        plots::plot_load_heatmap(&run_dir.join(format!("load_layer{layer}.png")), &records, layer)?;
    }
    let mut text = String::new();
    let m = &config.model;
    let e = summary.eval;
    let _ = writeln!(text, "# Run `{}`\n", config.name);
    let _ = writeln!(
        text,
        "Model: {} blocks ({} dense, {} MoE), d {}, {} routed experts (top {}) + {} shared of width {}, \
         {} groups (keep {}). Balance: {:?}.\n",
        m.num_hidden_layers,
        m.first_k_dense_replace,
        layers,
        m.moe.hidden_size,
        m.moe.n_routed_experts,
        m.moe.num_experts_per_tok,
        m.moe.n_shared_experts.unwrap_or(0),
        m.moe.moe_intermediate_size,
        m.moe.n_group,
        m.moe.topk_group,
        config.balance.mode
    );
    let _ = writeln!(text, "| measure | value |\n|---|---|");
    let _ = writeln!(text, "| optimizer steps | {} |", summary.steps);
    let _ = writeln!(text, "| training time | {:.0} s |", summary.elapsed_s);
    let _ = writeln!(text, "| throughput | {:.0} tokens/s |", summary.tokens_per_s);
    let _ = writeln!(
        text,
        "| training loss (mean of last 50 steps) | {:.3} nats/byte |",
        tail_mean(records.iter().map(|r| r.loss), 50)
    );
    let _ = writeln!(text, "| validation loss | {:.3} nats/byte ({:.3} bits/byte) |", e.val_loss, e.val_bpb);
    let _ = writeln!(text, "| MaxVio over the validation set (worst layer) | {:.3} |", e.val_max_vio);
    for layer in 0..layers {
        let batch_vio = tail_mean(records.iter().filter_map(|r| r.max_vio.get(layer).copied()), 50);
        let _ = writeln!(text, "| MoE layer {layer}: batch MaxVio, mean of last 50 steps | {batch_vio:.3} |");
    }
    if let Some(vio) = e.val_rank_max_vio {
        let p = &config.parallel;
        let _ = writeln!(
            text,
            "| expert parallelism | {} ranks on {} nodes (logical ranks in one process) |",
            p.expert_ranks, p.nodes
        );
        let _ = writeln!(text, "| per-rank MaxVio over the validation set (worst layer) | {vio:.3} |");
        let steps = records.iter().filter_map(|r| r.ranks.as_ref()).collect::<Vec<_>>();
        let per_step_mb = |f: fn(&RankMetrics) -> u64| {
            steps.iter().map(|r| f(r) as f64).sum::<f64>() / steps.len().max(1) as f64 / 1e6
        };
        let _ = writeln!(
            text,
            "| all-to-all MB per step (dispatch + combine, all MoE layers): within / across nodes | {:.2} / {:.2} |",
            per_step_mb(|r| r.bytes_intra_node),
            per_step_mb(|r| r.bytes_inter_node)
        );
        let max_nodes = steps.iter().map(|r| r.max_nodes_reached).max().unwrap_or(0);
        let _ = writeln!(text, "| most nodes one token reached | {max_nodes} |");
    }
    let dropped: usize = records.iter().map(|r| r.dropped).sum();
    let _ = writeln!(text, "| dropped token-expert pairs | {dropped} |");
    let _ = writeln!(
        text,
        "\nFiles: `metrics.jsonl` (one record per step), `loss.png`, `load_layer<i>.png` (expert load over steps), `checkpoints/`."
    );
    let out = run_dir.join("summary.md");
    std::fs::write(&out, &text).map_err(|source| ReportError::Io { path: out, source })?;
    Ok(text)
}
