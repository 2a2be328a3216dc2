//! [`ExpertParallelMoe`]: route, dispatch, grouped compute, return, combine, over ranks.

use burn::module::{Param, ParamId};
use burn::tensor::{IndexingUpdateOp, Int, Tensor, backend::Backend};
use moe_experts::{ExpertBank, MoeBackend, MoeLayer, SwiGlu};
use moe_kernels::CapacityLimit;
use moe_router::TopKRouter;

use super::{EpError, Message, RankAccounting, RankTransport, StepAccounting, Transport};
use crate::Placement;

/// The token rows one rank sends another: each token once, however many of its experts the
/// destination holds (as DeepSeek-V3's dispatch does), with the (row, local expert) pairs to
/// compute and their routing weights.
#[derive(Debug, Clone)]
pub struct DispatchMessage<B: Backend> {
    /// `[n, d]` token rows, `None` when nothing is sent.
    pub rows: Option<Tensor<B, 2>>,
    /// `(row, expert index within the destination's shard)` per pair.
    pub pairs: Vec<(usize, usize)>,
    /// `[pairs]` routing weights, `None` when nothing is sent.
    pub weights: Option<Tensor<B, 1>>,
}

/// The weighted sums of a token's expert outputs on one rank, sent back to the token's rank
/// (one row per dispatched row, in the same order).
#[derive(Debug, Clone)]
pub struct CombineMessage<B: Backend> {
    /// `[n, d]`, `None` when nothing is sent.
    pub rows: Option<Tensor<B, 2>>,
}

impl<B: Backend> Message for DispatchMessage<B> {
    fn num_rows(&self) -> usize {
        self.rows.as_ref().map_or(0, |r| r.dims()[0])
    }
}

impl<B: Backend> Message for CombineMessage<B> {
    fn num_rows(&self) -> usize {
        self.rows.as_ref().map_or(0, |r| r.dims()[0])
    }
}

/// A [`MoeLayer`] whose routed experts are sharded over the ranks of a [`Placement`]; the
/// router and the shared experts are replicated (every rank runs them on its own tokens).
#[derive(Debug, Clone)]
pub struct ExpertParallelMoe<B: Backend> {
    /// The gate (a copy on every rank).
    pub router: TopKRouter<B>,
    /// Rank `r`'s experts, `placement.experts_of(r)`.
    pub shards: Vec<ExpertBank<B>>,
    /// The shared experts, if any (a copy on every rank).
    pub shared: Option<SwiGlu<B>>,
    placement: Placement,
    d_model: usize,
    node_limit: Option<usize>,
}

/// One rank's tokens with their routing, for [`ExpertParallelMoe::forward_routed`]. The ids
/// are on the host, where the dispatch needs them to size the messages: a caller that routed
/// all ranks' tokens at once reads them in one transfer.
#[derive(Debug, Clone)]
pub struct RoutedTokens<B: Backend> {
    /// `[T, d]` tokens.
    pub x: Tensor<B, 2>,
    /// `T * K` chosen experts (global ids), token-major.
    pub expert_ids: Vec<usize>,
    /// `[T, K]` routing weights.
    pub weights: Tensor<B, 2>,
}

impl<B: Backend> RoutedTokens<B> {
    /// Expert ids `[T, K]` read to the host, token-major, as [`RoutedTokens::expert_ids`] holds
    /// them: one transfer, so read all ranks' ids at once where they were routed together.
    pub fn host_ids(expert_ids: Tensor<B, 2, Int>) -> Vec<usize> {
        expert_ids.into_data().iter::<i64>().map(|e| e as usize).collect()
    }
}

/// What a rank keeps between its dispatch and its combine.
pub(super) struct Dispatched<B: Backend> {
    x: Tensor<B, 2>,
    /// Per destination rank, the tokens sent (each once, in token order).
    to_dst: Vec<Vec<usize>>,
    pub(super) accounting: RankAccounting,
}

