//! [`MoeBackend`] for `Autodiff`: the gate, the grouped matmul, the SwiGLU activation, the
//! permute, the combine, the causal attention, RMSNorm and the rotary embedding have their own
//! backward, which runs on the inner backend's `MoeBackend` methods, so a backend's kernels
//! serve the backward too.

use crate::{GateRule, Gated, Selection};
use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Int, Tensor};

use crate::portable::swiglu_by_grouped_matmuls;
use crate::{CapacityLimit, DispatchLayout, DispatchPlan, MoeBackend, PlanError, float_primitive, float_tensor};

impl<B: MoeBackend, C: CheckpointStrategy> MoeBackend for Autodiff<B, C> {
    // The inner backend's layout: the backward below runs each segment on the inner backend,
    // so `Segments` no longer goes through burn's `narrow` backward, which writes a full-size
    // zero gradient per segment (O(E * N * d)).
    fn layout() -> DispatchLayout {
        B::layout()
    }

    // The plan holds int tensors only, which autodiff does not track: the inner backend plans
    // (with its own kernels, if any) and the plan is wrapped back.
    fn moe_plan(
        expert_ids: Tensor<Self, 2, Int>,
        priority: Option<Tensor<Self, 2>>,
        num_experts: usize,
        limit: CapacityLimit,
    ) -> Result<DispatchPlan<Self>, PlanError> {
        B::moe_plan(expert_ids.inner(), priority.map(Tensor::inner), num_experts, limit).map(DispatchPlan::from_inner)
    }

    // Ids carry no gradient: the inner backend selects on the untracked scores.
    fn moe_select_experts(choice: Tensor<Self, 2>, selection: &Selection) -> Tensor<Self, 2, Int> {
        Tensor::from_primitive(B::moe_select_experts(choice.inner(), selection).into_primitive())
    }

    // The inner backend's gate (one kernel on the cube backends) as two tracked outputs of the
    // logits: burn's autodiff of `GateRule::apply` runs about 35 operations forward and back
    // (its sigmoid alone is eight, recomputed in the backward), each a host dispatch. The
    // scores' and the weights' gradients add up in the logits'.
    fn moe_gate(logits: Tensor<Self, 2>, bias: Tensor<Self, 1>, rule: &GateRule) -> Gated<Self> {
        let logits = logits.into_primitive().tensor();
        let inner = B::moe_gate(float_tensor(logits.primitive.clone()), bias.inner(), rule);
        let scores = float_primitive(inner.scores);
        let tracked_scores = match GateScoresBackward.prepare::<C>([logits.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                prep.finish(GateScoresState { scores: scores.clone(), rule: *rule }, scores.clone())
            }
            OpsKind::UnTracked(prep) => prep.finish(scores.clone()),
        };
        let weights = float_primitive(inner.weights);
        let tracked_weights = match GateWeightsBackward.prepare::<C>([logits.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = GateWeightsState { scores, expert_ids: inner.expert_ids.clone(), rule: *rule };
                prep.finish(state, weights)
            }
            OpsKind::UnTracked(prep) => prep.finish(weights),
        };
        Gated {
            scores: float_tensor(tracked_scores),
            expert_ids: Tensor::from_primitive(inner.expert_ids.into_primitive()),
            weights: float_tensor(tracked_weights),
        }
    }

    fn moe_expert_counts(expert_ids: Tensor<Self, 2, Int>, num_experts: usize) -> Tensor<Self, 1, Int> {
        Tensor::from_primitive(B::moe_expert_counts(expert_ids.inner(), num_experts).into_primitive())
    }

