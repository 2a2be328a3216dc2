//! Byte-level corpus: the shipped Shakespeare or any UTF-8 file, split into a training part
//! and a held-out tail, cut into `[batch, seq_len + 1]` windows.

use std::path::Path;

use moe_parallel::SplitMix64;

use crate::settings::SettingsError;

/// The shipped corpus (see data/README.md for its credit).
pub const SHAKESPEARE: &[u8] = include_bytes!("../../../data/shakespeare.txt");

/// The corpus's two parts, as byte tokens.
#[derive(Debug, Clone)]
pub struct Corpus {
    train: Vec<u8>,
    val: Vec<u8>,
}

/// One batch: `inputs[i]` predicts `targets[i]`, both `batch * seq_len` tokens, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Input tokens.
    pub inputs: Vec<i64>,
    /// The next token of each input.
    pub targets: Vec<i64>,
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
}

impl Corpus {
    /// Reads `path` (UTF-8 text) or takes the shipped corpus, and holds out the last
    /// `val_fraction` of the bytes.
    pub fn load(path: Option<&Path>, val_fraction: f64, seq_len: usize) -> Result<Self, SettingsError> {
        let bytes = match path {
            None => SHAKESPEARE.to_vec(),
            Some(path) => {
                let bytes =
                    std::fs::read(path).map_err(|source| SettingsError::Data { path: path.to_owned(), source })?;
                if let Err(e) = std::str::from_utf8(&bytes) {
                    return Err(SettingsError::Data {
                        path: path.to_owned(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8 text: {e}")),
                    });
                }
                bytes
            }
        };
        Self::from_bytes(bytes, val_fraction, seq_len)
    }

    /// Splits `bytes`; both parts must hold at least one window of `seq_len + 1` bytes.
    pub fn from_bytes(mut bytes: Vec<u8>, val_fraction: f64, seq_len: usize) -> Result<Self, SettingsError> {
        let split = ((bytes.len() as f64) * (1.0 - val_fraction)).round() as usize;
        let val = bytes.split_off(split.min(bytes.len()));
        if bytes.len() <= seq_len || val.len() <= seq_len {
            return Err(SettingsError::Value {
                key: "data.path",
                value: format!("a corpus of {} bytes", bytes.len() + val.len()),
                expected: "enough text for one window of data.seq_len + 1 bytes in both the training and validation parts",
            });
        }
        Ok(Self { train: bytes, val })
    }

    /// Bytes in the training part.
    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    /// Bytes in the validation part.
    pub fn val_len(&self) -> usize {
        self.val.len()
    }

    /// A training batch of windows at random offsets drawn from `rng`.
    pub fn train_batch(&self, rng: &mut SplitMix64, batch: usize, seq_len: usize) -> Batch {
        let starts = (0..batch)
            .map(|_| rng.below_multiply_shift((self.train.len() - seq_len) as u64) as usize)
            .collect::<Vec<_>>();
        windows(&self.train, &starts, seq_len)
    }

    /// Validation batch `index` of `count`: fixed windows spread evenly over the held-out part,
    /// the same for every evaluation and every run, so their losses compare.
    pub fn val_batch(&self, index: usize, count: usize, batch: usize, seq_len: usize) -> Batch {
        let last = self.val.len() - seq_len - 1;
        let total = (count * batch).max(2);
        let starts = (0..batch).map(|j| (index * batch + j) * last / (total - 1)).collect::<Vec<_>>();
        windows(&self.val, &starts, seq_len)
    }
}

fn windows(bytes: &[u8], starts: &[usize], seq_len: usize) -> Batch {
    let mut inputs = Vec::with_capacity(starts.len() * seq_len);
    let mut targets = Vec::with_capacity(starts.len() * seq_len);
    for &s in starts {
        inputs.extend(bytes[s..s + seq_len].iter().map(|&b| i64::from(b)));
        targets.extend(bytes[s + 1..s + seq_len + 1].iter().map(|&b| i64::from(b)));
    }
    Batch { inputs, targets, batch: starts.len(), seq_len }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_holds_out_the_tail_and_targets_are_shifted_inputs() {
        let text: Vec<u8> = (0..200u8).collect();
        let corpus = Corpus::from_bytes(text, 0.1, 8).unwrap();
        assert_eq!((corpus.train_len(), corpus.val_len()), (180, 20));
        let b = corpus.val_batch(0, 1, 2, 8);
        // Windows at the first and last possible offsets of the held-out part (bytes 180..200).
        assert_eq!(b.inputs[..8], (180..188).collect::<Vec<i64>>()[..]);
        assert_eq!(b.targets[8..], (192..200).collect::<Vec<i64>>()[..]);
        let mut rng = SplitMix64::new(3);
        let t = corpus.train_batch(&mut rng, 4, 8);
        for (i, w) in t.inputs.chunks(8).zip(t.targets.chunks(8)) {
            assert!(i[0] + 8 < 180, "a training window reached the held-out part");
            assert_eq!(i[1..], w[..7]);
        }
    }

    #[test]
    fn too_small_a_corpus_names_the_key() {
        let err = Corpus::from_bytes(vec![b'a'; 20], 0.1, 8).unwrap_err();
        assert!(err.to_string().contains("data.path"), "{err}");
    }

    #[test]
    fn shipped_corpus_is_the_credited_shakespeare() {
        assert_eq!(SHAKESPEARE.len(), 5_057_282);
        assert!(SHAKESPEARE.starts_with(b"ALL'S WELL THAT ENDS WELL"));
    }
}
