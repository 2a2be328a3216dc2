//! The kernels under burn-fusion: each [`MoeCubeKernels`] method of `Fusion<B>` registers a
//! custom operation ([`StreamOp`]) in fusion's stream, which runs the inner backend's method
//! on the stream's handles when the stream reaches it.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::MoeCubeKernels;
use super::flush::FlushPolicy;
use crate::{AdamWStep, GateRule, Selection};

/// Which kernel a fusion custom op runs, with its host-side arguments.
#[derive(Debug, Clone)]
enum KernelCall {
    /// Inputs: rows, weights.
    GroupedGemm(Vec<usize>),
    /// Inputs: rows, gradient.
    GroupedGemmWeightGrad(Vec<usize>),
    /// Inputs: x, source (int).
    GatherRows,
    /// Inputs: rows, row_of_pair (int), weights.
    CombineRows,
    /// Inputs: rows, row_of_pair (int), gradient; the output is of this dtype.
    PairDots(DType),
    /// Inputs: ids (int), over this many experts; two int outputs (ranks, summary).
    ScanExperts(usize),
    /// Inputs: biased scores (f32); the output is int.
    SelectExperts(Selection),
    /// Inputs: logits, bias (f32); outputs scores (f32), ids (int), weights (f32).
    GateExperts(GateRule),
    /// Inputs: scores (f32), ids (int), the weights' gradient (f32).
    GateGrad(GateRule),
    /// Inputs: gate, up.
    SiluMul,
    /// Inputs: gate, up, gradient; two outputs (gate's and up's gradients).
    SiluMulGrad,
    /// Inputs: ids (int), over this many experts; the output is int.
    CountExperts(usize),
    /// Inputs: row of each pair (int), values (float), into this many rows.
    PlacePairValues(usize),
    /// Inputs: ids, ranks, segment starts (int), keeping `kept` pairs per expert, into `rows`
    /// rows (`padded`: some are padding); two int outputs (row of each pair, source of each row).
    PlaceRows { kept: usize, rows: usize, padded: bool },
    /// Inputs: x, gradient, split into these row blocks.
    DenseWeightGrad(Vec<usize>),
    /// Inputs: parameter, gradient, both moments; three outputs (parameter, moments).
    AdamW(AdamWStep),
    /// Inputs: x, cos, sin (f32); pairs interleaved or split in halves.
    Rotary(bool),
    /// Inputs: x, gamma (f32), with this epsilon.
    RmsNorm(f64),
    /// Inputs: x, gamma (f32), gradient; two outputs (x's gradient, `grad * x_hat` in f32).
    RmsNormGrad(f64),
    /// Inputs: scores, with this scale.
    CausalSoftmax(f64),
    /// Inputs: scores, the probabilities' gradient, with this scale; two outputs
    /// (probabilities, the scores' gradient).
    CausalSoftmaxGrad(f64),
}

impl KernelCall {
    fn name(&self) -> &'static str {
        match self {
            Self::GroupedGemm(_) => "moe_grouped_gemm",
            Self::GroupedGemmWeightGrad(_) => "moe_grouped_gemm_weight_grad",
            Self::GatherRows => "moe_gather_rows",
            Self::CombineRows => "moe_combine_rows",
            Self::PairDots(_) => "moe_pair_dots",
            Self::ScanExperts(_) => "moe_scan_experts",
            Self::SelectExperts(_) => "moe_select_experts",
            Self::GateExperts(_) => "moe_gate_experts",
            Self::GateGrad(_) => "moe_gate_grad",
            Self::SiluMul => "moe_silu_mul",
            Self::SiluMulGrad => "moe_silu_mul_grad",
            Self::CountExperts(_) => "moe_count_experts",
            Self::PlacePairValues(_) => "moe_place_pair_values",
            Self::PlaceRows { .. } => "moe_place_rows",
            Self::DenseWeightGrad(_) => "moe_dense_weight_grad",
            Self::AdamW(_) => "moe_adamw",
            Self::Rotary(_) => "moe_rotary",
            Self::RmsNorm(_) => "moe_rms_norm",
            Self::RmsNormGrad(_) => "moe_rms_norm_grad",
            Self::CausalSoftmax(_) => "moe_causal_softmax",
            Self::CausalSoftmaxGrad(_) => "moe_causal_softmax_grad",
        }
    }
}

/// A kernel as an operation in burn-fusion's stream: the inner backend runs it when the
/// stream reaches it; registering it wakes the stream's thread (`FlushPolicy`) but forces no
/// host sync.
#[derive(Debug, Clone)]
struct StreamOp<B> {
    desc: CustomOpIr,
    kernel: KernelCall,
    _backend: std::marker::PhantomData<B>,
}