/// Rank `rank`'s slice `[E/R, a, b]` of a stacked `[E, a, b]` weight, as a parameter of its
/// own (detached: a rank owns its experts, and a parameter must be a graph leaf).
fn shard_of<B: Backend>(weight: &Param<Tensor<B, 3>>, rank: usize, per_rank: usize) -> Param<Tensor<B, 3>> {
    Param::from_tensor(weight.val().narrow(0, rank * per_rank, per_rank).detach())
}

/// Ids as backend ints.
fn int_tensor<B: Backend>(values: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let values: Vec<i64> = values.iter().map(|&v| v as i64).collect();
    Tensor::from_ints(values.as_slice(), device)
}

impl<B: MoeBackend> ExpertParallelMoe<B> {
    /// Shards `layer`'s experts over `placement`'s ranks (copies the weights).
    ///
    /// When the router's groups lie within nodes (`placement.check_groups` accepts them),
    /// keeping `M` groups reaches at most `M` nodes, and every forward checks it
    /// ([`EpError::NodeLimit`]).
    pub fn from_layer(layer: &MoeLayer<B>, placement: Placement) -> Result<Self, EpError> {
        Self::sharded(layer, placement, shard_of)
    }

    /// Shards `layer`'s experts over `placement`'s ranks as views of its weights (no copy
    /// kept apart): under `Autodiff`, gradients of a forward through the view reach `layer`'s
    /// own parameters, so a model that owns the layer trains through it. Build one per step,
    /// after the optimizer has updated `layer`.
    pub fn view_of(layer: &MoeLayer<B>, placement: Placement) -> Result<Self, EpError> {
        Self::sharded(layer, placement, |weight, rank, per_rank| {
            Param::initialized(ParamId::new(), weight.val().narrow(0, rank * per_rank, per_rank))
        })
    }

    fn sharded(
        layer: &MoeLayer<B>,
        placement: Placement,
        shard: impl Fn(&Param<Tensor<B, 3>>, usize, usize) -> Param<Tensor<B, 3>>,
    ) -> Result<Self, EpError> {
        let experts = layer.experts.num_experts();
        if placement.num_experts() != experts {
            return Err(EpError::ExpertCount { placement: placement.num_experts(), layer: experts });
        }
        let per_rank = placement.experts_per_rank();
        let shards = (0..placement.num_ranks())
            .map(|r| ExpertBank {
                gate: shard(&layer.experts.gate, r, per_rank),
                up: shard(&layer.experts.up, r, per_rank),
                down: shard(&layer.experts.down, r, per_rank),
            })
            .collect();
        let (groups, kept) = layer.router.groups();
        Ok(Self {
            router: layer.router.clone(),
            shards,
            shared: layer.shared.clone(),
            placement,
            d_model: layer.d_model(),
            node_limit: placement.check_groups(groups).is_ok().then_some(kept),
        })
    }

    /// The placement of the experts.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The most nodes a token may reach (`Some(M)` when the router's groups lie within nodes).
    pub fn node_limit(&self) -> Option<usize> {
        self.node_limit
    }

    /// One forward over all ranks: `inputs[r]` `[T_r, d]` is rank `r`'s tokens (`T_r` may be
    /// 0); the result's `[r]` is their `[T_r, d]` outputs, equal (to rounding) to the
    /// single-device layer's. Dropless. Reads each rank's routed ids to the host once, to
    /// size the messages.
    pub fn forward(
        &self,
        inputs: Vec<Tensor<B, 2>>,
        transport: &mut impl Transport,
    ) -> Result<Vec<Tensor<B, 2>>, EpError> {
        Ok(self.forward_with_accounting(inputs, transport)?.0)
    }

    /// [`Self::forward`], with what the step moved and computed.
    pub fn forward_with_accounting(
        &self,
        inputs: Vec<Tensor<B, 2>>,
        transport: &mut impl Transport,
    ) -> Result<(Vec<Tensor<B, 2>>, StepAccounting), EpError> {
        self.run_ranks(inputs, Self::dispatch, transport)
    }

