//! How ranks exchange token rows: an all-to-all behind a trait, with an in-process version.

use burn::tensor::backend::Backend;

use super::{EpError, WireMessage};

/// A message of token rows between two ranks.
pub trait Message {
    /// Token rows it carries.
    fn num_rows(&self) -> usize;
}

/// The all-to-all of expert parallelism. `outgoing[src][dst]` is what rank `src` sends rank
/// `dst`; the result's `[dst][src]` is what `dst` received from `src`. A multi-process
/// transport (NCCL, MPI) implements this per rank; [`LocalTransport`] runs every logical rank
/// in one process.
pub trait Transport {
    /// Exchanges one message between every ordered pair of ranks (self-messages included).
    fn all_to_all<M: Message>(&mut self, outgoing: Vec<Vec<M>>) -> Result<Vec<Vec<M>>, EpError>;
}

/// One rank's side of the all-to-all, for ranks in their own threads or processes (NCCL or
/// MPI would implement this). Every rank calls [`RankTransport::exchange`] the same number of
/// times in the same order.
pub trait RankTransport<B: Backend> {
    /// This rank.
    fn rank(&self) -> usize;

    /// Ranks taking part.
    fn num_ranks(&self) -> usize;

    /// Sends `outgoing[dst]` to every rank `dst` (itself included) and returns what each
    /// rank sent this one, `[src]`.
    fn exchange<M: WireMessage<B>>(&mut self, outgoing: Vec<M>) -> Result<Vec<M>, EpError>;
}

/// Logical ranks in one process: the all-to-all is a transpose. Counts the rows each ordered
/// pair of ranks exchanged, summed over calls.
#[derive(Debug, Clone, Default)]
pub struct LocalTransport {
    rows_sent: Vec<Vec<u64>>,
}

impl LocalTransport {
    /// A transport with zero counts.
    pub fn new() -> Self {
        Self::default()
    }

    /// `[src][dst]` rows sent so far (empty before the first exchange).
    pub fn rows_sent(&self) -> &[Vec<u64>] {
        &self.rows_sent
    }
}

impl Transport for LocalTransport {
    fn all_to_all<M: Message>(&mut self, outgoing: Vec<Vec<M>>) -> Result<Vec<Vec<M>>, EpError> {
        let ranks = outgoing.len();
        if let Some((rank, row)) = outgoing.iter().enumerate().find(|(_, row)| row.len() != ranks) {
            return Err(EpError::MessageCount { rank, got: row.len(), expected: ranks });
        }
        if self.rows_sent.len() != ranks {
            self.rows_sent = vec![vec![0; ranks]; ranks];
        }
        let mut incoming: Vec<Vec<M>> = (0..ranks).map(|_| Vec::with_capacity(ranks)).collect();
        for (src, row) in outgoing.into_iter().enumerate() {
            for (dst, message) in row.into_iter().enumerate() {
                self.rows_sent[src][dst] += message.num_rows() as u64;
                incoming[dst].push(message);
            }
        }
        Ok(incoming)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rows(usize);

    impl Message for Rows {
        fn num_rows(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn transposes_and_counts() {
        let mut t = LocalTransport::new();
        let out = vec![vec![Rows(1), Rows(2)], vec![Rows(3), Rows(4)]];
        let got = t.all_to_all(out).unwrap();
        let sizes: Vec<Vec<usize>> = got.iter().map(|r| r.iter().map(|m| m.0).collect()).collect();
        assert_eq!(sizes, vec![vec![1, 3], vec![2, 4]]);
        assert_eq!(t.rows_sent(), &[vec![1, 2], vec![3, 4]]);
        assert!(matches!(
            t.all_to_all(vec![vec![Rows(1)], vec![Rows(1), Rows(1)]]),
            Err(EpError::MessageCount { rank: 0, got: 1, expected: 2 })
        ));
    }
}
