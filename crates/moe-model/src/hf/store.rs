//! The tensors of a checkpoint directory: `model.safetensors`, or the shards listed by
//! `model.safetensors.index.json`, memory-mapped and read by name.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use moe_experts::LoadError;
use moe_experts::safetensors_source::{TensorSource, decode_float};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::CheckpointError;
use super::fp8;

/// Where one tensor lies.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range within the file.
    start: usize,
    end: usize,
}

/// The index file of a sharded checkpoint (its `metadata` is ignored).
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// Every tensor of a checkpoint, by name, over memory-mapped files. Remembers which tensors
/// were read so that the loader can refuse tensors the model does not use.
pub struct TensorStore {
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
    read: RefCell<BTreeSet<String>>,
    fp8_block: Option<[usize; 2]>,
}

fn io_error(path: &Path, source: std::io::Error) -> CheckpointError {
    CheckpointError::Io { path: path.to_path_buf(), source }
}

fn map(path: &Path) -> Result<Mmap, CheckpointError> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    // SAFETY: the map is read-only and lives in the store; the checkpoint files must not be
    // modified while loading (as for every mmap-based safetensors reader). Truncation after
    // the header check would fault, not corrupt memory we write.
    #[allow(unsafe_code)]
    let mapped = unsafe { Mmap::map(&file) };
    mapped.map_err(|e| io_error(path, e))
}

impl TensorStore {
    /// Opens `dir/model.safetensors.index.json` and its shards if present, else
    /// `dir/model.safetensors`. `fp8_block` is the scale block of FP8 weights, from
    /// `quantization_config`; without it FP8 tensors are refused.
    pub fn open(dir: &Path, fp8_block: Option<[usize; 2]>) -> Result<Self, CheckpointError> {
        let index_path = dir.join("model.safetensors.index.json");
        let (files, wanted): (Vec<PathBuf>, Option<BTreeMap<String, String>>) = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| io_error(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text)
                .map_err(|source| CheckpointError::Json { path: index_path.clone(), source })?;
            let shards: BTreeSet<&String> = index.weight_map.values().collect();
            (shards.into_iter().map(|s| dir.join(s)).collect(), Some(index.weight_map))
        } else {
            (vec![dir.join("model.safetensors")], None)
        };
        let mut store = Self { maps: Vec::new(), entries: HashMap::new(), read: RefCell::default(), fp8_block };
        for (i, path) in files.iter().enumerate() {
            let bytes = map(path)?;
            let (header, metadata) = SafeTensors::read_metadata(&bytes)
                .map_err(|source| CheckpointError::Safetensors { path: path.clone(), source })?;
            let base = 8 + header;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                let entry = Entry {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + start,
                    end: base + end,
                };
                if store.entries.insert(name.clone(), entry).is_some() {
                    return Err(CheckpointError::Duplicate { tensor: name, path: path.clone() });
                }
            }
            store.maps.push(bytes);
        }
        if let Some(wanted) = wanted {
            for (name, shard) in wanted {
                let in_shard = store.entries.get(&name).is_some_and(|e| files[e.file] == dir.join(&shard));
                if !in_shard {
                    return Err(CheckpointError::NotInShard { tensor: name, shard });
                }
            }
        }
        Ok(store)
    }

    /// Names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// Tensors never read, sorted, except those `skip` accepts.
    pub fn unread(&self, skip: impl Fn(&str) -> bool) -> Vec<String> {
        let read = self.read.borrow();
        let mut names: Vec<String> = self.entries.keys().filter(|n| !read.contains(*n) && !skip(n)).cloned().collect();
        names.sort();
        names
    }

    fn entry(&self, name: &str, expected: &[usize]) -> Result<&Entry, LoadError> {
        let entry = self.entries.get(name).ok_or_else(|| LoadError::Missing(name.into()))?;
        if entry.shape != expected {
            return Err(LoadError::Shape { name: name.into(), got: entry.shape.clone(), expected: expected.to_vec() });
        }
        self.read.borrow_mut().insert(name.into());
        Ok(entry)
    }

    fn bytes(&self, entry: &Entry) -> &[u8] {
        &self.maps[entry.file][entry.start..entry.end]
    }

    /// An FP8 weight `[rows, cols]` times its `<name>_scale_inv` block scales.
    fn dequantized(&self, name: &str, entry: &Entry) -> Result<Vec<f32>, LoadError> {
        let Some(block) = self.fp8_block else {
            return Err(LoadError::Unsupported {
                key: "quantization_config",
                value: format!("null, but tensor `{name}` is F8_E4M3"),
                expected: "an fp8 quantization_config for F8_E4M3 weights",
            });
        };
        let &[rows, cols] = entry.shape.as_slice() else {
            return Err(LoadError::Dtype {
                name: name.into(),
                dtype: "F8_E4M3 (only 2-D weights are quantized)".into(),
            });
        };
        let scale_name = format!("{name}_scale_inv");
        let scale_entry = self.entry(&scale_name, &fp8::scale_shape(rows, cols, block))?;
        let scales = decode_float(&scale_name, scale_entry.dtype, self.bytes(scale_entry))?;
        Ok(fp8::dequantize(self.bytes(entry), rows, cols, &scales, block))
    }
}

impl TensorSource for TensorStore {
    fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        let entry = self.entry(name, expected)?;
        match entry.dtype {
            Dtype::F8_E4M3 => self.dequantized(name, entry),
            dtype => decode_float(name, dtype, self.bytes(entry)),
        }
    }
}
