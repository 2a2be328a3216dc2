//! Named f32 tensors out of safetensors data, for the HF loaders: the [`TensorSource`] trait
//! they read through, one in-memory safetensors file as a source (behind
//! [`crate::hf::load_moe_layer`]), and [`decode_float`], the dtype decoding every source shares
//! (`moe-model`'s sharded, memory-mapped `TensorStore` too).

use safetensors::{Dtype, SafeTensors};

use crate::LoadError;

/// Where [`crate::hf::load_moe_layer_from`] reads named tensors: one safetensors file here; a
/// sharded, memory-mapped or quantized checkpoint in `moe-model`.
pub trait TensorSource {
    /// The tensor `name` as f32 values (row-major), checked against the `expected` shape.
    fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError>;
}

/// Reads tensors by name from one safetensors file in memory, checking shape and dtype.
pub(crate) struct SafetensorsFile<'a> {
    file: SafeTensors<'a>,
}

impl<'a> SafetensorsFile<'a> {
    /// Parses the header of the file's `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Result<Self, LoadError> {
        Ok(Self { file: SafeTensors::deserialize(bytes)? })
    }
}

impl TensorSource for SafetensorsFile<'_> {
    fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        let view = self.file.tensor(name).map_err(|_| LoadError::Missing(name.into()))?;
        if view.shape() != expected {
            return Err(LoadError::Shape {
                name: name.into(),
                got: view.shape().to_vec(),
                expected: expected.to_vec(),
            });
        }
        decode_float(name, view.dtype(), view.data())
    }
}

/// Little-endian F32, BF16 or F16 bytes as f32 values; `name` is for the error.
pub fn decode_float(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, LoadError> {
    Ok(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => return Err(LoadError::Dtype { name: name.into(), dtype: format!("{other:?}") }),
    })
}
