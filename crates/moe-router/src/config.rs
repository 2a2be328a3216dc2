use burn::config::Config;
use moe_kernels::ScoreFunction;
use thiserror::Error;

/// Configuration of a [`crate::TopKRouter`]. Call [`RouterConfig::validate`] (or `init`, which
/// does) before use.
#[derive(Config, Debug, PartialEq)]
pub struct RouterConfig {
    /// Width `d` of the token vectors.
    pub d_model: usize,
    /// Routed experts `E`.
    pub num_experts: usize,
    /// Experts chosen per token `K`.
    pub top_k: usize,
    /// Affinity function.
    #[config(default = "ScoreFunction::Sigmoid")]
    pub score_function: ScoreFunction,
    /// Expert groups `G` (nodes, for node-limited routing); 1 turns group routing off.
    #[config(default = 1)]
    pub num_groups: usize,
    /// Groups kept per token (`topk_group`, DeepSeek-V3's M).
    #[config(default = 1)]
    pub topk_groups: usize,
    /// How many of a group's best biased scores add up to its group score.
    #[config(default = 2)]
    pub group_score_topk: usize,
    /// Normalise the K weights to sum to one before the route scale.
    #[config(default = true)]
    pub normalize_weights: bool,
    /// Factor on the routing weights (`routed_scaling_factor`).
    #[config(default = 1.0)]
    pub route_scale: f64,
    /// Weight of the router z-loss; `None` turns it off.
    #[config(default = "None")]
    pub z_loss_weight: Option<f64>,
}

/// A [`RouterConfig`] that cannot route: names the field and what was expected.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RouterConfigError {
    /// A size that must be positive was zero.
    #[error("{field} must be at least 1, got 0")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// `num_experts` is not a multiple of `num_groups`.
    #[error("num_experts ({num_experts}) must be a multiple of num_groups ({num_groups})")]
    GroupsDoNotDivide {
        /// Experts.
        num_experts: usize,
        /// Groups.
        num_groups: usize,
    },
    /// More groups kept than exist.
    #[error("topk_groups ({topk_groups}) must be in 1..={num_groups} (num_groups)")]
    TooManyKeptGroups {
        /// Kept groups.
        topk_groups: usize,
        /// Groups.
        num_groups: usize,
    },
    /// The group score sums more scores than a group has experts.
    #[error("group_score_topk ({value}) must be in 1..={experts_per_group} (experts per group)")]
    GroupScoreTopk {
        /// The value given.
        value: usize,
        /// `num_experts / num_groups`.
        experts_per_group: usize,
    },
    /// K exceeds the experts the kept groups hold.
    #[error("top_k ({top_k}) exceeds the {available} experts that topk_groups x experts per group leave")]
    TopKTooLarge {
        /// K.
        top_k: usize,
        /// Experts in the kept groups.
        available: usize,
    },
    /// The route scale is not a finite positive number.
    #[error("route_scale must be finite and > 0, got {0}")]
    RouteScale(f64),
    /// The z-loss weight is not a finite non-negative number.
    #[error("z_loss_weight must be finite and >= 0, got {0}")]
    ZLossWeight(f64),
}

impl RouterConfig {
    /// Checks every field and their combinations.
    pub fn validate(&self) -> Result<(), RouterConfigError> {
        for (field, value) in [
            ("d_model", self.d_model),
            ("num_experts", self.num_experts),
            ("top_k", self.top_k),
            ("num_groups", self.num_groups),
        ] {
            if value == 0 {
                return Err(RouterConfigError::Zero { field });
            }
        }
        if !self.num_experts.is_multiple_of(self.num_groups) {
            return Err(RouterConfigError::GroupsDoNotDivide {
                num_experts: self.num_experts,
                num_groups: self.num_groups,
            });
        }
        if self.topk_groups == 0 || self.topk_groups > self.num_groups {
            return Err(RouterConfigError::TooManyKeptGroups {
                topk_groups: self.topk_groups,
                num_groups: self.num_groups,
            });
        }
        let experts_per_group = self.num_experts / self.num_groups;
        if self.num_groups > 1 && (self.group_score_topk == 0 || self.group_score_topk > experts_per_group) {
            return Err(RouterConfigError::GroupScoreTopk { value: self.group_score_topk, experts_per_group });
        }
        let available = self.topk_groups * experts_per_group;
        if self.top_k > available {
            return Err(RouterConfigError::TopKTooLarge { top_k: self.top_k, available });
        }
        if !(self.route_scale.is_finite() && self.route_scale > 0.0) {
            return Err(RouterConfigError::RouteScale(self.route_scale));
        }
        if let Some(w) = self.z_loss_weight
            && !(w.is_finite() && w >= 0.0)
        {
            return Err(RouterConfigError::ZLossWeight(w));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RouterConfig {
        RouterConfig::new(8, 16, 4).with_num_groups(4).with_topk_groups(2)
    }

    #[test]
    fn each_impossible_combination_names_its_field() {
        let cases: Vec<(RouterConfig, RouterConfigError)> = vec![
            (RouterConfig { top_k: 0, ..base() }, RouterConfigError::Zero { field: "top_k" }),
            (RouterConfig { num_experts: 0, ..base() }, RouterConfigError::Zero { field: "num_experts" }),
            (RouterConfig { d_model: 0, ..base() }, RouterConfigError::Zero { field: "d_model" }),
            (base().with_num_groups(3), RouterConfigError::GroupsDoNotDivide { num_experts: 16, num_groups: 3 }),
            (base().with_topk_groups(5), RouterConfigError::TooManyKeptGroups { topk_groups: 5, num_groups: 4 }),
            (base().with_topk_groups(0), RouterConfigError::TooManyKeptGroups { topk_groups: 0, num_groups: 4 }),
            (RouterConfig { top_k: 9, ..base() }, RouterConfigError::TopKTooLarge { top_k: 9, available: 8 }),
            (base().with_group_score_topk(5), RouterConfigError::GroupScoreTopk { value: 5, experts_per_group: 4 }),
            (base().with_route_scale(0.0), RouterConfigError::RouteScale(0.0)),
            (base().with_z_loss_weight(Some(-1.0)), RouterConfigError::ZLossWeight(-1.0)),
        ];
        for (config, expected) in cases {
            assert_eq!(config.validate(), Err(expected));
        }
        assert!(matches!(base().with_route_scale(f64::NAN).validate(), Err(RouterConfigError::RouteScale(_))));
        assert_eq!(base().validate(), Ok(()));
        // K = E is legal without groups.
        assert_eq!(RouterConfig::new(8, 6, 6).validate(), Ok(()));
    }

    #[test]
    fn config_round_trips_through_json() {
        let config = base().with_score_function(ScoreFunction::Softmax).with_z_loss_weight(Some(1e-3));
        let json = format!("{config}");
        assert!(json.contains("\"softmax\""), "{json}");
        let back: RouterConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
    }
}
