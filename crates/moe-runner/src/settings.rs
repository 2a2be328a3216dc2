//! A run's configuration, layered: the built-in default (`configs/tiny.toml`, embedded) <
//! a `--config` TOML file < `MOE_*` environment variables < `--set key=value`.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType};
use config::{Config, Environment, File, FileFormat};
use moe_model::DeepSeekConfig;
use moe_parallel::{Placement, PlacementError};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The built-in default run.
pub const DEFAULT_TOML: &str = include_str!("../../../configs/tiny.toml");

/// Everything a run needs; saved with every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The run's name; the default run directory is `runs/<name>`.
    pub name: String,
    /// The model, with HF DeepSeek-V3 `config.json` keys.
    pub model: DeepSeekConfig,
    /// The corpus and batches.
    pub data: DataConfig,
    /// AdamW and the schedule.
    pub optim: OptimConfig,
    /// Steps, seeds and intervals.
    pub train: TrainConfig,
    /// Load balancing.
    pub balance: BalanceConfig,
    /// Expert parallelism (absent in configs and checkpoints from before it: one rank).
    #[serde(default)]
    pub parallel: ParallelConfig,
}

/// Expert parallelism: the MoE layers' routed experts sharded over `expert_ranks` ranks on
/// `nodes` nodes (contiguously, as `moe_parallel::Placement`), each rank taking
/// `batch_size / expert_ranks` whole sequences of every batch.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Ranks holding the routed experts; 1 runs the plain layer.
    pub expert_ranks: usize,
    /// Nodes the ranks are spread over (for node-limited routing and the intra/inter-node
    /// traffic split).
    pub nodes: usize,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self { expert_ranks: 1, nodes: 1 }
    }
}

impl ParallelConfig {
    /// The placement of the experts, `None` for a single rank.
    pub fn placement(&self, num_experts: usize) -> Result<Option<Placement>, SettingsError> {
        if self.expert_ranks == 1 && self.nodes == 1 {
            return Ok(None);
        }
        Ok(Some(Placement::new(num_experts, self.expert_ranks, self.nodes)?))
    }
}

/// The corpus and batches.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A UTF-8 text file; empty for the shipped Shakespeare corpus.
    pub path: String,
    /// The fraction of bytes at the end held out for validation.
    pub val_fraction: f64,
    /// Tokens (bytes) per sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
}

/// AdamW, warmup + cosine schedule, clipping and accumulation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate, reached after the warmup.
    pub lr: f64,
    /// The cosine schedule's floor, reached at the last step.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Adam's beta1.
    pub beta1: f64,
    /// Adam's beta2.
    pub beta2: f64,
    /// Gradient-norm clipping threshold, per parameter tensor as burn's `GradientClipping::Norm`
    /// (0 turns clipping off).
    pub grad_clip: f64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
}

/// Steps, seeds and intervals.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Seeds the model's initialisation and the batch sampler.
    pub seed: u64,
    /// Steps between progress lines in the log.
    pub log_every: usize,
    /// Steps between validation passes (0: only at the end).
    pub eval_every: usize,
    /// Validation batches per pass.
    pub eval_batches: usize,
    /// Steps between checkpoints (0: only at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_checkpoints: usize,
    /// The dtype the model computes in (absent in configs and checkpoints from before it: auto).
    #[serde(default)]
    pub precision: Precision,
}

/// The dtype the model computes in; parameters, optimizer state and checkpoints stay f32
/// (`moe_model::precision`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Precision {
    /// bf16 on a GPU backend whose device runs bf16 (CUDA), f32 on the CPU and elsewhere.
    #[default]
    Auto,
    /// f32 throughout.
    F32,
    /// bf16 activations and products, f32 parameters (mixed precision).
    Bf16,
}

// From a string, so that a bad value's error lists the accepted ones (serde's enum error does
// not through the `config` crate).
impl TryFrom<String> for Precision {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.as_str() {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("unknown precision `{other}`: expected `auto`, `f32` or `bf16`")),
        }
    }
}

