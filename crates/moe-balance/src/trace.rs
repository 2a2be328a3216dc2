//! Routing traces: which experts every token chose, per MoE layer, in a compact binary file.
//!
//! A training run writes one at the end (the routing of its validation set); the placement
//! and traffic tools in `moe-parallel` replay it. The format is little-endian:
//!
//! ```text
//! magic        8 bytes  b"MOETRACE"
//! version      u32      1
//! num_experts  u32      E >= 1
//! top_k        u32      1 <= K <= E
//! num_layers   u32
//! num_tokens   u64      tokens per layer (the same tokens in every layer)
//! id_bytes     u32      2 when E <= 65536, else 4
//! ids          num_layers * num_tokens * K ids of id_bytes each, layer-major then
//!              token-major (token t's K ids are contiguous)
//! ```
//!
//! Reading checks every field, every id (< E), truncation and trailing bytes, and names what
//! was wrong.
//!
//! ```
//! use moe_balance::trace::RoutingTrace;
//!
//! let mut trace = RoutingTrace::new(8, 2).unwrap();
//! trace.push_layer(&[0, 5, 7, 1]).unwrap(); // 2 tokens, K = 2
//! let mut bytes = Vec::new();
//! trace.write_to(&mut bytes).unwrap();
//! let back = RoutingTrace::read_from(bytes.as_slice()).unwrap();
//! assert_eq!(back, trace);
//! assert_eq!(back.expert_load(0), Some(vec![1, 1, 0, 0, 0, 1, 0, 1]));
//! ```

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The first 8 bytes of every trace file.
pub const TRACE_MAGIC: [u8; 8] = *b"MOETRACE";
/// The format version this code writes and reads.
pub const TRACE_VERSION: u32 = 1;

/// Why a trace could not be built, written or read.
#[derive(Debug, Error)]
pub enum TraceError {
    /// The file does not start with [`TRACE_MAGIC`].
    #[error("not a routing trace: magic is {found:?}, expected {:?}", TRACE_MAGIC)]
    BadMagic {
        /// The first 8 bytes found.
        found: [u8; 8],
    },
    /// A version this code does not read.
    #[error("trace version {found} is not supported (expected {TRACE_VERSION})")]
    UnsupportedVersion {
        /// The version in the file.
        found: u32,
    },
    /// A size that must be positive was zero.
    #[error("{field} must be at least 1, got 0")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// K is larger than E.
    #[error("top_k ({top_k}) must not exceed num_experts ({num_experts})")]
    TopKExceedsExperts {
        /// K.
        top_k: u32,
        /// E.
        num_experts: u32,
    },
    /// The header's id width does not fit the expert count.
    #[error("id_bytes is {found}, expected {expected} for {num_experts} experts")]
    IdWidth {
        /// The width in the file.
        found: u32,
        /// The width E calls for.
        expected: u32,
        /// E.
        num_experts: u32,
    },
    /// A layer's id count is not a whole number of tokens.
    #[error("layer {layer} has {len} ids, not a multiple of top_k ({top_k})")]
    NotWholeTokens {
        /// The layer index.
        layer: usize,
        /// Ids given.
        len: usize,
        /// K.
        top_k: u32,
    },
    /// A layer covers a different number of tokens than the first layer.
    #[error("layer {layer} has {tokens} tokens, expected {expected} (as layer 0)")]
    TokenCountMismatch {
        /// The layer index.
        layer: usize,
        /// Its tokens.
        tokens: u64,
        /// Layer 0's tokens.
        expected: u64,
    },
    /// An expert id is not below E.
    #[error("layer {layer}, id #{position}: expert {id} is out of range (num_experts is {num_experts})")]
    IdOutOfRange {
        /// The layer index.
        layer: usize,
        /// Position of the id within the layer (token * K + slot).
        position: usize,
        /// The id.
        id: u32,
        /// E.
        num_experts: u32,
    },
    /// The header's sizes do not fit in memory on this machine.
    #[error("trace of {num_layers} layers x {num_tokens} tokens x {top_k} ids is too large")]
    TooLarge {
        /// Layers.
        num_layers: u32,
        /// Tokens per layer.
        num_tokens: u64,
        /// K.
        top_k: u32,
    },
    /// The input ended before `what` was complete.
    #[error("trace is truncated: it ends inside {what}")]
    Truncated {
        /// The part being read.
        what: String,
    },
    /// Bytes follow the last layer.
    #[error("trace has trailing bytes after the last layer")]
    TrailingBytes,
    /// An I/O error other than a short read.
    #[error("trace I/O: {0}")]
    Io(#[from] io::Error),
    /// A file could not be opened or created.
    #[error("trace file {path}: {source}")]
    File {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// The experts chosen by every token of a token set, per MoE layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingTrace {
    num_experts: u32,
    top_k: u32,
    num_tokens: u64,
    layers: Vec<Vec<u32>>,
}

/// Bytes per stored id for `num_experts` experts.
fn id_bytes_for(num_experts: u32) -> u32 {
    if num_experts <= 1 << 16 { 2 } else { 4 }
}

/// Fills `buf`, reporting a short read as [`TraceError::Truncated`] of `what`.
fn read_exact_or_truncated(
    reader: &mut impl Read,
    buf: &mut [u8],
    what: impl FnOnce() -> String,
) -> Result<(), TraceError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => TraceError::Truncated { what: what() },
        _ => TraceError::Io(e),
    })
}