    fn moe_grouped_matmul(
        rows: Tensor<Self, 2>,
        weights: Tensor<Self, 3>,
        plan: &DispatchPlan<Self>,
    ) -> Tensor<Self, 2> {
        let rows = rows.into_primitive().tensor();
        let weights = weights.into_primitive().tensor();
        let plan = plan.to_inner();
        let output = float_primitive(B::moe_grouped_matmul(
            float_tensor(rows.primitive.clone()),
            float_tensor(weights.primitive.clone()),
            &plan,
        ));
        let (rows_tracked, weights_tracked) = (rows.is_tracked(), weights.is_tracked());
        let output = match GroupedMatmulBackward
            .prepare::<C>([rows.node.clone(), weights.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                // Each gradient needs the other operand only.
                let state = GroupedMatmulState {
                    rows: weights_tracked.then(|| prep.checkpoint(&rows)),
                    weights: rows_tracked.then(|| prep.checkpoint(&weights)),
                    plan,
                };
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        float_tensor(output)
    }

    fn moe_dense_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let x = x.into_primitive().tensor();
        let w = w.into_primitive().tensor();
        let output =
            float_primitive(B::moe_dense_matmul(float_tensor(x.primitive.clone()), float_tensor(w.primitive.clone())));
        let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
        let output = match DenseMatmulBackward.prepare::<C>([x.node.clone(), w.node.clone()]).compute_bound().stateful()
        {
            OpsKind::Tracked(mut prep) => {
                // Each gradient needs the other operand only.
                let state = DenseMatmulState {
                    x: w_tracked.then(|| prep.checkpoint(&x)),
                    w: x_tracked.then(|| prep.checkpoint(&w)),
                };
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        float_tensor(output)
    }

    // Permute and combine keep their state rather than recomputing under checkpointing (marked
    // compute-bound): their backward runs on the inner backend as gathers.
    fn moe_permute(x: Tensor<Self, 2>, plan: &DispatchPlan<Self>) -> Tensor<Self, 2> {
        let x = x.into_primitive().tensor();
        let plan = plan.to_inner();
        let output = float_primitive(B::moe_permute(float_tensor(x.primitive.clone()), &plan));
        let output = match PermuteBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(plan, output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        float_tensor(output)
    }

    fn moe_combine(rows: Tensor<Self, 2>, weights: Tensor<Self, 2>, plan: &DispatchPlan<Self>) -> Tensor<Self, 2> {
        let rows = rows.into_primitive().tensor();
        let weights = weights.into_primitive().tensor();
        let plan = plan.to_inner();
        let output = float_primitive(B::moe_combine(
            float_tensor(rows.primitive.clone()),
            float_tensor(weights.primitive.clone()),
            &plan,
        ));
        let output =
            match CombineBackward.prepare::<C>([rows.node.clone(), weights.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(mut prep) => {
                    let state = CombineState { rows: prep.checkpoint(&rows), weights: prep.checkpoint(&weights), plan };
                    prep.finish(state, output)
                }
                OpsKind::UnTracked(prep) => prep.finish(output),
            };
        float_tensor(output)
    }

    // One tracked operation with its own backward: burn's autodiff of `silu(g) * u` runs about
    // 25 operations forward and back (the sigmoid's eight twice, the products and their
    // gradients), each a host dispatch.
    fn moe_silu_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let gate = gate.into_primitive().tensor();
        let up = up.into_primitive().tensor();
        let output =
            float_primitive(B::moe_silu_mul(float_tensor(gate.primitive.clone()), float_tensor(up.primitive.clone())));
        let output = match SiluMulBackward.prepare::<C>([gate.node.clone(), up.node.clone()]).compute_bound().stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = SiluMulState { gate: prep.checkpoint(&gate), up: prep.checkpoint(&up) };
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        float_tensor(output)
    }

    // One tracked operation whose backward is the inverse rotation: `cos` and `sin` come from
    // positions, never from parameters, so they are taken as constants.
    fn moe_rotary(x: Tensor<Self, 4>, cos: Tensor<Self, 2>, sin: Tensor<Self, 2>, interleave: bool) -> Tensor<Self, 4> {
        let x = x.into_primitive().tensor();
        let (cos, sin) = (cos.inner(), sin.inner());
        let output =
            float_primitive(B::moe_rotary(float_tensor(x.primitive.clone()), cos.clone(), sin.clone(), interleave));
        let output = match RotaryBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = RotaryState { cos: float_primitive(cos), sin: float_primitive(sin), interleave };
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        float_tensor(output)
    }

    // One tracked operation with its own backward, as for `moe_silu_mul`: burn's RMSNorm is
    // about six operations forward and twelve back.
    fn moe_rms_norm(x: Tensor<Self, 2>, gamma: Tensor<Self, 1>, epsilon: f64) -> Tensor<Self, 2> {
        let x = x.into_primitive().tensor();
        let gamma = gamma.into_primitive().tensor();
        let output = float_primitive(B::moe_rms_norm(
            float_tensor(x.primitive.clone()),
            float_tensor(gamma.primitive.clone()),
            epsilon,
        ));
        let output = match RmsNormBackward.prepare::<C>([x.node.clone(), gamma.node.clone()]).compute_bound().stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = RmsNormState { x: prep.checkpoint(&x), gamma: prep.checkpoint(&gamma), epsilon };
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        float_tensor(output)
    }

    // The inner backend's attention (flash on the cube backends) as one tracked operation that
    // keeps its three operands: burn's `Autodiff` would run the decomposed fallback and keep
    // every layer's `[b, h, l, l]` scores and probabilities until the backward.
    fn moe_causal_attention(q: Tensor<Self, 4>, k: Tensor<Self, 4>, v: Tensor<Self, 4>, scale: f64) -> Tensor<Self, 4> {
        let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
        let output = float_primitive(B::moe_causal_attention(
            float_tensor(q.primitive.clone()),
            float_tensor(k.primitive.clone()),
            float_tensor(v.primitive.clone()),
            scale,
        ));
        let output = match AttentionBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state =
                    AttentionState { q: prep.checkpoint(&q), k: prep.checkpoint(&k), v: prep.checkpoint(&v), scale };
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        float_tensor(output)
    }

    // Three custom-backward grouped matmuls: the `Segments` default would run the MLP per
    // segment through `narrow`, whose burn backward is the O(E * N * d) one avoided above.
    fn moe_grouped_swiglu(
        rows: Tensor<Self, 2>,
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        down: Tensor<Self, 3>,
        plan: &DispatchPlan<Self>,
    ) -> Tensor<Self, 2> {
        swiglu_by_grouped_matmuls(rows, gate, up, down, plan)
    }
}

#[derive(Debug)]
struct GroupedMatmulBackward;

/// What the backward keeps: the checkpointed operands (each only when the other one is
/// tracked) and the plan on the inner backend.
#[derive(Debug, Clone)]
struct GroupedMatmulState<B: MoeBackend> {
    rows: Option<NodeId>,
    weights: Option<NodeId>,
    plan: DispatchPlan<B>,
}

impl<B: MoeBackend> Backward<B, 2> for GroupedMatmulBackward {
    type State = GroupedMatmulState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [rows_parent, weights_parent] = ops.parents;
        let GroupedMatmulState { rows, weights, plan } = ops.state;
        // A parent is present exactly when it is tracked, and the forward kept the other
        // operand for every tracked one.
        let rows = rows.map(|id| float_tensor::<B, 2>(checkpointer.retrieve_node_output(id)));
        let weights = weights.map(|id| float_tensor::<B, 3>(checkpointer.retrieve_node_output(id)));
        let grad = float_tensor::<B, 2>(grads.consume::<B>(&ops.node));

        if let Some(parent) = weights_parent {
            let rows = rows.expect("the rows are kept when the weights are tracked");
            let grad_weights = B::moe_grouped_matmul_grad_weights(rows, grad.clone(), &plan);
            grads.register::<B>(parent.id, float_primitive(grad_weights));
        }
        if let Some(parent) = rows_parent {
            let weights = weights.expect("the weights are kept when the rows are tracked");
            // The same grouped product on the weights' transposed view.
            let grad_rows = B::moe_grouped_matmul(grad, weights.swap_dims(1, 2), &plan);
            grads.register::<B>(parent.id, float_primitive(grad_rows));
        }
    }
}

#[derive(Debug)]
struct DenseMatmulBackward;

/// The checkpointed operands of a dense product, each kept only when the other is tracked.
#[derive(Debug, Clone)]
struct DenseMatmulState {
    x: Option<NodeId>,
    w: Option<NodeId>,
}

impl<B: MoeBackend> Backward<B, 2> for DenseMatmulBackward {
    type State = DenseMatmulState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [x_parent, w_parent] = ops.parents;
        let DenseMatmulState { x, w } = ops.state;
        let x = x.map(|id| float_tensor::<B, 2>(checkpointer.retrieve_node_output(id)));
        let w = w.map(|id| float_tensor::<B, 2>(checkpointer.retrieve_node_output(id)));
        let grad = float_tensor::<B, 2>(grads.consume::<B>(&ops.node));
        if let Some(parent) = w_parent {
            let x = x.expect("x is kept when the weights are tracked");
            grads.register::<B>(parent.id, float_primitive(B::moe_dense_matmul_grad_weights(x, grad.clone())));
        }
        if let Some(parent) = x_parent {
            let w = w.expect("the weights are kept when x is tracked");
            grads.register::<B>(parent.id, float_primitive(B::moe_dense_matmul(grad, w.transpose())));
        }
    }
}

/// The permute's backward: the rows' gradient summed back into their tokens by the inner
/// backend's combine with unit weights (kept pairs and non-padding rows correspond one to one),
/// not burn's scatter-add backward of `select`.
#[derive(Debug)]
struct PermuteBackward;

impl<B: MoeBackend> Backward<B, 1> for PermuteBackward {
    type State = DispatchPlan<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = float_tensor::<B, 2>(grads.consume::<B>(&ops.node));
        if let Some(parent) = parent {
            let plan = ops.state;
            let ones = Tensor::<B, 2>::ones([plan.tokens(), plan.top_k()], &grad.device());
            grads.register::<B>(parent.id, float_primitive(B::moe_combine(grad, ones, &plan)));
        }
    }
}

#[derive(Debug)]
struct CombineBackward;

#[derive(Debug, Clone)]
struct CombineState<B: MoeBackend> {
    rows: NodeId,
    weights: NodeId,
    plan: DispatchPlan<B>,
}

impl<B: MoeBackend> Backward<B, 2> for CombineBackward {
    type State = CombineState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [rows_parent, weights_parent] = ops.parents;
        let CombineState { rows, weights, plan } = ops.state;
        let rows = float_tensor::<B, 2>(checkpointer.retrieve_node_output(rows));
        let weights = float_tensor::<B, 2>(checkpointer.retrieve_node_output(weights));
        let grad = float_tensor::<B, 2>(grads.consume::<B>(&ops.node));
        let (grad_rows, grad_weights) = B::moe_combine_grad(rows, weights, grad, &plan);
        if let Some(parent) = rows_parent {
            grads.register::<B>(parent.id, float_primitive(grad_rows));
        }
        if let Some(parent) = weights_parent {
            grads.register::<B>(parent.id, float_primitive(grad_weights));
        }
    }
}

