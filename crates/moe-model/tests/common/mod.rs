//! Shared by the integration tests: the HF fixture and comparisons.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use safetensors::SafeTensors;

pub type B = NdArray;

/// The tiny DeepSeek-V3 checkpoint made by HF transformers (see its README).
pub fn tiny_a() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny_a")
}

/// `input_ids` `[2, 40]` and HF's `logits` `[2, 40, 256]` from the fixture.
pub fn reference() -> (Tensor<B, 2, Int>, Vec<f32>, [usize; 3]) {
    let bytes = std::fs::read(tiny_a().join("reference.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let ids = file.tensor("input_ids").unwrap();
    let ids_shape = [ids.shape()[0], ids.shape()[1]];
    let ids: Vec<i64> = ids.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    let logits = file.tensor("logits").unwrap();
    let shape = [logits.shape()[0], logits.shape()[1], logits.shape()[2]];
    let logits = logits.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (Tensor::from_data(TensorData::new(ids, ids_shape), &Default::default()), logits, shape)
}

pub fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A fresh directory under the target dir's tmp, unique to `name`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("moe-model-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
