//! HF DeepSeek-V3 checkpoints: import ([`load_checkpoint`]) and export ([`save_checkpoint`]).
//!
//! A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed
//! in `model.safetensors.index.json`. Files are memory-mapped; weights may be F32, BF16, F16,
//! or FP8 E4M3 with `weight_scale_inv` block scales (dequantized to f32 on load). Routed
//! experts are stored per expert (`mlp.experts.<e>.{gate,up,down}_proj.weight`) and stacked
//! into the expert bank. The multi-token-prediction layers (`model.layers.<n>` for `n >=
//! num_hidden_layers`) are skipped: they are not part of next-token prediction. Every other
//! tensor must be used, and every tensor the model needs must be present with its shape.

mod error;
pub mod fp8;
mod load;
mod logits_file;
mod save;
mod store;

pub use error::CheckpointError;
pub use load::{is_skipped, load_checkpoint, load_config, load_model};
pub use logits_file::logits_file;
pub use save::{hf_config_json, save_checkpoint};
pub use store::TensorStore;
