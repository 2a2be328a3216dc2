//! Per-step accounting of an expert-parallel forward: rows and bytes within and across nodes,
//! nodes reached per token, load per rank.

use super::EpError;
use crate::Placement;

/// What one rank's tokens caused in one step, seen from that rank (so that ranks in other
/// threads or processes can each fill their own and [`StepAccounting::from_ranks`] joins them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankAccounting {
    /// The rank.
    pub rank: usize,
    /// `[dst]` token rows dispatched to rank `dst` (each token once per destination rank;
    /// the combine sends the same count back).
    pub rows_to: Vec<u64>,
    /// `(token, expert)` pairs this rank's shard computed: its expert load.
    pub pairs_computed: u64,
    /// `[n]` tokens of this rank that reached `n` distinct nodes (`N + 1` long).
    pub nodes_reached: Vec<u64>,
    /// Bytes of one token row (`d` times the element size).
    pub row_bytes: u64,
}

impl RankAccounting {
    /// Counts one rank's routing: `expert_ids` is its `[T, k]` ids, token-major.
    ///
    /// With `node_limit = Some(M)` a token reaching more than `M` nodes is an
    /// [`EpError::NodeLimit`] naming it (the router guarantees `M` when its groups lie within
    /// nodes, so this is a check of that guarantee, not a cap).
    pub fn from_routing(
        rank: usize,
        expert_ids: &[usize],
        k: usize,
        placement: &Placement,
        row_bytes: u64,
        node_limit: Option<usize>,
    ) -> Result<Self, EpError> {
        let mut rows_to = vec![0u64; placement.num_ranks()];
        let mut nodes_reached = vec![0u64; placement.num_nodes() + 1];
        for (token, ids) in expert_ids.chunks(k.max(1)).enumerate() {
            let mut ranks = Vec::with_capacity(ids.len());
            let mut nodes = Vec::with_capacity(ids.len());
            for &expert in ids {
                let dst =
                    placement.rank_of(expert).ok_or(EpError::ExpertId { expert, experts: placement.num_experts() })?;
                ranks.push(dst);
                nodes.push(dst / placement.ranks_per_node());
            }
            ranks.sort_unstable();
            ranks.dedup();
            nodes.sort_unstable();
            nodes.dedup();
            for dst in ranks {
                rows_to[dst] += 1;
            }
            if let Some(limit) = node_limit
                && nodes.len() > limit
            {
                return Err(EpError::NodeLimit { rank, token, nodes: nodes.len(), limit });
            }
            nodes_reached[nodes.len()] += 1;
        }
        Ok(Self { rank, rows_to, pairs_computed: 0, nodes_reached, row_bytes })
    }
}

/// One step over all ranks. Bytes count the token rows of the dispatch and of the combine
/// (the same rows back), at the input's element size; rows a rank sends itself move nothing
/// and are not counted; routing metadata (ids, weights: `k` numbers per token) is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepAccounting {
    /// `[src][dst]` token rows dispatched.
    pub rows_sent: Vec<Vec<u64>>,
    /// Dispatch plus combine bytes between different ranks of one node.
    pub bytes_intra_node: u64,
    /// Dispatch plus combine bytes between ranks of different nodes.
    pub bytes_inter_node: u64,
    /// `[n]` tokens that reached `n` distinct nodes.
    pub nodes_reached: Vec<u64>,
    /// `[r]` `(token, expert)` pairs rank `r` computed.
    pub pairs_per_rank: Vec<u64>,
}