    /// [`Self::forward_with_accounting`] on tokens the caller has already routed (with this
    /// layer's router, e.g. by [`MoeLayer::route`], whose losses and loads it then keeps):
    /// `inputs[r]` is rank `r`'s tokens `[T_r, d]`, their expert ids (`T_r * K`, on the host)
    /// and routing weights `[T_r, K]`.
    pub fn forward_routed(
        &self,
        inputs: Vec<RoutedTokens<B>>,
        transport: &mut impl Transport,
    ) -> Result<(Vec<Tensor<B, 2>>, StepAccounting), EpError> {
        self.run_ranks(inputs, Self::dispatch_routed, transport)
    }

    /// Every rank's dispatch of its input, both all-to-alls around the ranks' expert compute,
    /// then the combine.
    fn run_ranks<I>(
        &self,
        inputs: Vec<I>,
        dispatch: impl Fn(&Self, usize, I) -> Result<(Dispatched<B>, Vec<DispatchMessage<B>>), EpError>,
        transport: &mut impl Transport,
    ) -> Result<(Vec<Tensor<B, 2>>, StepAccounting), EpError> {
        let ranks = self.placement.num_ranks();
        if inputs.len() != ranks {
            return Err(EpError::RankCount { got: inputs.len(), expected: ranks });
        }
        let mut states = Vec::with_capacity(ranks);
        let mut outgoing = Vec::with_capacity(ranks);
        for (rank, input) in inputs.into_iter().enumerate() {
            let (state, messages) = dispatch(self, rank, input)?;
            states.push(state);
            outgoing.push(messages);
        }
        let incoming = transport.all_to_all(outgoing)?;
        let mut replies = Vec::with_capacity(states.len());
        for ((rank, messages), state) in incoming.into_iter().enumerate().zip(&mut states) {
            let (reply, pairs) = self.compute(rank, messages)?;
            state.accounting.pairs_computed = pairs;
            replies.push(reply);
        }
        let returned = transport.all_to_all(replies)?;
        let accounting: Vec<RankAccounting> = states.iter().map(|s| s.accounting.clone()).collect();
        let outputs = states.into_iter().zip(returned).map(|(state, replies)| self.combine(state, replies)).collect();
        Ok((outputs, StepAccounting::from_ranks(&self.placement, &accounting)?))
    }

    /// One rank's part of the forward, for ranks in their own threads or processes: `x`
    /// `[T, d]` is the tokens of `transport.rank()`, exchanged with the other ranks (which
    /// call this at the same time) through `transport`. Returns their outputs and this rank's
    /// accounting (join the ranks' with [`StepAccounting::from_ranks`]).
    pub fn forward_rank(
        &self,
        x: Tensor<B, 2>,
        transport: &mut impl RankTransport<B>,
    ) -> Result<(Tensor<B, 2>, RankAccounting), EpError> {
        let ranks = self.placement.num_ranks();
        if transport.num_ranks() != ranks {
            return Err(EpError::RankCount { got: transport.num_ranks(), expected: ranks });
        }
        let rank = transport.rank();
        let (mut state, messages) = self.dispatch(rank, x)?;
        let incoming = transport.exchange(messages)?;
        let (replies, pairs) = self.compute(rank, incoming)?;
        state.accounting.pairs_computed = pairs;
        let returned = transport.exchange(replies)?;
        let accounting = state.accounting.clone();
        Ok((self.combine(state, returned), accounting))
    }

