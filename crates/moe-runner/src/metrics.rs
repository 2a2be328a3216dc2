//! `metrics.jsonl`: one JSON object per optimizer step, appended as the run goes.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use moe_balance::metrics::max_violation;
use moe_parallel::ep::StepAccounting;
use serde::{Deserialize, Serialize};

use crate::profile::StepPhases;

/// One optimizer step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: usize,
    /// Training cross-entropy, nats per byte (the balance losses excluded).
    pub loss: f64,
    /// The balance losses added to it.
    pub balance_loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Training tokens per second over this step.
    pub tokens_per_s: f64,
    /// Seconds of training so far.
    pub elapsed_s: f64,
    /// MaxVio of this step's batch, per MoE layer.
    pub max_vio: Vec<f64>,
    /// Pairs routed to each expert this step, per MoE layer.
    pub load: Vec<Vec<u64>>,
    /// Pairs dropped by a capacity limit this step.
    pub dropped: usize,
    /// Per-rank load and traffic, with `parallel.expert_ranks` > 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<RankMetrics>,
    /// Validation results, at evaluation steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalMetrics>,
    /// Where the step's time went, with `--profile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<StepPhases>,
}

/// A pass over the fixed validation windows.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct EvalMetrics {
    /// Cross-entropy, nats per byte.
    pub val_loss: f64,
    /// The same in bits per byte.
    pub val_bpb: f64,
    /// MaxVio over the whole validation pass, the worst MoE layer.
    pub val_max_vio: f64,
    /// The same over the per-rank load, with `parallel.expert_ranks` > 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_rank_max_vio: Option<f64>,
}

/// What the ranks did in one optimizer step, summed over its micro-batches (with
/// `parallel.expert_ranks` > 1).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RankMetrics {
    /// `(token, expert)` pairs each rank computed, per MoE layer.
    pub rank_load: Vec<Vec<u64>>,
    /// MaxVio of the per-rank load, per MoE layer.
    pub rank_max_vio: Vec<f64>,
    /// Dispatch + combine bytes between ranks of one node, all MoE layers.
    pub bytes_intra_node: u64,
    /// Dispatch + combine bytes between nodes, all MoE layers.
    pub bytes_inter_node: u64,
    /// The most nodes one token's experts were on.
    pub max_nodes_reached: usize,
}

impl RankMetrics {
    /// Adds one pass's per-layer accounting.
    pub fn add(&mut self, layers: &[StepAccounting]) {
        self.rank_load.resize_with(layers.len(), Vec::new);
        for (sum, acc) in self.rank_load.iter_mut().zip(layers) {
            sum.resize(acc.pairs_per_rank.len(), 0);
            sum.iter_mut().zip(&acc.pairs_per_rank).for_each(|(s, p)| *s += p);
            self.bytes_intra_node += acc.bytes_intra_node;
            self.bytes_inter_node += acc.bytes_inter_node;
            self.max_nodes_reached = self.max_nodes_reached.max(acc.max_nodes_reached());
        }
        self.rank_max_vio = self.rank_load.iter().map(|l| max_violation(l)).collect();
    }
}

/// Appends step records to a run's `metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `metrics.jsonl` in `run_dir`, keeping the records up to step `keep_until`
    /// (a resumed run drops what came after its checkpoint, which it is about to redo).
    pub fn open(run_dir: &Path, keep_until: usize) -> std::io::Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let kept: Vec<StepMetrics> = read(&path)?.into_iter().filter(|m| m.step <= keep_until).collect();
        let mut file = OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
        for record in &kept {
            writeln!(file, "{}", serde_json::to_string(record).map_err(std::io::Error::other)?)?;
        }
        Ok(Self { file, path })
    }

    /// Appends one record.
    pub fn append(&mut self, record: &StepMetrics) -> std::io::Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(record).map_err(std::io::Error::other)?)?;
        self.file.flush()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every record of a `metrics.jsonl` (none if the file does not exist).
pub fn read(path: &Path) -> std::io::Result<Vec<StepMetrics>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    BufReader::new(File::open(path)?)
        .lines()
        .filter(|line| line.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|line| serde_json::from_str(&line?).map_err(std::io::Error::other))
        .collect()
}
