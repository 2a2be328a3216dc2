//! Load-aware expert placement (DeepSeek's EPLB, hierarchical policy): replicate the hottest
//! experts into spare slots and pack experts onto GPUs so that per-GPU load is even.
//!
//! From an observed per-expert load (a `RoutingTrace` layer's `expert_load`, or a
//! `LoadTracker` total):
//!
//! 1. whole routing groups are packed onto nodes, evenly by load and count, so a group still
//!    lives on one node and node-limited routing still limits nodes;
//! 2. within each node, its slots are filled by giving one more replica, again and again, to
//!    the expert with the highest load per replica;
//! 3. the node's replicas (each carrying `load / replicas`) are packed onto its GPUs, evenly
//!    by load and count.
//!
//! Packing is longest-first onto the least loaded bin that has room, as in DeepSeek's
//! `eplb.py`. A token of a replicated expert is assumed to go to any replica with equal
//! chance, so each replica carries an equal share of the expert's load.
//!
//! ```
//! use moe_parallel::eplb::ReplicaPlan;
//!
//! // 8 experts in 4 groups, 2 nodes of 2 GPUs, 3 slots per GPU (4 spare).
//! let load = [300, 40, 40, 40, 100, 100, 100, 100];
//! let plan = ReplicaPlan::rebalance(&load, 4, 2, 4, 12).unwrap();
//! assert!(plan.replicas()[0] >= 2); // the hot expert got spare slots
//! let (before, after) = plan.max_violation_before_after(&load).unwrap();
//! assert!(after < before / 2.0, "{before} -> {after}");
//! //! ```

use thiserror::Error;

use crate::Placement;

/// A rebalancing that cannot be done: names the values and what was expected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EplbError {
    /// A count that must be positive was zero.
    #[error("{field} must be at least 1, got 0")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// The experts do not split evenly into groups.
    #[error("num_experts ({num_experts}) must be a multiple of num_groups ({num_groups})")]
    ExpertsPerGroup {
        /// Experts (the load's length).
        num_experts: usize,
        /// Groups.
        num_groups: usize,
    },
    /// The groups do not split evenly over the nodes.
    #[error("num_groups ({num_groups}) must be a multiple of num_nodes ({num_nodes})")]
    GroupsPerNode {
        /// Groups.
        num_groups: usize,
        /// Nodes.
        num_nodes: usize,
    },
    /// The ranks do not split evenly over the nodes.
    #[error("num_ranks ({num_ranks}) must be a multiple of num_nodes ({num_nodes})")]
    RanksPerNode {
        /// Ranks.
        num_ranks: usize,
        /// Nodes.
        num_nodes: usize,
    },
    /// The slots do not split evenly over the ranks.
    #[error("num_slots ({num_slots}) must be a multiple of num_ranks ({num_ranks})")]
    SlotsPerRank {
        /// Slots.
        num_slots: usize,
        /// Ranks.
        num_ranks: usize,
    },
    /// Fewer slots than experts: some expert would have no replica.
    #[error("num_slots ({num_slots}) must be at least num_experts ({num_experts})")]
    TooFewSlots {
        /// Slots.
        num_slots: usize,
        /// Experts.
        num_experts: usize,
    },
}

/// Which logical expert each physical slot holds: rank `r` holds slots
/// `r * slots_per_rank .. (r + 1) * slots_per_rank`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaPlan {
    slots_per_rank: usize,
    slot_experts: Vec<usize>,
    replicas: Vec<usize>,
}

/// MaxVio of real-valued loads: (max - mean) / mean, 0 when all are 0.
pub fn max_violation(loads: &[f64]) -> f64 {
    if loads.is_empty() {
        return 0.0;
    }
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    if mean <= 0.0 {
        return 0.0;
    }
    (loads.iter().copied().fold(f64::NEG_INFINITY, f64::max) - mean) / mean
}

