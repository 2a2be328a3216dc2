//! The burn-moe runner: trains a DeepSeek-style MoE language model on a byte-level corpus
//! (`cargo xtask train`), samples from it (`generate`), and compares balancing schemes
//! (`compare-balance`). The binary is a thin CLI over these modules, so tests drive them
//! in-process.

pub mod adamw;
pub mod checkpoint;
pub mod compare;
pub mod corpus;
pub mod error;
pub mod expert_parallel;
pub mod hf_checkpoint;
pub mod metrics;
pub mod plots;
pub mod profile;
pub mod report;
pub mod sample;
pub mod schedule;
pub mod settings;
pub mod sim_plot;
pub mod train;
pub mod validation_trace;
