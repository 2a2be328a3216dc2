//! Contiguous placement of routed experts on ranks (GPUs) and nodes.

use std::ops::Range;

use thiserror::Error;

/// A [`Placement`] that cannot be built: names the values and what was expected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PlacementError {
    /// A count that must be positive was zero.
    #[error("{field} must be at least 1, got 0")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// The experts do not split evenly over the ranks.
    #[error("num_experts ({num_experts}) must be a multiple of num_ranks ({num_ranks})")]
    ExpertsPerRank {
        /// Experts.
        num_experts: usize,
        /// Ranks.
        num_ranks: usize,
    },
    /// The ranks do not split evenly over the nodes.
    #[error("num_ranks ({num_ranks}) must be a multiple of num_nodes ({num_nodes})")]
    RanksPerNode {
        /// Ranks.
        num_ranks: usize,
        /// Nodes.
        num_nodes: usize,
    },
    /// The experts do not split evenly into routing groups.
    #[error("num_experts ({num_experts}) must be a multiple of num_groups ({num_groups})")]
    ExpertsPerGroup {
        /// Experts.
        num_experts: usize,
        /// Groups.
        num_groups: usize,
    },
    /// A routing group would straddle two nodes, so limiting groups would not limit nodes.
    #[error("num_groups ({num_groups}) must be a multiple of num_nodes ({num_nodes}) so that no group straddles nodes")]
    GroupsStraddleNodes {
        /// Groups.
        num_groups: usize,
        /// Nodes.
        num_nodes: usize,
    },
}

/// `E` experts over `R` ranks over `N` nodes, contiguously: rank `r` holds experts
/// `r * E/R .. (r + 1) * E/R` and node `n` holds ranks `n * R/N .. (n + 1) * R/N`.
///
/// Contiguity is what makes DeepSeek-V3's group-limited routing node-limited: with the
/// router's groups equal to the nodes (or any multiple of them), a token that keeps `M` groups
/// reaches at most `M` nodes.
///
/// ```
/// use moe_parallel::Placement;
///
/// let p = Placement::new(256, 64, 8).unwrap(); // DeepSeek-V3 training: EP64 over 8 nodes
/// assert_eq!(p.experts_per_rank(), 4);
/// assert_eq!(p.rank_of(37), Some(9));
/// assert_eq!(p.node_of_expert(37), Some(1));
/// assert_eq!(p.experts_of(9), Some(36..40));
/// p.check_groups(8).unwrap();
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    num_experts: usize,
    num_ranks: usize,
    num_nodes: usize,
}

impl Placement {
    /// Places `num_experts` on `num_ranks` ranks spread over `num_nodes` nodes.
    pub fn new(num_experts: usize, num_ranks: usize, num_nodes: usize) -> Result<Self, PlacementError> {
        for (field, value) in [("num_experts", num_experts), ("num_ranks", num_ranks), ("num_nodes", num_nodes)] {
            if value == 0 {
                return Err(PlacementError::Zero { field });
            }
        }
        if !num_experts.is_multiple_of(num_ranks) {
            return Err(PlacementError::ExpertsPerRank { num_experts, num_ranks });
        }
        if !num_ranks.is_multiple_of(num_nodes) {
            return Err(PlacementError::RanksPerNode { num_ranks, num_nodes });
        }
        Ok(Self { num_experts, num_ranks, num_nodes })
    }

    /// Checks that `num_groups` routing groups of contiguous experts each lie within one
    /// node, so that keeping `M` groups reaches at most `M` nodes.
    pub fn check_groups(&self, num_groups: usize) -> Result<(), PlacementError> {
        if num_groups == 0 {
            return Err(PlacementError::Zero { field: "num_groups" });
        }
        if !self.num_experts.is_multiple_of(num_groups) {
            return Err(PlacementError::ExpertsPerGroup { num_experts: self.num_experts, num_groups });
        }
        // Group size E/G divides node size E/N exactly when G is a multiple of N.
        if !num_groups.is_multiple_of(self.num_nodes) {
            return Err(PlacementError::GroupsStraddleNodes { num_groups, num_nodes: self.num_nodes });
        }
        Ok(())
    }

    /// Routed experts `E`.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Ranks `R`.
    pub fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    /// Nodes `N`.
    pub fn num_nodes(&self) -> usize {
        self.num_nodes
    }

    /// `E / R`.
    pub fn experts_per_rank(&self) -> usize {
        self.num_experts / self.num_ranks
    }

    /// `R / N`.
    pub fn ranks_per_node(&self) -> usize {
        self.num_ranks / self.num_nodes
    }

    /// `E / N`.
    pub fn experts_per_node(&self) -> usize {
        self.num_experts / self.num_nodes
    }

    /// The rank holding `expert`, or `None` when `expert >= E`.
    pub fn rank_of(&self, expert: usize) -> Option<usize> {
        (expert < self.num_experts).then(|| expert / self.experts_per_rank())
    }