/// Packs items of `weights` into `bins` bins of `weights.len() / bins` items each, heaviest
/// first onto the lightest bin with room (ties to the lower index). Returns each item's bin.
fn balanced_packing(weights: &[f64], bins: usize) -> Vec<usize> {
    let capacity = weights.len() / bins;
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut bin_load = vec![0.0f64; bins];
    let mut bin_count = vec![0; bins];
    let mut bin_of = vec![0; weights.len()];
    for item in order {
        // Capacities sum to the item count, so a bin with room always exists.
        let bin = (0..bins)
            .filter(|&b| bin_count[b] < capacity)
            .min_by(|&a, &b| bin_load[a].total_cmp(&bin_load[b]).then(a.cmp(&b)))
            .unwrap_or(0);
        bin_of[item] = bin;
        bin_load[bin] += weights[item];
        bin_count[bin] += 1;
    }
    bin_of
}

impl ReplicaPlan {
    /// Plans `num_slots` physical expert slots over `num_ranks` ranks on `num_nodes` nodes for
    /// the per-expert `load` (`[E]`) of `num_groups` contiguous routing groups.
    pub fn rebalance(
        load: &[u64],
        num_groups: usize,
        num_nodes: usize,
        num_ranks: usize,
        num_slots: usize,
    ) -> Result<Self, EplbError> {
        let num_experts = load.len();
        for (field, value) in [
            ("num_experts", num_experts),
            ("num_groups", num_groups),
            ("num_nodes", num_nodes),
            ("num_ranks", num_ranks),
            ("num_slots", num_slots),
        ] {
            if value == 0 {
                return Err(EplbError::Zero { field });
            }
        }
        if !num_experts.is_multiple_of(num_groups) {
            return Err(EplbError::ExpertsPerGroup { num_experts, num_groups });
        }
        if !num_groups.is_multiple_of(num_nodes) {
            return Err(EplbError::GroupsPerNode { num_groups, num_nodes });
        }
        if !num_ranks.is_multiple_of(num_nodes) {
            return Err(EplbError::RanksPerNode { num_ranks, num_nodes });
        }
        if !num_slots.is_multiple_of(num_ranks) {
            return Err(EplbError::SlotsPerRank { num_slots, num_ranks });
        }
        if num_slots < num_experts {
            return Err(EplbError::TooFewSlots { num_slots, num_experts });
        }
        let per_group = num_experts / num_groups;
        let ranks_per_node = num_ranks / num_nodes;
        let slots_per_node = num_slots / num_nodes;
        let slots_per_rank = num_slots / num_ranks;
        let load: Vec<f64> = load.iter().map(|&l| l as f64).collect();

        // 1. Groups to nodes.
        let group_load: Vec<f64> = load.chunks(per_group).map(|g| g.iter().sum()).collect();
        let node_of_group = balanced_packing(&group_load, num_nodes);

        let mut replicas = vec![0; num_experts];
        let mut slot_experts = vec![0; num_slots];
        for node in 0..num_nodes {
            let experts: Vec<usize> = (0..num_groups)
                .filter(|&g| node_of_group[g] == node)
                .flat_map(|g| g * per_group..(g + 1) * per_group)
                .collect();
            // 2. Replicas: one each, then the spare slots to the highest load per replica.
            let mut count = vec![1usize; experts.len()];
            for _ in experts.len()..slots_per_node {
                let hottest = (0..experts.len())
                    .max_by(|&a, &b| {
                        (load[experts[a]] / count[a] as f64)
                            .total_cmp(&(load[experts[b]] / count[b] as f64))
                            .then(b.cmp(&a))
                    })
                    .unwrap_or(0);
                count[hottest] += 1;
            }
            // 3. Replicas to the node's GPUs.
            let physical: Vec<usize> = (0..experts.len()).flat_map(|i| std::iter::repeat_n(i, count[i])).collect();
            let share: Vec<f64> = physical.iter().map(|&i| load[experts[i]] / count[i] as f64).collect();
            let gpu_of = balanced_packing(&share, ranks_per_node);
            let mut filled = vec![0; ranks_per_node];
            for (p, &i) in physical.iter().enumerate() {
                let rank = node * ranks_per_node + gpu_of[p];
                slot_experts[rank * slots_per_rank + filled[gpu_of[p]]] = experts[i];
                filled[gpu_of[p]] += 1;
            }
            for (i, &e) in experts.iter().enumerate() {
                replicas[e] = count[i];
            }
        }
        Ok(Self { slots_per_rank, slot_experts, replicas })
    }