impl Precision {
    /// The compute dtype on `device` of `B`, where `auto_bf16` says whether `auto` means bf16
    /// on this backend (CUDA: its GEMMs run bf16 on tensor cores); `bf16` on a device
    /// that cannot run it is an error naming the key.
    pub fn compute_dtype<B: Backend>(self, device: &B::Device, auto_bf16: bool) -> Result<FloatDType, SettingsError> {
        let bf16 = B::supports_dtype(device, DType::BF16);
        match self {
            Self::F32 => Ok(FloatDType::F32),
            Self::Auto => Ok(if auto_bf16 && bf16 { FloatDType::BF16 } else { FloatDType::F32 }),
            Self::Bf16 if bf16 => Ok(FloatDType::BF16),
            Self::Bf16 => Err(SettingsError::Value {
                key: "train.precision",
                value: "bf16".into(),
                expected: "f32 or auto on this backend, whose device has no bf16 arithmetic",
            }),
        }
    }
}

/// How the experts' load is balanced.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BalanceMode {
    /// DeepSeek-V3: the bias update after each step plus the small sequence-wise loss.
    LossFree,
    /// The Switch/GShard auxiliary loss, bias frozen.
    AuxLoss,
    /// Nothing.
    None,
}

/// Load balancing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BalanceConfig {
    /// Which scheme.
    pub mode: BalanceMode,
    /// The bias update's step size (loss_free).
    pub gamma: f64,
    /// Scale the step with the learning-rate schedule's decay (the cosine, not the warmup), so
    /// it ends at `gamma * optim.min_lr / optim.lr`: a large step catches the early imbalance,
    /// a small one stops the bias from oscillating around its balance point late in the run.
    pub gamma_follows_lr: bool,
    /// The sequence-wise balance loss weight (loss_free).
    pub seq_alpha: f64,
    /// The Switch aux loss weight (aux_loss).
    pub aux_alpha: f64,
}

impl BalanceConfig {
    /// `(sequence-wise alpha, aux alpha, gamma)` in effect under the mode.
    pub fn weights(&self) -> (f64, f64, f64) {
        match self.mode {
            BalanceMode::LossFree => (self.seq_alpha, 0.0, self.gamma),
            BalanceMode::AuxLoss => (0.0, self.aux_alpha, 0.0),
            BalanceMode::None => (0.0, 0.0, 0.0),
        }
    }
}