    /// The node of `rank`, or `None` when `rank >= R`.
    pub fn node_of(&self, rank: usize) -> Option<usize> {
        (rank < self.num_ranks).then(|| rank / self.ranks_per_node())
    }

    /// The node holding `expert`, or `None` when `expert >= E`.
    pub fn node_of_expert(&self, expert: usize) -> Option<usize> {
        (expert < self.num_experts).then(|| expert / self.experts_per_node())
    }

    /// The position of `rank` within its node (`0..R/N`), or `None` when `rank >= R`.
    pub fn local_index(&self, rank: usize) -> Option<usize> {
        (rank < self.num_ranks).then(|| rank % self.ranks_per_node())
    }

    /// The experts on `rank`, or `None` when `rank >= R`.
    pub fn experts_of(&self, rank: usize) -> Option<Range<usize>> {
        let per = self.experts_per_rank();
        (rank < self.num_ranks).then(|| rank * per..(rank + 1) * per)
    }

    /// The ranks on `node`, or `None` when `node >= N`.
    pub fn ranks_of(&self, node: usize) -> Option<Range<usize>> {
        let per = self.ranks_per_node();
        (node < self.num_nodes).then(|| node * per..(node + 1) * per)
    }

    /// Per-rank sums of a per-expert `load` (`[E]` -> `[R]`), or `None` when `load` is not
    /// `E` long.
    pub fn rank_loads(&self, load: &[u64]) -> Option<Vec<u64>> {
        (load.len() == self.num_experts).then(|| load.chunks(self.experts_per_rank()).map(|c| c.iter().sum()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_uneven_or_zero_splits() {
        assert_eq!(Placement::new(0, 1, 1), Err(PlacementError::Zero { field: "num_experts" }));
        assert_eq!(Placement::new(8, 0, 1), Err(PlacementError::Zero { field: "num_ranks" }));
        assert_eq!(Placement::new(8, 4, 0), Err(PlacementError::Zero { field: "num_nodes" }));
        assert_eq!(Placement::new(10, 4, 1), Err(PlacementError::ExpertsPerRank { num_experts: 10, num_ranks: 4 }));
        assert_eq!(Placement::new(12, 6, 4), Err(PlacementError::RanksPerNode { num_ranks: 6, num_nodes: 4 }));
        let p = Placement::new(16, 8, 4).unwrap();
        assert_eq!(p.check_groups(0), Err(PlacementError::Zero { field: "num_groups" }));
        assert_eq!(p.check_groups(3), Err(PlacementError::ExpertsPerGroup { num_experts: 16, num_groups: 3 }));
        // 2 groups of 8 over 4 nodes of 4: each group spans two nodes.
        assert_eq!(p.check_groups(2), Err(PlacementError::GroupsStraddleNodes { num_groups: 2, num_nodes: 4 }));
        assert_eq!(p.check_groups(4), Ok(()));
        assert_eq!(p.check_groups(8), Ok(()));
    }

    #[test]
    fn lookups_agree_with_a_hand_built_table() {
        let p = Placement::new(24, 6, 3).unwrap();
        // Hand-built: expert -> rank, walking ranks in order.
        let mut rank_of = Vec::new();
        for rank in 0..6 {
            rank_of.extend(std::iter::repeat_n(rank, 4));
        }
        for (expert, &rank) in rank_of.iter().enumerate() {
            assert_eq!(p.rank_of(expert), Some(rank));
            assert_eq!(p.node_of(rank), Some(rank / 2));
            assert_eq!(p.node_of_expert(expert), Some(rank / 2));
            assert!(p.experts_of(rank).unwrap().contains(&expert));
            assert!(p.ranks_of(rank / 2).unwrap().contains(&rank));
            assert_eq!(p.local_index(rank), Some(rank % 2));
        }
        assert_eq!((p.rank_of(24), p.node_of(6), p.experts_of(6), p.ranks_of(3)), (None, None, None, None));
        assert_eq!(p.rank_loads(&(0..24).collect::<Vec<u64>>()), Some(vec![6, 22, 38, 54, 70, 86]));
        assert_eq!(p.rank_loads(&[1, 2]), None);
    }

    #[test]
    fn node_groups_keep_m_groups_within_m_nodes() {
        // Every group's experts share one node when G is a multiple of N.
        let p = Placement::new(64, 16, 4).unwrap();
        for groups in [4, 8, 16] {
            p.check_groups(groups).unwrap();
            let per_group = 64 / groups;
            for g in 0..groups {
                let nodes: std::collections::BTreeSet<_> =
                    (g * per_group..(g + 1) * per_group).map(|e| p.node_of_expert(e)).collect();
                assert_eq!(nodes.len(), 1, "group {g} of {groups}");
            }
        }
    }
}