    /// Ranks of the plan.
    pub fn num_ranks(&self) -> usize {
        self.slot_experts.len() / self.slots_per_rank
    }

    /// Physical expert slots per rank.
    pub fn slots_per_rank(&self) -> usize {
        self.slots_per_rank
    }

    /// The logical expert of every slot, rank-major.
    pub fn slot_experts(&self) -> &[usize] {
        &self.slot_experts
    }

    /// The logical experts on `rank` (a replicated expert may appear on several ranks), or
    /// `None` past the last rank.
    pub fn experts_of(&self, rank: usize) -> Option<&[usize]> {
        let s = self.slots_per_rank;
        self.slot_experts.get(rank * s..(rank + 1) * s)
    }

    /// Replicas of each logical expert (each at least 1; they sum to the slots).
    pub fn replicas(&self) -> &[usize] {
        &self.replicas
    }

    /// Per-rank MaxVio of `load` on the contiguous placement (`E / R` experts per rank, no
    /// replica) and on this plan, or `None` when `E` is not a multiple of the ranks or `load`
    /// is not the plan's `E` long.
    pub fn max_violation_before_after(&self, load: &[u64]) -> Option<(f64, f64)> {
        if load.len() != self.replicas.len() {
            return None;
        }
        let contiguous = Placement::new(load.len(), self.num_ranks(), 1).ok()?.rank_loads(load)?;
        let before = max_violation(&contiguous.iter().map(|&l| l as f64).collect::<Vec<_>>());
        Some((before, max_violation(&self.rank_loads(load))))
    }