impl<B: FusionBackend + MoeCubeKernels> Operation<B::FusionRuntime> for StreamOp<B> {
    fn execute(&self, handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let out = self.desc.outputs[0].id;
        let inputs = &self.desc.inputs;
        let float = |handles: &mut HandleContainer<_>, i: usize| handles.get_float_tensor::<B>(&inputs[i]);
        let int = |handles: &mut HandleContainer<_>, i: usize| handles.get_int_tensor::<B>(&inputs[i]);
        let result = match &self.kernel {
            KernelCall::GroupedGemm(segments) => B::grouped_gemm(float(handles, 0), float(handles, 1), segments),
            KernelCall::GroupedGemmWeightGrad(segments) => {
                B::grouped_gemm_weight_grad(float(handles, 0), float(handles, 1), segments)
            }
            KernelCall::GatherRows => B::gather_rows(float(handles, 0), int(handles, 1)),
            KernelCall::CombineRows => B::combine_rows(float(handles, 0), int(handles, 1), float(handles, 2)),
            KernelCall::PairDots(dtype) => B::pair_dots(float(handles, 0), int(handles, 1), float(handles, 2), *dtype),
            KernelCall::PlacePairValues(rows) => B::place_pair_values(int(handles, 0), float(handles, 1), *rows),
            KernelCall::GateGrad(rule) => B::gate_grad(float(handles, 0), int(handles, 1), float(handles, 2), rule),
            KernelCall::SiluMul => B::silu_mul(float(handles, 0), float(handles, 1)),
            KernelCall::SiluMulGrad => {
                let (grad_gate, grad_up) = B::silu_mul_grad(float(handles, 0), float(handles, 1), float(handles, 2));
                handles.register_float_tensor::<B>(&out, grad_gate);
                return handles.register_float_tensor::<B>(&self.desc.outputs[1].id, grad_up);
            }
            KernelCall::ScanExperts(experts) => {
                let (ranks, summary) = B::scan_experts(int(handles, 0), *experts);
                handles.register_int_tensor::<B>(&out, ranks);
                return handles.register_int_tensor::<B>(&self.desc.outputs[1].id, summary);
            }
            KernelCall::PlaceRows { kept, rows, padded } => {
                let (row_of_pair, source_of_row) =
                    B::place_rows(int(handles, 0), int(handles, 1), int(handles, 2), *kept, *rows, *padded);
                handles.register_int_tensor::<B>(&out, row_of_pair);
                return handles.register_int_tensor::<B>(&self.desc.outputs[1].id, source_of_row);
            }
            KernelCall::SelectExperts(selection) => {
                let ids = B::select_experts(float(handles, 0), selection);
                return handles.register_int_tensor::<B>(&out, ids);
            }
            KernelCall::GateExperts(rule) => {
                let (scores, ids, weights) = B::gate_experts(float(handles, 0), float(handles, 1), rule);
                handles.register_float_tensor::<B>(&out, scores);
                handles.register_int_tensor::<B>(&self.desc.outputs[1].id, ids);
                return handles.register_float_tensor::<B>(&self.desc.outputs[2].id, weights);
            }
            KernelCall::DenseWeightGrad(parts) => B::dense_weight_grad(float(handles, 0), float(handles, 1), parts),
            KernelCall::Rotary(interleave) => {
                B::rotary(float(handles, 0), float(handles, 1), float(handles, 2), *interleave)
            }
            KernelCall::RmsNorm(epsilon) => B::rms_norm(float(handles, 0), float(handles, 1), *epsilon),
            KernelCall::RmsNormGrad(epsilon) => {
                let (grad_x, grad_normed) =
                    B::rms_norm_grad(float(handles, 0), float(handles, 1), float(handles, 2), *epsilon);
                handles.register_float_tensor::<B>(&out, grad_x);
                return handles.register_float_tensor::<B>(&self.desc.outputs[1].id, grad_normed);
            }
            KernelCall::CausalSoftmax(scale) => B::causal_softmax(float(handles, 0), *scale),
            KernelCall::CausalSoftmaxGrad(scale) => {
                let (probs, grad_scores) = B::causal_softmax_grad(float(handles, 0), float(handles, 1), *scale);
                handles.register_float_tensor::<B>(&out, probs);
                return handles.register_float_tensor::<B>(&self.desc.outputs[1].id, grad_scores);
            }
            KernelCall::AdamW(step) => {
                let moments = [float(handles, 2), float(handles, 3)];
                let outputs = B::adamw(float(handles, 0), float(handles, 1), moments, step);
                for (ir, tensor) in self.desc.outputs.iter().zip(outputs) {
                    handles.register_float_tensor::<B>(&ir.id, tensor);
                }
                return;
            }
            KernelCall::CountExperts(experts) => {
                let counts = B::count_experts(int(handles, 0), *experts);
                return handles.register_int_tensor::<B>(&out, counts);
            }
        };
        handles.register_float_tensor::<B>(&out, result);
    }
}

