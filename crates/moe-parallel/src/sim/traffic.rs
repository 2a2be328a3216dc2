//! Per-rank token copies of DeepSeek-V3's two-hop dispatch, counted token by token.

use crate::Placement;

/// Token copies each rank sends and receives in one layer's dispatch, with DeepSeek-V3's
/// two-hop scheme: a token goes to each destination *node* once over InfiniBand, to the GPU
/// with the sender's local index there, which forwards it over NVLink to each GPU of that
/// node that hosts one of its experts (a GPU gets one copy however many of its experts were
/// chosen). Destinations in the sender's own node are reached over NVLink directly. The
/// combine is the mirror image (per-GPU partial sums back to the relay, which reduces them
/// and sends one copy per node back over InfiniBand), so it moves the same copies.
#[derive(Debug, Clone)]
pub(crate) struct TrafficCounter {
    placement: Placement,
    /// Token copies sent and received over InfiniBand, per rank.
    pub(crate) ib_out: Vec<u64>,
    pub(crate) ib_in: Vec<u64>,
    /// Token copies sent and received over NVLink, per rank.
    pub(crate) nvlink_out: Vec<u64>,
    pub(crate) nvlink_in: Vec<u64>,
    /// (token, expert) rows each rank computes.
    pub(crate) rows: Vec<u64>,
    /// Tokens routed to each expert.
    pub(crate) expert_load: Vec<u64>,
    /// Tokens counted.
    pub(crate) tokens: u64,
    /// Sum and maximum over tokens of the distinct nodes reached.
    pub(crate) nodes_sum: u64,
    pub(crate) nodes_max: usize,
    /// Sum over tokens of the distinct GPUs reached.
    pub(crate) gpus_sum: u64,
    dest_ranks: Vec<usize>,
}

impl TrafficCounter {
    /// Zero counts for `placement`'s ranks.
    pub(crate) fn new(placement: Placement) -> Self {
        let r = placement.num_ranks();
        Self {
            placement,
            ib_out: vec![0; r],
            ib_in: vec![0; r],
            nvlink_out: vec![0; r],
            nvlink_in: vec![0; r],
            rows: vec![0; r],
            expert_load: vec![0; placement.num_experts()],
            tokens: 0,
            nodes_sum: 0,
            nodes_max: 0,
            gpus_sum: 0,
            dest_ranks: Vec::new(),
        }
    }

    /// Counts one token that starts on rank `origin` and chose the experts `ids` (all
    /// `< E`, distinct; `origin < R`: the simulator's own values).
    pub(crate) fn add_token(&mut self, origin: usize, ids: &[usize]) {
        let per_rank = self.placement.experts_per_rank();
        let per_node = self.placement.ranks_per_node();
        let (origin_node, origin_local) = (origin / per_node, origin % per_node);
        self.dest_ranks.clear();
        self.dest_ranks.extend(ids.iter().map(|&e| e / per_rank));
        ids.iter().for_each(|&e| self.expert_load[e] += 1);
        for &rank in &self.dest_ranks {
            self.rows[rank] += 1;
        }
        // Sorted ranks are grouped by node, since nodes hold contiguous ranks.
        self.dest_ranks.sort_unstable();
        self.dest_ranks.dedup();
        let mut nodes = 0;
        let mut last_node = usize::MAX;
        for &rank in &self.dest_ranks {
            let node = rank / per_node;
            let entry = if node == origin_node { origin } else { node * per_node + origin_local };
            if node != last_node {
                last_node = node;
                nodes += 1;
                if node != origin_node {
                    self.ib_out[origin] += 1;
                    self.ib_in[entry] += 1;
                }
            }
            if rank != entry {
                self.nvlink_out[entry] += 1;
                self.nvlink_in[rank] += 1;
            }
        }
        self.tokens += 1;
        self.nodes_sum += nodes as u64;
        self.nodes_max = self.nodes_max.max(nodes);
        self.gpus_sum += self.dest_ranks.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_hop_copies_match_a_hand_count() {
        // 16 experts, 8 ranks (2 experts each), 2 nodes of 4 ranks.
        let p = Placement::new(16, 8, 2).unwrap();
        let mut c = TrafficCounter::new(p);
        // Token on rank 1 (node 0, local 1) chooses experts 2, 3 (rank 1: itself), 4 (rank 2),
        // 10 (rank 5: node 1, local 1 = the relay), 14 (rank 7: node 1).
        c.add_token(1, &[2, 3, 4, 10, 14]);
        // IB: one copy to node 1, landing on rank 5.
        assert_eq!(c.ib_out, vec![0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(c.ib_in, vec![0, 0, 0, 0, 0, 1, 0, 0]);
        // NVLink: 1 -> 2 in node 0; 5 -> 7 in node 1 (5 computes its own copy).
        assert_eq!(c.nvlink_out, vec![0, 1, 0, 0, 0, 1, 0, 0]);
        assert_eq!(c.nvlink_in, vec![0, 0, 1, 0, 0, 0, 0, 1]);
        assert_eq!(c.rows, vec![0, 2, 1, 0, 0, 1, 0, 1]);
        assert_eq!(c.expert_load.iter().sum::<u64>(), 5);
        assert_eq!((c.expert_load[10], c.expert_load[11]), (1, 0));
        assert_eq!((c.nodes_sum, c.nodes_max, c.gpus_sum), (2, 2, 4));

        // Token on rank 6 (node 1, local 2) choosing only node-0 experts 0 and 1 (rank 0):
        // IB to rank 2 (node 0, local 2), then NVLink 2 -> 0.
        c.add_token(6, &[1, 0]);
        assert_eq!(c.ib_out[6], 1);
        assert_eq!(c.ib_in[2], 1);
        assert_eq!((c.nvlink_out[2], c.nvlink_in[0]), (1, 1));
        assert_eq!(c.rows[0], 2);
        assert_eq!((c.tokens, c.nodes_sum, c.nodes_max, c.gpus_sum), (2, 3, 2, 5));
    }
}