/// A configuration that cannot run; names the key.
#[derive(Debug, Error)]
pub enum SettingsError {
    /// A layer could not be read or merged (bad TOML, unknown key, wrong type).
    #[error("configuration: {0}")]
    Layer(#[from] config::ConfigError),
    /// `--set` without `=`.
    #[error("--set {0:?}: expected key=value")]
    SetSyntax(String),
    /// A key the model does not know.
    #[error("unknown key `model.{0}` (the model takes HF DeepSeek-V3 config.json keys)")]
    UnknownModelKey(String),
    /// A value out of range.
    #[error("{key} = {value} is invalid: expected {expected}")]
    Value {
        /// The dotted key.
        key: &'static str,
        /// What was given.
        value: String,
        /// What is allowed.
        expected: &'static str,
    },
    /// The model keys describe an impossible model.
    #[error("model: {0}")]
    Model(#[from] moe_model::ModelConfigError),
    /// `parallel` does not fit the model (experts per rank, ranks per node).
    #[error("parallel: {0}")]
    Placement(#[from] PlacementError),
    /// The data file could not be read.
    #[error("data.path {path}: {source}")]
    Data {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Where the layers come from.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    /// A TOML file over the default.
    pub file: Option<PathBuf>,
    /// Read `MOE_*` variables (`MOE_TRAIN__STEPS=100` sets `train.steps`).
    pub env: bool,
    /// `key=value` overrides, last wins.
    pub set: Vec<String>,
}

impl RunConfig {
    /// Merges the layers and validates the result.
    pub fn load(layers: &Layers) -> Result<Self, SettingsError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(file) = &layers.file {
            builder = builder.add_source(File::from(file.as_path()).format(FileFormat::Toml));
        }
        if layers.env {
            builder = builder
                .add_source(Environment::with_prefix("MOE").prefix_separator("_").separator("__").try_parsing(true));
        }
        for item in &layers.set {
            let (key, value) = item.split_once('=').ok_or_else(|| SettingsError::SetSyntax(item.clone()))?;
            builder = builder.set_override(key.trim(), typed_value(value.trim()))?;
        }
        let merged = builder.build()?;
        let run: RunConfig = merged.clone().try_deserialize()?;
        // The model table is flattened HF keys that serde would silently ignore if misspelt.
        let given: serde_json::Map<String, serde_json::Value> = merged.get("model")?;
        let known = serde_json::to_value(&run.model).unwrap_or_default();
        if let Some(key) = given.keys().find(|k| known.get(k.as_str()).is_none()) {
            return Err(SettingsError::UnknownModelKey(key.clone()));
        }
        run.validate()?;
        Ok(run)
    }

    /// Checks every value the runner uses (the model checks its own keys).
    pub fn validate(&self) -> Result<(), SettingsError> {
        let value = |key: &'static str, value: &dyn std::fmt::Display, expected: &'static str| {
            Err(SettingsError::Value { key, value: value.to_string(), expected })
        };
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            return value("name", &self.name, "a non-empty file name");
        }
        self.model.validate()?;
        if self.model.vocab_size != 256 {
            return value("model.vocab_size", &self.model.vocab_size, "256 (byte-level tokens)");
        }
        let d = &self.data;
        if !(d.val_fraction > 0.0 && d.val_fraction < 1.0) {
            return value("data.val_fraction", &d.val_fraction, "in (0, 1)");
        }
        if d.seq_len == 0 || d.seq_len > self.model.max_position_embeddings {
            return value("data.seq_len", &d.seq_len, "in 1..=model.max_position_embeddings");
        }
        if d.batch_size == 0 {
            return value("data.batch_size", &d.batch_size, "at least 1");
        }
        let o = &self.optim;
        for (key, v) in [("optim.lr", o.lr), ("optim.min_lr", o.min_lr)] {
            if !(v.is_finite() && v >= 0.0) {
                return value(key, &v, "finite and >= 0");
            }
        }
        if o.min_lr > o.lr {
            return value("optim.min_lr", &o.min_lr, "at most optim.lr");
        }
        for (key, v) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return value(key, &v, "in [0, 1)");
            }
        }
        for (key, v) in [("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip)] {
            if !(v.is_finite() && v >= 0.0) {
                return value(key, &v, "finite and >= 0");
            }
        }
        if o.grad_accum == 0 {
            return value("optim.grad_accum", &o.grad_accum, "at least 1");
        }
        let t = &self.train;
        if t.steps == 0 {
            return value("train.steps", &t.steps, "at least 1");
        }
        if t.log_every == 0 {
            return value("train.log_every", &t.log_every, "at least 1");
        }
        if t.eval_batches == 0 {
            return value("train.eval_batches", &t.eval_batches, "at least 1");
        }
        if t.keep_checkpoints == 0 {
            return value("train.keep_checkpoints", &t.keep_checkpoints, "at least 1");
        }
        if self.parallel.placement(self.model.moe.n_routed_experts)?.is_some()
            && !d.batch_size.is_multiple_of(self.parallel.expert_ranks)
        {
            return value("data.batch_size", &d.batch_size, "a multiple of parallel.expert_ranks");
        }
        let b = &self.balance;
        for (key, v) in
            [("balance.gamma", b.gamma), ("balance.seq_alpha", b.seq_alpha), ("balance.aux_alpha", b.aux_alpha)]
        {
            if !(v.is_finite() && v >= 0.0) {
                return value(key, &v, "finite and >= 0");
            }
        }
        Ok(())
    }

    /// The corpus: the file at `data.path`, or the shipped one.
    pub fn corpus_path(&self) -> Option<&Path> {
        (!self.data.path.is_empty()).then(|| Path::new(&self.data.path))
    }
}

/// `--set` values arrive as text; numbers and booleans are typed here so that they reach the
/// flattened model keys (which serde buffers without the `config` crate's conversions).
fn typed_value(text: &str) -> config::Value {
    if let Ok(v) = text.parse::<i64>() {
        v.into()
    } else if let Ok(v) = text.parse::<f64>() {
        v.into()
    } else if let Ok(v) = text.parse::<bool>() {
        v.into()
    } else {
        text.into()
    }
}