    /// Routes one rank's tokens: one message per destination rank, each token once.
    pub(super) fn dispatch(
        &self,
        rank: usize,
        x: Tensor<B, 2>,
    ) -> Result<(Dispatched<B>, Vec<DispatchMessage<B>>), EpError> {
        let dims = x.dims();
        if rank >= self.placement.num_ranks() || dims[1] != self.d_model {
            return Err(EpError::InputShape { rank, dims, d_model: self.d_model });
        }
        if dims[0] == 0 {
            return self.empty_dispatch(rank, x);
        }
        let routing = self.router.forward(x.clone());
        let expert_ids = RoutedTokens::host_ids(routing.expert_ids);
        self.dispatch_routed(rank, RoutedTokens { x, expert_ids, weights: routing.weights })
    }

    /// An empty rank routes nothing but still takes part in both exchanges.
    fn empty_dispatch(
        &self,
        rank: usize,
        x: Tensor<B, 2>,
    ) -> Result<(Dispatched<B>, Vec<DispatchMessage<B>>), EpError> {
        let ranks = self.placement.num_ranks();
        let row_bytes = (self.d_model * x.dtype().size()) as u64;
        let accounting = RankAccounting::from_routing(rank, &[], 1, &self.placement, row_bytes, self.node_limit)?;
        let state = Dispatched { x, to_dst: vec![Vec::new(); ranks], accounting };
        let messages = (0..ranks).map(|_| DispatchMessage { rows: None, pairs: Vec::new(), weights: None }).collect();
        Ok((state, messages))
    }

    /// Splits one rank's routed tokens into one message per destination rank, each token once.
    fn dispatch_routed(
        &self,
        rank: usize,
        routed: RoutedTokens<B>,
    ) -> Result<(Dispatched<B>, Vec<DispatchMessage<B>>), EpError> {
        let RoutedTokens { x, expert_ids: ids, weights } = routed;
        let ranks = self.placement.num_ranks();
        let per_rank = self.placement.experts_per_rank();
        let dims = x.dims();
        let [tokens, k] = weights.dims();
        if rank >= ranks || dims[1] != self.d_model || tokens != dims[0] || ids.len() != tokens * k {
            return Err(EpError::InputShape { rank, dims, d_model: self.d_model });
        }
        if tokens == 0 {
            return self.empty_dispatch(rank, x);
        }
        let row_bytes = (self.d_model * x.dtype().size()) as u64;
        let empty = || DispatchMessage { rows: None, pairs: Vec::new(), weights: None };
        let device = x.device();
        let accounting = RankAccounting::from_routing(rank, &ids, k, &self.placement, row_bytes, self.node_limit)?;
        let flat_weights = weights.reshape([tokens * k]);
        let mut to_dst: Vec<Vec<usize>> = vec![Vec::new(); ranks];
        let mut pairs: Vec<Vec<(usize, usize)>> = vec![Vec::new(); ranks];
        let mut pair_slots: Vec<Vec<usize>> = vec![Vec::new(); ranks];
        for (slot, &expert) in ids.iter().enumerate() {
            let token = slot / k;
            let dst = expert / per_rank;
            // Tokens come in order, so a token already sent to `dst` is its last entry.
            if to_dst[dst].last() != Some(&token) {
                to_dst[dst].push(token);
            }
            pairs[dst].push((to_dst[dst].len() - 1, expert % per_rank));
            pair_slots[dst].push(slot);
        }
        let messages = (0..ranks)
            .map(|dst| {
                if to_dst[dst].is_empty() {
                    return empty();
                }
                DispatchMessage {
                    rows: Some(x.clone().select(0, int_tensor::<B>(&to_dst[dst], &device))),
                    pairs: std::mem::take(&mut pairs[dst]),
                    weights: Some(flat_weights.clone().select(0, int_tensor::<B>(&pair_slots[dst], &device))),
                }
            })
            .collect();
        Ok((Dispatched { x, to_dst, accounting }, messages))
    }

