//! A run directory's checkpoints: `checkpoints/step-NNNNNNN/` holding the model (with the router
//! biases), the optimizer state and `state.json` (step, sampler state, config). Written into a
//! `.tmp` directory and renamed into place, so a crash mid-write never costs the last good one.

use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use moe_model::DeepSeekModel;
use moe_parallel::SplitMix64;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::settings::RunConfig;

/// What a checkpoint holds besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// The batch sampler, ready for the next step.
    pub rng: SplitMix64,
    /// Seconds of training before this checkpoint (for throughput across resumes).
    pub elapsed_s: f64,
    /// The run's configuration.
    pub config: RunConfig,
}

/// Why a run's checkpoint (model, optimizer state, `state.json`) could not be written or read.
/// An HF checkpoint directory's errors are `moe_model::hf::CheckpointError`.
#[derive(Debug, Error)]
pub enum RunCheckpointError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// burn could not write or read a record.
    #[error("{path}: {message}")]
    Record {
        /// The file.
        path: PathBuf,
        /// burn's message.
        message: String,
    },
    /// `state.json` is unreadable.
    #[error("{path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The run directory holds no checkpoint.
    #[error("no checkpoint in {0} (train first, or point at a run directory)")]
    None(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunCheckpointError + '_ {
    move |source| RunCheckpointError::Io { path: path.to_owned(), source }
}

fn record_err(path: PathBuf) -> impl FnOnce(burn::record::RecorderError) -> RunCheckpointError {
    move |e| RunCheckpointError::Record { path, message: e.to_string() }
}

fn recorder() -> BinFileRecorder<FullPrecisionSettings> {
    BinFileRecorder::new()
}

/// The checkpoint directories of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<PathBuf>, RunCheckpointError> {
    let dir = run_dir.join("checkpoints");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io(&dir))? {
        let path = entry.map_err(io(&dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("step-") && !name.ends_with(".tmp") && path.join("state.json").exists() {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Writes a checkpoint atomically and keeps the newest `keep`.
pub fn save<B, O>(
    run_dir: &Path,
    model: &DeepSeekModel<B>,
    optim: &O,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf, RunCheckpointError>
where
    B: AutodiffBackend,
    O: Optimizer<DeepSeekModel<B>, B>,
{
    let dir = run_dir.join("checkpoints");
    let name = format!("step-{:07}", state.step);
    let tmp = dir.join(format!("{name}.tmp"));
    let done = dir.join(&name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let model_path = tmp.join("model");
    recorder().record(model.clone().into_record(), model_path.clone()).map_err(record_err(model_path))?;
    let optim_path = tmp.join("optim");
    recorder().record(optim.to_record(), optim_path.clone()).map_err(record_err(optim_path))?;
    let state_path = tmp.join("state.json");
    let text = serde_json::to_string_pretty(state)
        .map_err(|source| RunCheckpointError::State { path: state_path.clone(), source })?;
    fs::write(&state_path, text).map_err(io(&state_path))?;
    if done.exists() {
        fs::remove_dir_all(&done).map_err(io(&done))?;
    }
    fs::rename(&tmp, &done).map_err(io(&done))?;
    let all = list(run_dir)?;
    for old in &all[..all.len().saturating_sub(keep)] {
        fs::remove_dir_all(old).map_err(io(old))?;
    }
    Ok(done)
}

/// Reads `state.json` of a checkpoint.
pub fn read_state(checkpoint: &Path) -> Result<TrainState, RunCheckpointError> {
    let path = checkpoint.join("state.json");
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|source| RunCheckpointError::State { path, source })
}

/// The newest checkpoint of a run.
pub fn latest(run_dir: &Path) -> Result<PathBuf, RunCheckpointError> {
    list(run_dir)?.pop().ok_or_else(|| RunCheckpointError::None(run_dir.to_owned()))
}

/// Loads a checkpoint's weights into `model` (built from the same config).
pub fn load_model<B: burn::tensor::backend::Backend>(
    checkpoint: &Path,
    model: DeepSeekModel<B>,
    device: &B::Device,
) -> Result<DeepSeekModel<B>, RunCheckpointError> {
    let path = checkpoint.join("model");
    let record = recorder().load(path.clone(), device).map_err(record_err(path))?;
    Ok(model.load_record(record))
}

/// Loads a checkpoint's optimizer state into `optim`.
pub fn load_optim<B, O>(checkpoint: &Path, optim: O, device: &B::Device) -> Result<O, RunCheckpointError>
where
    B: AutodiffBackend,
    O: Optimizer<DeepSeekModel<B>, B>,
{
    let path = checkpoint.join("optim");
    let record = recorder().load(path.clone(), device).map_err(record_err(path))?;
    Ok(optim.load_record(record))
}