/// The gate's scores: their gradient goes through the score function's derivative.
#[derive(Debug)]
struct GateScoresBackward;

/// The forward's scores and the rule (which score function).
#[derive(Debug, Clone)]
struct GateScoresState<B: MoeBackend> {
    scores: FloatTensor<B>,
    rule: GateRule,
}

impl<B: MoeBackend> Backward<B, 1> for GateScoresBackward {
    type State = GateScoresState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = float_tensor::<B, 2>(grads.consume::<B>(&ops.node));
        if let Some(parent) = parent {
            let GateScoresState { scores, rule } = ops.state;
            grads.register::<B>(parent.id, float_primitive(rule.scores_grad(float_tensor(scores), grad)));
        }
    }
}

/// The gate's weights: their gradient is the inner backend's `moe_gate_grad`.
#[derive(Debug)]
struct GateWeightsBackward;

/// The forward's scores and choice, and the rule (normalisation, scale).
#[derive(Debug, Clone)]
struct GateWeightsState<B: MoeBackend> {
    scores: FloatTensor<B>,
    expert_ids: Tensor<B, 2, Int>,
    rule: GateRule,
}

impl<B: MoeBackend> Backward<B, 1> for GateWeightsBackward {
    type State = GateWeightsState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = float_tensor::<B, 2>(grads.consume::<B>(&ops.node));
        if let Some(parent) = parent {
            let GateWeightsState { scores, expert_ids, rule } = ops.state;
            let grad_logits = B::moe_gate_grad(float_tensor(scores), expert_ids, grad, &rule);
            grads.register::<B>(parent.id, float_primitive(grad_logits));
        }
    }
}

