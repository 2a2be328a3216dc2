//! Why a run stopped early: [`TrainError`], in its own module so that the training loop, the
//! sharded forward and the run files all name it without depending on one another.

use std::path::PathBuf;

use moe_experts::MoeError;
use moe_model::ModelError;
use moe_parallel::ep::EpError;
use thiserror::Error;

use crate::checkpoint::RunCheckpointError;
use crate::settings::SettingsError;
use crate::validation_trace::ValidationTraceError;

/// Why a run stopped early.
#[derive(Debug, Error)]
pub enum TrainError {
    /// The configuration is invalid.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] RunCheckpointError),
    /// A run file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The routing trace failed.
    #[error(transparent)]
    Trace(#[from] ValidationTraceError),
    /// Starting over would overwrite a run.
    #[error("{0} already holds checkpoints: pass --resume to continue it, or --run-dir for a new run")]
    RunExists(PathBuf),
    /// The expert-parallel forward failed.
    #[error("expert parallelism: {0}")]
    ExpertParallel(#[from] EpError),
    /// The loss stopped being finite.
    #[error("the training loss became {loss} at step {step}; lower optim.lr or raise optim.warmup_steps")]
    Diverged {
        /// The step.
        step: usize,
        /// The loss.
        loss: f64,
    },
}

impl From<MoeError> for TrainError {
    fn from(e: MoeError) -> Self {
        Self::Model(ModelError::Moe(e))
    }
}
