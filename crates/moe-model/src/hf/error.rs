use std::path::PathBuf;

use moe_experts::LoadError;
use thiserror::Error;

use crate::ModelConfigError;

/// Why an HF checkpoint directory could not be read or written; names the file, key or tensor
/// at fault. (A training run's own checkpoints are `moe-runner`'s `RunCheckpointError`.)
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// A file could not be opened, mapped or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `config.json` or the shard index is not valid JSON of the expected form.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A config key is out of range or unsupported.
    #[error("config.json: {0}")]
    Config(#[from] ModelConfigError),
    /// A safetensors file is malformed or truncated.
    #[error("{path}: {source}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: safetensors::SafeTensorError,
    },
    /// A tensor is missing, misshaped, or of an unsupported dtype.
    #[error(transparent)]
    Tensor(#[from] LoadError),
    /// Two files hold the same tensor.
    #[error("tensor `{tensor}` appears twice (again in {path})")]
    Duplicate {
        /// The tensor.
        tensor: String,
        /// The second file holding it.
        path: PathBuf,
    },
    /// The shard index names a file that does not hold the tensor.
    #[error("model.safetensors.index.json maps tensor `{tensor}` to {shard}, which does not hold it")]
    NotInShard {
        /// The tensor.
        tensor: String,
        /// The shard the index names.
        shard: String,
    },
    /// Tensors the model does not use (other than the skipped MTP layers).
    #[error("tensors not used by a model with this config.json: {}", .0.join(", "))]
    Unexpected(Vec<String>),
    /// Inference over the checkpoint failed (bad token ids, too long an input).
    #[error(transparent)]
    Generate(#[from] crate::generate::GenerateError),
    /// The model has no HF DeepSeek-V3 layout (multi-head attention).
    #[error("{0}")]
    Unsupported(String),
}