#[derive(Debug)]
struct SiluMulBackward;

/// Both operands of `silu(gate) * up`: each gradient needs both.
#[derive(Debug, Clone)]
struct SiluMulState {
    gate: NodeId,
    up: NodeId,
}

impl<B: MoeBackend> Backward<B, 2> for SiluMulBackward {
    type State = SiluMulState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [gate_parent, up_parent] = ops.parents;
        let gate = float_tensor::<B, 2>(checkpointer.retrieve_node_output(ops.state.gate));
        let up = float_tensor::<B, 2>(checkpointer.retrieve_node_output(ops.state.up));
        let grad = float_tensor::<B, 2>(grads.consume::<B>(&ops.node));
        let (grad_gate, grad_up) = B::moe_silu_mul_grad(gate, up, grad);
        if let Some(parent) = gate_parent {
            grads.register::<B>(parent.id, float_primitive(grad_gate));
        }
        if let Some(parent) = up_parent {
            grads.register::<B>(parent.id, float_primitive(grad_up));
        }
    }
}

#[derive(Debug)]
struct RotaryBackward;

/// The rotation's angles (inner-backend primitives) and pair layout.
#[derive(Debug, Clone)]
struct RotaryState<B: MoeBackend> {
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    interleave: bool,
}

impl<B: MoeBackend> Backward<B, 1> for RotaryBackward {
    type State = RotaryState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let RotaryState { cos, sin, interleave } = ops.state;
        let grad = float_tensor::<B, 4>(grads.consume::<B>(&ops.node));
        let grad = B::moe_rotary(grad, float_tensor(cos), float_tensor::<B, 2>(sin).neg(), interleave);
        if let Some(parent) = parent {
            grads.register::<B>(parent.id, float_primitive(grad));
        }
    }
}

