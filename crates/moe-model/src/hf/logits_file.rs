use std::path::Path;

use moe_experts::{LoadError, MoeBackend};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::CheckpointError;
use crate::DeepSeekModel;
use crate::generate::logits_for_ids;

/// Reads `input_ids` `[batch, seq]` (I64 or I32) from the safetensors file `input`, runs the
/// full forward, and writes `logits` `[batch, seq, vocab]` (F32) to the safetensors file
/// `output`; returns the logits' shape. The file format of HF reference dumps.
pub fn logits_file<B: MoeBackend>(
    model: &DeepSeekModel<B>,
    input: &Path,
    output: &Path,
) -> Result<[usize; 3], CheckpointError> {
    let bytes = std::fs::read(input).map_err(|source| CheckpointError::Io { path: input.into(), source })?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|source| CheckpointError::Safetensors { path: input.into(), source })?;
    let view = file.tensor("input_ids").map_err(|_| LoadError::Missing("input_ids".into()))?;
    let &[batch, seq] = view.shape() else {
        return Err(
            LoadError::Shape { name: "input_ids".into(), got: view.shape().to_vec(), expected: vec![0, 0] }.into()
        );
    };
    let ids: Vec<i64> = match view.dtype() {
        Dtype::I64 => view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect(),
        Dtype::I32 => {
            view.data().chunks_exact(4).map(|b| i64::from(i32::from_le_bytes(b.try_into().unwrap_or([0; 4])))).collect()
        }
        other => {
            return Err(LoadError::Dtype {
                name: "input_ids".into(),
                dtype: format!("{other:?} (expected I64 or I32)"),
            }
            .into());
        }
    };
    let (logits, shape) = logits_for_ids(model, &ids, [batch, seq])?;
    let data: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let safetensors_error = |source| CheckpointError::Safetensors { path: output.into(), source };
    let view = TensorView::new(Dtype::F32, shape.to_vec(), &data).map_err(safetensors_error)?;
    safetensors::serialize_to_file([("logits", view)], None, output).map_err(safetensors_error)?;
    Ok(shape)
}