    /// Runs `rank`'s shard on the rows it received; one reply per source rank, and the
    /// number of `(token, expert)` pairs computed.
    pub(super) fn compute(
        &self,
        rank: usize,
        messages: Vec<DispatchMessage<B>>,
    ) -> Result<(Vec<CombineMessage<B>>, u64), EpError> {
        let sizes: Vec<usize> = messages.iter().map(Message::num_rows).collect();
        let mut rows = Vec::new();
        let mut weights = Vec::new();
        let mut pair_rows = Vec::new();
        let mut pair_experts = Vec::new();
        let mut offset = 0;
        for (message, &n) in messages.into_iter().zip(&sizes) {
            if let (Some(r), Some(w)) = (message.rows, message.weights) {
                rows.push(r);
                weights.push(w);
                for (row, expert) in message.pairs {
                    pair_rows.push(offset + row);
                    pair_experts.push(expert);
                }
            }
            offset += n;
        }
        if rows.is_empty() {
            return Ok((sizes.iter().map(|_| CombineMessage { rows: None }).collect(), 0));
        }
        let rows = Tensor::cat(rows, 0);
        let [n, d] = rows.dims();
        let device = rows.device();
        let pairs = pair_rows.len();
        let pair_index = int_tensor::<B>(&pair_rows, &device);
        let expert_ids = int_tensor::<B>(&pair_experts, &device).reshape([pairs, 1]);
        let weights = Tensor::cat(weights, 0).reshape([pairs, 1]);
        let (y, _) = self.shards[rank].forward(
            rows.clone().select(0, pair_index.clone()),
            expert_ids,
            weights,
            CapacityLimit::Dropless,
            None,
        )?;
        // The token's experts on this rank are summed here, so one row goes back per token.
        let summed = Tensor::<B, 2>::zeros([n, d], &device).cast(y.dtype()).select_assign(
            0,
            pair_index,
            y,
            IndexingUpdateOp::Add,
        );
        let mut start = 0;
        let replies = sizes
            .iter()
            .map(|&len| {
                let reply = (len > 0).then(|| summed.clone().narrow(0, start, len));
                start += len;
                CombineMessage { rows: reply }
            })
            .collect();
        Ok((replies, pairs as u64))
    }