fn read_u32(reader: &mut impl Read, field: &str) -> Result<u32, TraceError> {
    let mut b = [0u8; 4];
    read_exact_or_truncated(reader, &mut b, || format!("the header field {field}"))?;
    Ok(u32::from_le_bytes(b))
}

impl RoutingTrace {
    /// An empty trace (no layer yet) of `num_experts` experts, `top_k` per token.
    pub fn new(num_experts: u32, top_k: u32) -> Result<Self, TraceError> {
        if num_experts == 0 {
            return Err(TraceError::Zero { field: "num_experts" });
        }
        if top_k == 0 {
            return Err(TraceError::Zero { field: "top_k" });
        }
        if top_k > num_experts {
            return Err(TraceError::TopKExceedsExperts { top_k, num_experts });
        }
        Ok(Self { num_experts, top_k, num_tokens: 0, layers: Vec::new() })
    }

    /// Appends the next MoE layer: `ids` holds `tokens * K` expert ids, token-major (the
    /// row-major data of a `[T, K]` `expert_ids` tensor). Every layer must cover the same
    /// tokens, so the same `T`.
    pub fn push_layer(&mut self, ids: &[u32]) -> Result<(), TraceError> {
        let layer = self.layers.len();
        let k = self.top_k as usize;
        if !ids.len().is_multiple_of(k) {
            return Err(TraceError::NotWholeTokens { layer, len: ids.len(), top_k: self.top_k });
        }
        let tokens = (ids.len() / k) as u64;
        if layer > 0 && tokens != self.num_tokens {
            return Err(TraceError::TokenCountMismatch { layer, tokens, expected: self.num_tokens });
        }
        self.check_ids(layer, ids)?;
        self.num_tokens = tokens;
        self.layers.push(ids.to_vec());
        Ok(())
    }

    fn check_ids(&self, layer: usize, ids: &[u32]) -> Result<(), TraceError> {
        match ids.iter().position(|&id| id >= self.num_experts) {
            Some(position) => {
                Err(TraceError::IdOutOfRange { layer, position, id: ids[position], num_experts: self.num_experts })
            }
            None => Ok(()),
        }
    }

    /// Routed experts `E`.
    pub fn num_experts(&self) -> u32 {
        self.num_experts
    }

    /// Experts per token `K`.
    pub fn top_k(&self) -> u32 {
        self.top_k
    }

    /// Tokens per layer (0 before the first layer).
    pub fn num_tokens(&self) -> u64 {
        self.num_tokens
    }

    /// MoE layers recorded.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `layer`'s ids, `tokens * K`, token-major.
    pub fn layer(&self, layer: usize) -> Option<&[u32]> {
        self.layers.get(layer).map(Vec::as_slice)
    }

    /// Every layer's ids.
    pub fn layers(&self) -> &[Vec<u32>] {
        &self.layers
    }

    /// Tokens routed to each expert in `layer` (`[E]`), or `None` past the last layer.
    pub fn expert_load(&self, layer: usize) -> Option<Vec<u64>> {
        let ids = self.layer(layer)?;
        let mut load = vec![0u64; self.num_experts as usize];
        ids.iter().for_each(|&id| load[id as usize] += 1);
        Some(load)
    }

    /// Writes the binary format (see the module docs).
    pub fn write_to(&self, mut writer: impl Write) -> Result<(), TraceError> {
        let id_bytes = id_bytes_for(self.num_experts);
        let mut header = Vec::with_capacity(36);
        header.extend_from_slice(&TRACE_MAGIC);
        header.extend_from_slice(&TRACE_VERSION.to_le_bytes());
        header.extend_from_slice(&self.num_experts.to_le_bytes());
        header.extend_from_slice(&self.top_k.to_le_bytes());
        header.extend_from_slice(&(self.layers.len() as u32).to_le_bytes());
        header.extend_from_slice(&self.num_tokens.to_le_bytes());
        header.extend_from_slice(&id_bytes.to_le_bytes());
        writer.write_all(&header)?;
        for ids in &self.layers {
            let mut bytes = Vec::with_capacity(ids.len() * id_bytes as usize);
            for &id in ids {
                // Ids are < E, and E <= 65536 when id_bytes is 2, so the cast keeps them.
                match id_bytes {
                    2 => bytes.extend_from_slice(&(id as u16).to_le_bytes()),
                    _ => bytes.extend_from_slice(&id.to_le_bytes()),
                }
            }
            writer.write_all(&bytes)?;
        }
        writer.flush()?;
        Ok(())
    }