#[derive(Debug)]
struct RmsNormBackward;

/// The norm's input and scale: the backward recomputes the statistics.
#[derive(Debug, Clone)]
struct RmsNormState {
    x: NodeId,
    gamma: NodeId,
    epsilon: f64,
}

impl<B: MoeBackend> Backward<B, 2> for RmsNormBackward {
    type State = RmsNormState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [x_parent, gamma_parent] = ops.parents;
        let RmsNormState { x, gamma, epsilon } = ops.state;
        let x = float_tensor::<B, 2>(checkpointer.retrieve_node_output(x));
        let gamma = float_tensor::<B, 1>(checkpointer.retrieve_node_output(gamma));
        let grad = float_tensor::<B, 2>(grads.consume::<B>(&ops.node));
        let (grad_x, grad_gamma) = B::moe_rms_norm_grad(x, gamma, grad, epsilon);
        if let Some(parent) = x_parent {
            grads.register::<B>(parent.id, float_primitive(grad_x));
        }
        if let Some(parent) = gamma_parent {
            grads.register::<B>(parent.id, float_primitive(grad_gamma));
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

/// The attention's operands and its scale: the backward recomputes the probabilities.
#[derive(Debug, Clone)]
struct AttentionState {
    q: NodeId,
    k: NodeId,
    v: NodeId,
    scale: f64,
}

impl<B: MoeBackend> Backward<B, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let AttentionState { q, k, v, scale } = ops.state;
        let [q, k, v] = [q, k, v].map(|id| float_tensor::<B, 4>(checkpointer.retrieve_node_output(id)));
        let grad = float_tensor::<B, 4>(grads.consume::<B>(&ops.node));
        let (grad_q, grad_k, grad_v) = B::moe_causal_attention_grad(q, k, v, grad, scale);
        for (parent, grad) in ops.parents.into_iter().zip([grad_q, grad_k, grad_v]) {
            if let Some(parent) = parent {
                grads.register::<B>(parent.id, float_primitive(grad));
            }
        }
    }
}