/// Registers `kernel(inputs)` with an output of `shape` and `dtype` (the first input's when
/// `None`) in the fusion stream.
fn fused<B: FusionBackend + MoeCubeKernels>(
    kernel: KernelCall,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    shape: Shape,
    dtype: Option<DType>,
) -> FusionTensor<B::FusionRuntime> {
    let dtype = dtype.unwrap_or(inputs[0].dtype);
    let [out] = fused_outputs::<B, 1>(kernel, inputs, [(shape, dtype)]);
    out
}

/// [`fused`] for a kernel with `N` outputs of the given shapes and dtypes.
fn fused_outputs<B: FusionBackend + MoeCubeKernels, const N: usize>(
    kernel: KernelCall,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    outputs: [(Shape, DType); N],
) -> [FusionTensor<B::FusionRuntime>; N] {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outs = outputs.map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype));
    let irs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new(kernel.name(), &irs, &outs);
    let op = StreamOp::<B> { desc: desc.clone(), kernel, _backend: std::marker::PhantomData };
    let outputs = client.register(streams, OperationIr::Custom(desc), op).outputs();
    // Wake fusion's thread rather than leave the kernel queued until 32 operations or a sync.
    if FlushPolicy::current().flushes_fusion() {
        client.flush_queue();
    }
    outputs
}

impl<B: FusionBackend + MoeCubeKernels> MoeCubeKernels for Fusion<B> {
    fn grouped_gemm(rows: FloatTensor<Self>, weights: FloatTensor<Self>, segment_rows: &[usize]) -> FloatTensor<Self> {
        let shape = Shape::new([rows.shape[0], weights.shape[2]]);
        fused::<B>(KernelCall::GroupedGemm(segment_rows.to_vec()), vec![rows, weights], shape, None)
    }

    fn grouped_gemm_weight_grad(
        rows: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        segment_rows: &[usize],
    ) -> FloatTensor<Self> {
        let shape = Shape::new([segment_rows.len(), rows.shape[1], grad.shape[1]]);
        fused::<B>(KernelCall::GroupedGemmWeightGrad(segment_rows.to_vec()), vec![rows, grad], shape, None)
    }

    fn scan_experts(ids: IntTensor<Self>, num_experts: usize) -> (IntTensor<Self>, IntTensor<Self>) {
        let (pairs, dtype) = (ids.shape.num_elements(), ids.dtype);
        let outputs = [(Shape::new([pairs]), dtype), (Shape::new([num_experts + 2]), dtype)];
        let [ranks, summary] = fused_outputs::<B, 2>(KernelCall::ScanExperts(num_experts), vec![ids], outputs);
        (ranks, summary)
    }

    fn place_rows(
        ids: IntTensor<Self>,
        ranks: IntTensor<Self>,
        starts: IntTensor<Self>,
        kept: usize,
        rows: usize,
        padded: bool,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        let (pairs, dtype) = (ids.shape.num_elements(), ids.dtype);
        let outputs = [(Shape::new([pairs]), dtype), (Shape::new([rows]), dtype)];
        let kernel = KernelCall::PlaceRows { kept, rows, padded };
        let [row_of_pair, source_of_row] = fused_outputs::<B, 2>(kernel, vec![ids, ranks, starts], outputs);
        (row_of_pair, source_of_row)
    }

    fn count_experts(ids: IntTensor<Self>, num_experts: usize) -> IntTensor<Self> {
        fused::<B>(KernelCall::CountExperts(num_experts), vec![ids], Shape::new([num_experts]), None)
    }

    fn place_pair_values(row_of_pair: IntTensor<Self>, values: FloatTensor<Self>, rows: usize) -> FloatTensor<Self> {
        let dtype = Some(values.dtype);
        fused::<B>(KernelCall::PlacePairValues(rows), vec![row_of_pair, values], Shape::new([rows]), dtype)
    }

    fn gather_rows(x: FloatTensor<Self>, source: IntTensor<Self>) -> FloatTensor<Self> {
        let shape = Shape::new([source.shape[0], x.shape[1]]);
        fused::<B>(KernelCall::GatherRows, vec![x, source], shape, None)
    }

