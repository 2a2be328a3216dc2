use burn::tensor::{Int, Tensor, backend::AutodiffBackend, backend::Backend};

/// How many (token, slot) pairs one expert may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CapacityLimit {
    /// Every pair is kept: the default, as in DeepSeek-V3.
    Dropless,
    /// At most `ceil(factor * N / E)` pairs per expert (GShard/Switch capacity factor);
    /// the rest are dropped and counted.
    Factor(f64),
}

impl CapacityLimit {
    /// The per-expert limit for `pairs` pairs over `num_experts` experts, or `None` when
    /// dropless.
    pub fn rows_per_expert(self, pairs: usize, num_experts: usize) -> Option<usize> {
        match self {
            Self::Dropless => None,
            Self::Factor(f) => Some((f * pairs as f64 / num_experts as f64).ceil().max(0.0) as usize),
        }
    }
}

/// How the portable default lays expert segments out in the dispatch rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchLayout {
    /// Every segment padded to the largest (`capacity` rows), so the grouped matmul is one
    /// batched matmul: one launch per projection, the right shape for GPUs.
    Padded,
    /// Segments back to back, no padding; the grouped matmul is one 2-D matmul per non-empty
    /// segment, sized from the host counts the plan already read (no extra sync). On CPUs this
    /// beats a batched matmul and wastes no compute on padding.
    Segments,
}

/// Where every (token, slot) pair goes in the dispatch layout, made by
/// [`crate::MoeBackend::moe_plan`].
///
/// Expert `e` owns `segment_rows[e]` rows starting at the sum of the earlier segments; the row
/// after the last segment is a zero row that dropped pairs point at.
#[derive(Debug, Clone)]
pub struct DispatchPlan<B: Backend> {
    pub(crate) tokens: usize,
    pub(crate) top_k: usize,
    pub(crate) num_experts: usize,
    pub(crate) capacity: usize,
    pub(crate) layout: DispatchLayout,
    /// Rows each expert owns in the layout (host).
    pub(crate) segment_rows: Vec<usize>,
    /// `[N]`: the dispatch row of each pair, token-major (`pair = t * K + k`).
    pub(crate) row_of_pair: Tensor<B, 1, Int>,
    /// `[rows]`: 1 + the token each row reads, 0 for padding.
    pub(crate) source_of_row: Tensor<B, 1, Int>,
    /// `[E + 2]` on the device: pairs routed to each expert, before drops, then the smallest
    /// and the largest id (what the host read; narrowed on demand, as a slice would launch a
    /// copy under fusion).
    pub(crate) summary: Tensor<B, 1, Int>,
    pub(crate) counts: Vec<usize>,
    pub(crate) dropped: usize,
}

impl<B: Backend> DispatchPlan<B> {
    /// Pairs routed to each expert, before any drop (host copy).
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// Pairs routed to each expert, before any drop, on the device.
    pub fn counts_device(&self) -> Tensor<B, 1, Int> {
        self.summary.clone().narrow(0, 0, self.num_experts)
    }

    /// Pairs dropped by the capacity limit.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// The most pairs one expert keeps (the padded layout's rows per expert; at least 1).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The layout of the dispatch rows.
    pub fn layout(&self) -> DispatchLayout {
        self.layout
    }

    /// Rows each expert owns in the dispatch layout.
    pub fn segment_rows(&self) -> &[usize] {
        &self.segment_rows
    }

    /// Tokens `T` of the planned batch.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Experts per token `K`.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Experts `E`.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// `[N]` dispatch row of each (token, slot) pair, token-major.
    pub fn row_of_pair(&self) -> Tensor<B, 1, Int> {
        self.row_of_pair.clone()
    }
}

impl<B: Backend> DispatchPlan<B> {
    /// The same plan with its device tensors moved by `f` to backend `C`.
    fn map_tensors<C: Backend>(self, f: impl Fn(Tensor<B, 1, Int>) -> Tensor<C, 1, Int>) -> DispatchPlan<C> {
        DispatchPlan {
            tokens: self.tokens,
            top_k: self.top_k,
            num_experts: self.num_experts,
            capacity: self.capacity,
            layout: self.layout,
            segment_rows: self.segment_rows,
            row_of_pair: f(self.row_of_pair),
            source_of_row: f(self.source_of_row),
            summary: f(self.summary),
            counts: self.counts,
            dropped: self.dropped,
        }
    }
}

// The plan holds int tensors only, which autodiff does not track: moving it between an
// autodiff backend and its inner backend detaches nothing.
impl<B: AutodiffBackend> DispatchPlan<B> {
    /// The same plan on the inner backend, for a backward that runs there.
    pub(crate) fn to_inner(&self) -> DispatchPlan<B::InnerBackend> {
        self.clone().map_tensors(Tensor::inner)
    }

    /// A plan made on the inner backend, for this autodiff backend.
    pub(crate) fn from_inner(plan: DispatchPlan<B::InnerBackend>) -> Self {
        plan.map_tensors(Tensor::from_inner)
    }
}