    /// Reads and validates the binary format (see the module docs).
    pub fn read_from(mut reader: impl Read) -> Result<Self, TraceError> {
        let mut magic = [0u8; 8];
        read_exact_or_truncated(&mut reader, &mut magic, || "the magic".into())?;
        if magic != TRACE_MAGIC {
            return Err(TraceError::BadMagic { found: magic });
        }
        let version = read_u32(&mut reader, "version")?;
        if version != TRACE_VERSION {
            return Err(TraceError::UnsupportedVersion { found: version });
        }
        let num_experts = read_u32(&mut reader, "num_experts")?;
        let top_k = read_u32(&mut reader, "top_k")?;
        let mut trace = Self::new(num_experts, top_k)?;
        let num_layers = read_u32(&mut reader, "num_layers")?;
        let mut tokens = [0u8; 8];
        read_exact_or_truncated(&mut reader, &mut tokens, || "the header field num_tokens".into())?;
        let num_tokens = u64::from_le_bytes(tokens);
        let id_bytes = read_u32(&mut reader, "id_bytes")?;
        let expected = id_bytes_for(num_experts);
        if id_bytes != expected {
            return Err(TraceError::IdWidth { found: id_bytes, expected, num_experts });
        }
        let layer_bytes = num_tokens
            .checked_mul(u64::from(top_k) * u64::from(id_bytes))
            .and_then(|b| usize::try_from(b).ok())
            .ok_or(TraceError::TooLarge { num_layers, num_tokens, top_k })?;
        for layer in 0..num_layers as usize {
            // Read in bounded chunks so that a corrupt header claiming terabytes fails with
            // `Truncated` instead of a huge allocation.
            let mut bytes = Vec::with_capacity(layer_bytes.min(1 << 24));
            let got = (&mut reader).take(layer_bytes as u64).read_to_end(&mut bytes)?;
            if got < layer_bytes {
                return Err(TraceError::Truncated { what: format!("layer {layer} ({got} of {layer_bytes} bytes)") });
            }
            let ids: Vec<u32> = match id_bytes {
                2 => bytes.chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))).collect(),
                _ => bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            };
            trace.check_ids(layer, &ids)?;
            trace.layers.push(ids);
        }
        trace.num_tokens = num_tokens;
        let mut extra = [0u8; 1];
        if reader.read(&mut extra)? != 0 {
            return Err(TraceError::TrailingBytes);
        }
        Ok(trace)
    }

    /// Writes the trace to a file at `path` (created or truncated).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), TraceError> {
        let path = path.as_ref();
        let file = File::create(path).map_err(|source| TraceError::File { path: path.to_path_buf(), source })?;
        self.write_to(BufWriter::new(file))
    }

    /// Reads a trace file written by [`RoutingTrace::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TraceError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| TraceError::File { path: path.to_path_buf(), source })?;
        Self::read_from(BufReader::new(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trace with two layers of three tokens, E = 6, K = 2.
    fn sample() -> RoutingTrace {
        let mut t = RoutingTrace::new(6, 2).unwrap();
        t.push_layer(&[0, 5, 3, 1, 2, 4]).unwrap();
        t.push_layer(&[5, 4, 0, 1, 1, 0]).unwrap();
        t
    }

    fn bytes_of(t: &RoutingTrace) -> Vec<u8> {
        let mut b = Vec::new();
        t.write_to(&mut b).unwrap();
        b
    }

    #[test]
    fn round_trips_through_bytes_and_files() {
        let t = sample();
        let b = bytes_of(&t);
        // Header 36 bytes + 2 layers * 6 ids * 2 bytes, laid out as documented.
        assert_eq!(b.len(), 36 + 2 * 6 * 2);
        assert_eq!(&b[..8], b"MOETRACE");
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 3);
        assert_eq!(u16::from_le_bytes(b[36..38].try_into().unwrap()), 0);
        assert_eq!(u16::from_le_bytes(b[38..40].try_into().unwrap()), 5);
        assert_eq!(RoutingTrace::read_from(b.as_slice()).unwrap(), t);

        let path = std::env::temp_dir().join(format!("moe-trace-test-{}.bin", std::process::id()));
        t.save(&path).unwrap();
        let back = RoutingTrace::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.num_tokens(), 3);
        assert_eq!(back.expert_load(1), Some(vec![2, 2, 0, 0, 1, 1]));
    }

    #[test]
    fn wide_ids_use_four_bytes() {
        let e = 70_000;
        let mut t = RoutingTrace::new(e, 1).unwrap();
        t.push_layer(&[69_999, 0, 65_536]).unwrap();
        let b = bytes_of(&t);
        assert_eq!(b.len(), 36 + 3 * 4);
        assert_eq!(RoutingTrace::read_from(b.as_slice()).unwrap(), t);
    }

    #[test]
    fn empty_trace_round_trips() {
        let t = RoutingTrace::new(4, 4).unwrap();
        assert_eq!(RoutingTrace::read_from(bytes_of(&t).as_slice()).unwrap(), t);
    }

    #[test]
    fn building_refuses_bad_sizes_and_ids() {
        assert!(matches!(RoutingTrace::new(0, 1), Err(TraceError::Zero { field: "num_experts" })));
        assert!(matches!(RoutingTrace::new(4, 0), Err(TraceError::Zero { field: "top_k" })));
        assert!(matches!(RoutingTrace::new(4, 5), Err(TraceError::TopKExceedsExperts { top_k: 5, num_experts: 4 })));
        let mut t = sample();
        assert!(matches!(t.push_layer(&[0, 1, 2]), Err(TraceError::NotWholeTokens { layer: 2, len: 3, top_k: 2 })));
        assert!(matches!(
            t.push_layer(&[0, 1]),
            Err(TraceError::TokenCountMismatch { layer: 2, tokens: 1, expected: 3 })
        ));
        assert!(matches!(
            t.push_layer(&[0, 1, 2, 6, 0, 1]),
            Err(TraceError::IdOutOfRange { layer: 2, position: 3, id: 6, num_experts: 6 })
        ));
        // A refused layer leaves the trace as it was.
        assert_eq!(t, sample());
    }

    /// `sample()`'s bytes with `patch` applied at `offset`.
    fn patched(offset: usize, patch: &[u8]) -> Vec<u8> {
        let mut b = bytes_of(&sample());
        b[offset..offset + patch.len()].copy_from_slice(patch);
        b
    }

    #[test]
    fn reading_names_each_corruption() {
        let read = |b: Vec<u8>| RoutingTrace::read_from(b.as_slice());
        assert!(matches!(read(patched(0, b"MOETRACX")), Err(TraceError::BadMagic { found }) if &found == b"MOETRACX"));
        assert!(matches!(read(patched(8, &2u32.to_le_bytes())), Err(TraceError::UnsupportedVersion { found: 2 })));
        assert!(matches!(read(patched(12, &0u32.to_le_bytes())), Err(TraceError::Zero { field: "num_experts" })));
        assert!(matches!(
            read(patched(16, &7u32.to_le_bytes())),
            Err(TraceError::TopKExceedsExperts { top_k: 7, num_experts: 6 })
        ));
        assert!(matches!(
            read(patched(32, &4u32.to_le_bytes())),
            Err(TraceError::IdWidth { found: 4, expected: 2, num_experts: 6 })
        ));
        // Second layer, id #1 set to 6 (= E).
        assert!(matches!(
            read(patched(36 + 12 + 2, &6u16.to_le_bytes())),
            Err(TraceError::IdOutOfRange { layer: 1, position: 1, id: 6, num_experts: 6 })
        ));
        // A header that claims more layers than the bytes hold.
        assert!(
            matches!(read(patched(20, &3u32.to_le_bytes())), Err(TraceError::Truncated { what }) if what.starts_with("layer 2"))
        );
        // A header that claims an absurd number of tokens fails without allocating it.
        assert!(matches!(read(patched(24, &(u64::MAX / 2).to_le_bytes())), Err(TraceError::TooLarge { .. })));
        assert!(matches!(read(patched(24, &(1u64 << 40).to_le_bytes())), Err(TraceError::Truncated { .. })));
        let mut long = bytes_of(&sample());
        long.push(0);
        assert!(matches!(read(long), Err(TraceError::TrailingBytes)));
    }

    #[test]
    fn every_truncation_is_reported_as_truncated() {
        let b = bytes_of(&sample());
        for len in 0..b.len() {
            match RoutingTrace::read_from(&b[..len]) {
                Err(TraceError::Truncated { .. }) => {}
                other => panic!("length {len}: expected Truncated, got {other:?}"),
            }
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let path = Path::new("/nonexistent/dir/trace.bin");
        match RoutingTrace::load(path) {
            Err(TraceError::File { path: p, .. }) => assert_eq!(p, path),
            other => panic!("expected File error, got {other:?}"),
        }
    }
}