    fn combine_rows(
        rows: FloatTensor<Self>,
        row_of_pair: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let shape = Shape::new([weights.shape[0], rows.shape[1]]);
        fused::<B>(KernelCall::CombineRows, vec![rows, row_of_pair, weights], shape, None)
    }

    fn pair_dots(
        rows: FloatTensor<Self>,
        row_of_pair: IntTensor<Self>,
        grad: FloatTensor<Self>,
        dtype: DType,
    ) -> FloatTensor<Self> {
        let shape = row_of_pair.shape.clone();
        fused::<B>(KernelCall::PairDots(dtype), vec![rows, row_of_pair, grad], shape, Some(dtype))
    }

    fn gate_grad(
        scores: FloatTensor<Self>,
        ids: IntTensor<Self>,
        grad: FloatTensor<Self>,
        rule: &GateRule,
    ) -> FloatTensor<Self> {
        let shape = scores.shape.clone();
        fused::<B>(KernelCall::GateGrad(*rule), vec![scores, ids, grad], shape, Some(DType::F32))
    }

    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = gate.shape.clone();
        fused::<B>(KernelCall::SiluMul, vec![gate, up], shape, None)
    }

    fn silu_mul_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let output = (gate.shape.clone(), gate.dtype);
        let [grad_gate, grad_up] =
            fused_outputs::<B, 2>(KernelCall::SiluMulGrad, vec![gate, up, grad], [output.clone(), output]);
        (grad_gate, grad_up)
    }

    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        [moment_1, moment_2]: [FloatTensor<Self>; 2],
        step: &AdamWStep,
    ) -> [FloatTensor<Self>; 3] {
        let shape = param.shape.clone();
        let outputs = [0; 3].map(|_| (shape.clone(), DType::F32));
        fused_outputs::<B, 3>(KernelCall::AdamW(*step), vec![param, grad, moment_1, moment_2], outputs)
    }

    fn dense_weight_grad(x: FloatTensor<Self>, grad: FloatTensor<Self>, parts: &[usize]) -> FloatTensor<Self> {
        let shape = Shape::new([x.shape[1], grad.shape[1]]);
        fused::<B>(KernelCall::DenseWeightGrad(parts.to_vec()), vec![x, grad], shape, None)
    }

    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        interleave: bool,
    ) -> FloatTensor<Self> {
        let shape = x.shape.clone();
        fused::<B>(KernelCall::Rotary(interleave), vec![x, cos, sin], shape, None)
    }

    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        let shape = x.shape.clone();
        fused::<B>(KernelCall::RmsNorm(epsilon), vec![x, gamma], shape, None)
    }

    fn rms_norm_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (shape, dtype) = (x.shape.clone(), x.dtype);
        let [grad_x, grad_normed] = fused_outputs::<B, 2>(
            KernelCall::RmsNormGrad(epsilon),
            vec![x, gamma, grad],
            [(shape.clone(), dtype), (shape, DType::F32)],
        );
        (grad_x, grad_normed)
    }

    fn causal_softmax(scores: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        let shape = scores.shape.clone();
        fused::<B>(KernelCall::CausalSoftmax(scale), vec![scores], shape, None)
    }

    fn causal_softmax_grad(
        scores: FloatTensor<Self>,
        grad_probs: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let output = (scores.shape.clone(), scores.dtype);
        let [probs, grad_scores] = fused_outputs::<B, 2>(
            KernelCall::CausalSoftmaxGrad(scale),
            vec![scores, grad_probs],
            [output.clone(), output],
        );
        (probs, grad_scores)
    }

    fn tensor_cores(dtype: DType, device: &Self::Device) -> bool {
        B::tensor_cores(dtype, device)
    }

    fn select_experts(choice: FloatTensor<Self>, selection: &Selection) -> IntTensor<Self> {
        let shape = Shape::new([choice.shape[0], selection.top_k]);
        fused::<B>(
            KernelCall::SelectExperts(*selection),
            vec![choice],
            shape,
            Some(<B::IntElem as burn::tensor::Element>::dtype()),
        )
    }

    fn gate_experts(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        rule: &GateRule,
    ) -> (FloatTensor<Self>, IntTensor<Self>, FloatTensor<Self>) {
        let [tokens, experts] = [logits.shape[0], logits.shape[1]];
        let top_k = rule.selection.top_k;
        let outputs = [
            (Shape::new([tokens, experts]), DType::F32),
            (Shape::new([tokens, top_k]), <B::IntElem as burn::tensor::Element>::dtype()),
            (Shape::new([tokens, top_k]), DType::F32),
        ];
        let [scores, ids, weights] = fused_outputs::<B, 3>(KernelCall::GateExperts(*rule), vec![logits, bias], outputs);
        (scores, ids, weights)
    }
}
