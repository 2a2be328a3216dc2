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

/// A checkpoint's tensors as raw bytes, by name.
pub type Raw = std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

pub fn read_raw(path: &Path) -> Raw {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

pub fn write_raw(path: &Path, raw: &Raw) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

pub fn tiny_config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(tiny_a().join("config.json")).unwrap()).unwrap()
}

/// Writes `config` and `raw` as a single-file checkpoint in a fresh directory `name`.
pub fn write_checkpoint(name: &str, config: &serde_json::Value, raw: &Raw) -> PathBuf {
    let dir = scratch(name);
    std::fs::write(dir.join("config.json"), serde_json::to_string(config).unwrap()).unwrap();
    write_raw(&dir.join("model.safetensors"), raw);
    dir
}

/// Every float parameter's values, in visiting order.
pub fn all_params<M: burn::module::Module<B>>(module: &M) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl burn::module::ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0.push(values(param.val()));
        }
    }
    let mut collect = Collect(Vec::new());
    module.visit(&mut collect);
    collect.0
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
