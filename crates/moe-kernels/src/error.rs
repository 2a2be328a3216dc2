use thiserror::Error;

/// An input the dispatch plan cannot lay out (`MoeBackend::moe_plan`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// An expert id outside `0..num_experts`.
    #[error("expert id {id} is out of range: expected 0..{num_experts}")]
    ExpertIdOutOfRange {
        /// The offending id.
        id: i64,
        /// The number of experts.
        num_experts: usize,
    },
    /// `num_experts` was zero.
    #[error("num_experts must be at least 1, got 0")]
    NoExperts,
    /// The sort keys `expert * N + order` would overflow a 32-bit int (the int type of Flex,
    /// CUDA and wgpu).
    #[error(
        "{pairs} (token, slot) pairs over {num_experts} experts exceed the dispatch sort's key range: expected num_experts * pairs < 2^31"
    )]
    TooManyPairs {
        /// `T * K`.
        pairs: usize,
        /// E.
        num_experts: usize,
    },
    /// The priority tensor's shape differs from the expert ids'.
    #[error("priority shape {priority:?} differs from expert_ids shape {ids:?}")]
    PriorityShape {
        /// Shape of the priority tensor.
        priority: [usize; 2],
        /// Shape of the expert ids.
        ids: [usize; 2],
    },
}