impl StepAccounting {
    /// Joins the ranks' own accountings (one per rank, any order).
    pub fn from_ranks(placement: &Placement, ranks: &[RankAccounting]) -> Result<Self, EpError> {
        let r = placement.num_ranks();
        if ranks.len() != r {
            return Err(EpError::RankCount { got: ranks.len(), expected: r });
        }
        let mut rows_sent = vec![vec![0u64; r]; r];
        let mut pairs_per_rank = vec![0u64; r];
        let mut nodes_reached = vec![0u64; placement.num_nodes() + 1];
        let (mut intra, mut inter) = (0u64, 0u64);
        for acc in ranks {
            let src = acc.rank;
            if src >= r || acc.rows_to.len() != r {
                return Err(EpError::RankCount { got: acc.rows_to.len().max(src + 1), expected: r });
            }
            rows_sent[src].clone_from(&acc.rows_to);
            pairs_per_rank[src] = acc.pairs_computed;
            for (n, count) in acc.nodes_reached.iter().enumerate().take(nodes_reached.len()) {
                nodes_reached[n] += count;
            }
            for (dst, &rows) in acc.rows_to.iter().enumerate() {
                // Twice: the dispatch there and the combine back.
                let bytes = 2 * rows * acc.row_bytes;
                if dst == src {
                    continue;
                } else if placement.node_of(dst) == placement.node_of(src) {
                    intra += bytes;
                } else {
                    inter += bytes;
                }
            }
        }
        Ok(Self { rows_sent, bytes_intra_node: intra, bytes_inter_node: inter, nodes_reached, pairs_per_rank })
    }

    /// The most nodes any token reached (0 with no tokens).
    pub fn max_nodes_reached(&self) -> usize {
        self.nodes_reached.iter().rposition(|&c| c > 0).unwrap_or(0)
    }

    /// `[r]` token rows rank `r` received (each token once however many of its experts it holds).
    pub fn rows_received(&self) -> Vec<u64> {
        (0..self.rows_sent.len()).map(|dst| self.rows_sent.iter().map(|row| row[dst]).sum()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_rows_bytes_and_nodes_by_hand() {
        // 8 experts, 4 ranks (2 experts each), 2 nodes (ranks 0-1, 2-3).
        let p = Placement::new(8, 4, 2).unwrap();
        // Rank 1's tokens: [0, 1] -> rank 0 only (node 0); [2, 7] -> ranks 1, 3 (nodes 0, 1);
        // [4, 5] -> ranks 2 (node 1).
        let a1 = RankAccounting::from_routing(1, &[0, 1, 2, 7, 4, 5], 2, &p, 64, None).unwrap();
        assert_eq!(a1.rows_to, vec![1, 1, 1, 1]);
        assert_eq!(a1.nodes_reached, vec![0, 2, 1]);
        // Rank 2's one token: [6, 3] -> ranks 3, 1 (nodes 1, 0).
        let mut a2 = RankAccounting::from_routing(2, &[6, 3], 2, &p, 64, Some(2)).unwrap();
        a2.pairs_computed = 2;
        // Ranks 0 and 3 route no token of their own but compute 2 pairs each.
        let idle = |rank| RankAccounting {
            rank,
            rows_to: vec![0; 4],
            pairs_computed: 2,
            nodes_reached: vec![0; 3],
            row_bytes: 64,
        };
        let step = StepAccounting::from_ranks(&p, &[idle(0), a1, a2, idle(3)]).unwrap();
        // Rank 1 -> 0: one row within node 0; rank 1 -> 2, 3: two rows across; 1 -> 1 is free.
        // Rank 2 -> 3: one row within node 1; rank 2 -> 1: one row across. Times 2 (combine).
        assert_eq!(step.bytes_intra_node, 2 * 2 * 64);
        assert_eq!(step.bytes_inter_node, 2 * 3 * 64);
        assert_eq!(step.nodes_reached, vec![0, 2, 2]);
        assert_eq!(step.max_nodes_reached(), 2);
        assert_eq!(step.rows_received(), vec![1, 2, 1, 2]);
        assert_eq!(step.pairs_per_rank, vec![2, 0, 2, 2]);
    }

    #[test]
    fn a_token_over_the_node_limit_is_an_error_naming_it() {
        let p = Placement::new(8, 4, 4).unwrap();
        // Token 1 reaches nodes 1, 2, 3 (one rank per node, two experts per rank).
        let err = RankAccounting::from_routing(0, &[0, 1, 0, 2, 4, 6], 3, &p, 4, Some(2)).unwrap_err();
        assert_eq!(err, EpError::NodeLimit { rank: 0, token: 1, nodes: 3, limit: 2 });
        assert_eq!(
            RankAccounting::from_routing(0, &[9], 1, &p, 4, None).unwrap_err(),
            EpError::ExpertId { expert: 9, experts: 8 }
        );
    }
}