    /// Adds a rank's returned partial sums and its shared experts' output.
    pub(super) fn combine(&self, state: Dispatched<B>, replies: Vec<CombineMessage<B>>) -> Tensor<B, 2> {
        let Dispatched { x, to_dst, .. } = state;
        let [t, d] = x.dims();
        let device = x.device();
        let mut out = Tensor::<B, 2>::zeros([t, d], &device).cast(x.dtype());
        if t == 0 {
            return out;
        }
        for (reply, tokens) in replies.into_iter().zip(to_dst) {
            if let Some(rows) = reply.rows {
                out = out.select_assign(0, int_tensor::<B>(&tokens, &device), rows, IndexingUpdateOp::Add);
            }
        }
        match &self.shared {
            Some(shared) => out + shared.forward_moe(x),
            None => out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ep::LocalTransport;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;
    use moe_experts::MoeLayerConfig;
    use moe_router::RouterConfig;

    type B = NdArray;

    fn layer(groups: usize, keep: usize, shared: usize) -> MoeLayer<B> {
        let router = RouterConfig::new(16, 8, 3).with_num_groups(groups).with_topk_groups(keep);
        MoeLayerConfig::new(router, 12).with_num_shared(shared).init(&Default::default()).unwrap()
    }

    fn max_abs_diff(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn sharded_forward_equals_the_single_device_layer() {
        let device = Default::default();
        for (groups, keep, shared) in [(1, 1, 1), (4, 2, 0), (2, 1, 1)] {
            let layer = layer(groups, keep, shared);
            let x = Tensor::<B, 2>::random([24, 16], Distribution::Normal(0.0, 1.0), &device);
            // The per-expert loop oracle of the unsharded layer.
            let reference = layer.forward_loop(x.clone().reshape([1, 24, 16])).unwrap().reshape([24, 16]);
            for (ranks, nodes, split) in [(2, 1, vec![12, 12]), (4, 2, vec![5, 7, 3, 9]), (4, 4, vec![6, 6, 6, 6])] {
                let placement = Placement::new(8, ranks, nodes).unwrap();
                let ep = ExpertParallelMoe::from_layer(&layer, placement).unwrap();
                let mut inputs = Vec::new();
                let mut start = 0;
                for &n in &split {
                    inputs.push(x.clone().narrow(0, start, n));
                    start += n;
                }
                let mut transport = LocalTransport::new();
                let out = Tensor::cat(ep.forward(inputs, &mut transport).unwrap(), 0);
                let diff = max_abs_diff(out, reference.clone());
                assert!(diff < 1e-5, "groups {groups}, R {ranks}: max |diff| {diff}");

                // Rows exchanged: each token once per distinct rank of its experts, and one
                // row back, counted by hand from the router's ids.
                let ids: Vec<i64> = layer.router.forward(x.clone()).expert_ids.into_data().iter::<i64>().collect();
                let mut expected = vec![vec![0u64; ranks]; ranks];
                let mut token = 0;
                for (src, &n) in split.iter().enumerate() {
                    for _ in 0..n {
                        let mut dsts: Vec<usize> =
                            ids[token * 3..token * 3 + 3].iter().map(|&e| e as usize / (8 / ranks)).collect();
                        dsts.sort_unstable();
                        dsts.dedup();
                        for dst in dsts {
                            // Dispatch src -> dst, then the combine dst -> src.
                            expected[src][dst] += 1;
                            expected[dst][src] += 1;
                        }
                        token += 1;
                    }
                }
                assert_eq!(transport.rows_sent(), expected.as_slice());
            }
        }
    }

    #[test]
    fn input_gradients_equal_the_single_device_layer() {
        type A = burn::backend::Autodiff<NdArray>;
        let device = Default::default();
        let router = RouterConfig::new(16, 8, 3).with_num_groups(4).with_topk_groups(2);
        let layer = MoeLayerConfig::new(router, 12).with_num_shared(1).init::<A>(&device).unwrap();
        let data = Tensor::<A, 2>::random([20, 16], Distribution::Normal(0.0, 1.0), &device).into_data();
        let x = Tensor::<A, 2>::from_data(data.clone(), &device).require_grad();
        let reference = layer.forward_loop(x.clone().reshape([1, 20, 16])).unwrap();
        let grads = reference.powi_scalar(2).sum().backward();
        let want = x.grad(&grads).unwrap();
        let want_down = layer.experts.down.grad(&grads).unwrap();

        let ep = ExpertParallelMoe::from_layer(&layer, Placement::new(8, 4, 2).unwrap()).unwrap();
        let x = Tensor::<A, 2>::from_data(data, &device).require_grad();
        let inputs = (0..4).map(|r| x.clone().narrow(0, 5 * r, 5)).collect();
        let out = Tensor::cat(ep.forward(inputs, &mut LocalTransport::new()).unwrap(), 0);
        let grads = out.powi_scalar(2).sum().backward();
        let got = x.grad(&grads).unwrap();
        let diff: f32 = (got - want.clone()).abs().max().into_scalar();
        let scale: f32 = want.abs().max().into_scalar();
        assert!(diff <= 1e-5 * scale.max(1.0), "max |x grad diff| {diff} (scale {scale})");
        // Each shard's expert gradients are its slice of the full bank's.
        for (rank, shard) in ep.shards.iter().enumerate() {
            let got = shard.down.grad(&grads).unwrap();
            let want = want_down.clone().narrow(0, 2 * rank, 2);
            let diff: f32 = (got - want.clone()).abs().max().into_scalar();
            let scale: f32 = want.abs().max().into_scalar();
            assert!(diff <= 1e-5 * scale.max(1.0), "rank {rank}: max |down grad diff| {diff} (scale {scale})");
        }
    }

    #[test]
    fn a_view_trains_the_layer_it_shards() {
        // Routed by the layer, computed by a view over 2 nodes x 2 ranks, uneven splits:
        // the output, and the gradients reaching the layer's own parameters, equal the
        // layer's forward (its sorted dispatch, the router's losses included).
        type A = burn::backend::Autodiff<NdArray>;
        let device = Default::default();
        let router = RouterConfig::new(16, 8, 3).with_num_groups(4).with_topk_groups(2);
        let layer =
            MoeLayerConfig::new(router, 12).with_num_shared(1).with_seq_balance_alpha(0.1).init::<A>(&device).unwrap();
        let x = Tensor::<A, 3>::random([3, 6, 16], Distribution::Normal(0.0, 1.0), &device);
        let loss = |y: Tensor<A, 3>, aux: &moe_experts::MoeAux<A>| y.powi_scalar(2).sum() + aux.loss().unwrap();

        let (y, aux) = layer.forward(x.clone()).unwrap();
        let grads = loss(y.clone(), &aux).backward();
        let params = |g: &<A as burn::tensor::backend::AutodiffBackend>::Gradients| {
            [layer.experts.up.grad(g).unwrap().reshape([-1]), layer.router.weight.grad(g).unwrap().reshape([-1])]
        };
        let want = params(&grads);

        let (flat, aux) = layer.route(x).unwrap();
        let ids = RoutedTokens::host_ids(aux.expert_ids.clone());
        let ep = ExpertParallelMoe::view_of(&layer, Placement::new(8, 4, 2).unwrap()).unwrap();
        let split = [6, 2, 3, 7];
        let mut start = 0;
        let inputs = split
            .iter()
            .map(|&n| {
                let part = |t: Tensor<A, 2>| t.narrow(0, start, n);
                let routed = RoutedTokens {
                    x: part(flat.clone()),
                    expert_ids: ids[start * 3..(start + n) * 3].to_vec(),
                    weights: part(aux.weights.clone()),
                };
                start += n;
                routed
            })
            .collect();
        let (out, accounting) = ep.forward_routed(inputs, &mut LocalTransport::new()).unwrap();
        assert_eq!(accounting.pairs_per_rank.iter().sum::<u64>(), 18 * 3);
        let out = Tensor::cat(out, 0).reshape([3, 6, 16]);
        let diff: f32 = (out.clone() - y).abs().max().into_scalar();
        assert!(diff < 1e-5, "output max |diff| {diff}");
        let grads = loss(out, &aux).backward();
        for (name, (got, want)) in ["experts.up", "router.weight"].iter().zip(params(&grads).into_iter().zip(want)) {
            let diff: f32 = (got - want.clone()).abs().max().into_scalar();
            let scale: f32 = want.abs().max().into_scalar();
            assert!(scale > 0.0 && diff <= 1e-5 * scale, "{name}: max |grad diff| {diff} (scale {scale})");
        }
    }

    #[test]
    fn refuses_mismatched_inputs() {
        let device = Default::default();
        let layer = layer(1, 1, 0);
        assert_eq!(
            ExpertParallelMoe::from_layer(&layer, Placement::new(16, 2, 1).unwrap()).err(),
            Some(EpError::ExpertCount { placement: 16, layer: 8 })
        );
        let ep = ExpertParallelMoe::from_layer(&layer, Placement::new(8, 2, 1).unwrap()).unwrap();
        let x = || Tensor::<B, 2>::zeros([3, 16], &device);
        let mut t = LocalTransport::new();
        assert_eq!(ep.forward(vec![x()], &mut t).err(), Some(EpError::RankCount { got: 1, expected: 2 }));
        assert_eq!(
            ep.forward(vec![x(), Tensor::zeros([3, 4], &device)], &mut t).err(),
            Some(EpError::InputShape { rank: 1, dims: [3, 4], d_model: 16 })
        );
    }
}