    /// Per-rank load when each expert's `load` is split evenly over its replicas. `load`
    /// entries past the plan's experts are ignored, missing ones count as 0.
    pub fn rank_loads(&self, load: &[u64]) -> Vec<f64> {
        self.slot_experts
            .chunks(self.slots_per_rank)
            .map(|slots| {
                slots.iter().map(|&e| load.get(e).copied().unwrap_or(0) as f64 / self.replicas[e] as f64).sum()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Zipf(s) load over `experts` with a seeded random popularity order.
    fn zipf_load(experts: usize, s: f64, seed: u64) -> Vec<u64> {
        let mut rank: Vec<usize> = (0..experts).collect();
        SplitMix64::new(seed).shuffle(&mut rank);
        rank.iter().map(|&r| (1e6 / ((r + 1) as f64).powf(s)).round() as u64).collect()
    }

    /// Checks every structural promise of a plan against hand loops.
    fn check_plan(plan: &ReplicaPlan, load: &[u64], groups: usize, nodes: usize, ranks: usize, slots: usize) {
        let experts = load.len();
        assert_eq!(plan.slot_experts().len(), slots);
        assert_eq!(plan.num_ranks(), ranks);
        let mut seen = vec![0; experts];
        for r in 0..ranks {
            let on_rank = plan.experts_of(r).unwrap();
            assert_eq!(on_rank.len(), slots / ranks);
            on_rank.iter().for_each(|&e| seen[e] += 1);
        }
        assert_eq!(seen, plan.replicas());
        assert!(plan.replicas().iter().all(|&c| c >= 1));
        // Every replica of every expert of a group lies on one node.
        let per_group = experts / groups;
        let ranks_per_node = ranks / nodes;
        for g in 0..groups {
            let mut group_nodes: Vec<usize> = (0..ranks)
                .filter(|&r| plan.experts_of(r).unwrap().iter().any(|&e| e / per_group == g))
                .map(|r| r / ranks_per_node)
                .collect();
            group_nodes.dedup();
            assert_eq!(group_nodes.len(), 1, "group {g} spans nodes {group_nodes:?}");
        }
        // The load is conserved: rank loads add up to the total.
        let total: f64 = load.iter().sum::<u64>() as f64;
        let placed: f64 = plan.rank_loads(load).iter().sum();
        assert!((placed - total).abs() <= 1e-9 * total.max(1.0));
    }

    #[test]
    fn skewed_load_is_evened_out() {
        // DeepSeek-V3-like: 256 experts, 8 groups on 8 nodes of 8 GPUs, 64 spare slots.
        let (experts, groups, nodes, ranks, slots) = (256, 8, 8, 64, 320);
        for seed in 0..4 {
            let load = zipf_load(experts, 1.0, seed);
            let plan = ReplicaPlan::rebalance(&load, groups, nodes, ranks, slots).unwrap();
            check_plan(&plan, &load, groups, nodes, ranks, slots);
            let contiguous = Placement::new(experts, ranks, nodes).unwrap().rank_loads(&load).unwrap();
            let before = max_violation(&contiguous.iter().map(|&l| l as f64).collect::<Vec<_>>());
            let after = max_violation(&plan.rank_loads(&load));
            assert_eq!(plan.max_violation_before_after(&load), Some((before, after)));
            assert!(before > 1.0, "seed {seed}: before {before}");
            assert!(after < before / 4.0, "seed {seed}: before {before}, after {after}");
        }
    }

    #[test]
    fn even_load_without_spares_stays_even_and_extra_slots_go_to_the_hottest() {
        let load = vec![10; 32];
        let plan = ReplicaPlan::rebalance(&load, 4, 2, 8, 32).unwrap();
        check_plan(&plan, &load, 4, 2, 8, 32);
        assert_eq!(max_violation(&plan.rank_loads(&load)), 0.0);

        // One hot expert per node: the spare slots all go to it.
        let mut load = vec![1; 16];
        load[3] = 100;
        load[12] = 100;
        let plan = ReplicaPlan::rebalance(&load, 2, 2, 4, 24).unwrap();
        check_plan(&plan, &load, 2, 2, 4, 24);
        assert_eq!((plan.replicas()[3], plan.replicas()[12]), (5, 5));
    }

    #[test]
    fn random_loads_keep_every_promise() {
        let mut rng = SplitMix64::new(11);
        for (experts, groups, nodes, ranks, slots) in [(16, 4, 2, 4, 20), (64, 8, 4, 16, 64), (48, 6, 3, 6, 60)] {
            for _ in 0..20 {
                let load: Vec<u64> = (0..experts).map(|_| rng.below(1000)).collect();
                let plan = ReplicaPlan::rebalance(&load, groups, nodes, ranks, slots).unwrap();
                check_plan(&plan, &load, groups, nodes, ranks, slots);
            }
        }
    }

    #[test]
    fn refuses_impossible_layouts() {
        let load = vec![1; 16];
        assert_eq!(ReplicaPlan::rebalance(&[], 1, 1, 1, 1), Err(EplbError::Zero { field: "num_experts" }));
        assert_eq!(ReplicaPlan::rebalance(&load, 0, 1, 1, 16), Err(EplbError::Zero { field: "num_groups" }));
        assert_eq!(
            ReplicaPlan::rebalance(&load, 3, 1, 1, 16),
            Err(EplbError::ExpertsPerGroup { num_experts: 16, num_groups: 3 })
        );
        assert_eq!(
            ReplicaPlan::rebalance(&load, 2, 4, 4, 16),
            Err(EplbError::GroupsPerNode { num_groups: 2, num_nodes: 4 })
        );
        assert_eq!(
            ReplicaPlan::rebalance(&load, 4, 2, 3, 18),
            Err(EplbError::RanksPerNode { num_ranks: 3, num_nodes: 2 })
        );
        assert_eq!(
            ReplicaPlan::rebalance(&load, 4, 2, 4, 18),
            Err(EplbError::SlotsPerRank { num_slots: 18, num_ranks: 4 })
        );
        assert_eq!(
            ReplicaPlan::rebalance(&load, 4, 2, 4, 12),
            Err(EplbError::TooFewSlots { num_slots: 12, num_experts: 16 })
        );
    }

    #[test]
    fn packing_fills_every_bin_to_capacity() {
        let bins = balanced_packing(&[5.0, 1.0, 4.0, 2.0, 3.0, 3.0], 3);
        let mut counts = [0; 3];
        let mut loads = [0.0; 3];
        for (item, &b) in bins.iter().enumerate() {
            counts[b] += 1;
            loads[b] += [5.0, 1.0, 4.0, 2.0, 3.0, 3.0][item];
        }
        assert_eq!(counts, [2, 2, 2]);
        // Longest-first: 5 | 4 | 3, then 3 -> bin 2, 2 -> bin 1, 1 -> bin 0: all 6.
        assert_eq!(loads, [6.0, 6.0, 6.0]);
    }
}
