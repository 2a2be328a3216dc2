//! The training loop: AdamW with warmup + cosine, clipping and accumulation, the balance
//! losses, the loss-free bias update once per optimizer step, evaluation, checkpoints.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, FloatDType, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use moe_balance::metrics::{EvalMaxVio, max_violation};
use moe_balance::{BiasBalancer, BiasUpdateConfig, LoadTracker};
use moe_experts::MoeBackend;
use moe_model::{DeepSeekModel, ModelError};
use moe_parallel::SplitMix64;
use moe_parallel::ep::StepAccounting;

use crate::adamw::FusedAdamW;
use crate::checkpoint::{self, RunCheckpointError, TrainState};
use crate::corpus::{Batch, Corpus};
use crate::error::TrainError;
use crate::expert_parallel::ShardedModel;
use crate::metrics::{EvalMetrics, MetricsLog, RankMetrics, StepMetrics};
use crate::profile::{Phase, PhaseClock, median_line};
use crate::schedule::learning_rate;
use crate::settings::{BalanceMode, RunConfig, SettingsError};

/// AdamW's epsilon: burn's default.
const ADAMW_EPSILON: f32 = 1e-5;

/// The routing trace of the validation set, in the run directory.
pub const TRACE_FILE: &str = "routing_trace.bin";

/// How to run, beyond the configuration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where the run's files go.
    pub run_dir: PathBuf,
    /// Continue from the newest checkpoint in `run_dir`.
    pub resume: bool,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
    /// Stop after this many optimizer steps in total (as if interrupted); `None` runs to the end.
    pub stop_at: Option<usize>,
    /// The backend is a GPU's: `train.precision = "auto"` means bf16 where the device has it,
    /// and the first step says that it compiles and tunes kernels.
    pub gpu: bool,
    /// Time each step's phases (`crate::profile`), at the cost of a device sync per phase.
    pub profile: bool,
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Optimizer steps done.
    pub steps: usize,
    /// The last validation pass.
    pub eval: EvalMetrics,
    /// Mean training tokens per second.
    pub tokens_per_s: f64,
    /// Seconds of training.
    pub elapsed_s: f64,
    /// The newest checkpoint.
    pub checkpoint: PathBuf,
    /// Training loss per step, for tests and reports.
    pub losses: Vec<f64>,
}

/// A line above the progress bar (a hidden bar, with no terminal, swallows its println).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() { println!("{line}") } else { bar.println(line) }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_owned(), source }
}

/// Builds the model of `config` with the balance mode's loss weights. Every parameter is drawn
/// here, in module order: burn draws a lazily initialised parameter when something first reads
/// it, so otherwise the initial weights would depend on the order a forward reads them in
/// (the single-device and the sharded forward read the shared experts at different points).
pub fn build_model<B: Backend>(config: &RunConfig, device: &B::Device) -> Result<DeepSeekModel<B>, TrainError> {
    B::seed(device, config.train.seed);
    let mut model = config.model.init::<B>(device).map_err(SettingsError::from)?;
    model.visit(&mut DrawParameters);
    let (seq_alpha, aux_alpha, _) = config.balance.weights();
    for layer in model.moe_layers_mut() {
        layer.set_loss_weights(seq_alpha, aux_alpha).map_err(ModelError::Moe)?;
    }
    Ok(model)
}

/// Reads every float parameter once, which draws the lazily initialised ones.
struct DrawParameters;

impl<B: Backend> ModuleVisitor<B> for DrawParameters {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

fn tokens<B: Backend>(values: &[i64], batch: usize, seq: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [batch, seq]), device)
}

/// One batch through the model.
struct BatchLoss<B: Backend> {
    /// Cross-entropy, nats per token.
    ce: Tensor<B, 1>,
    /// The balance losses that are on, summed.
    balance: Option<Tensor<B, 1>>,
    /// Pairs per expert, per MoE layer.
    counts: Vec<Tensor<B, 1, Int>>,
    /// Pairs dropped by a capacity limit.
    dropped: usize,
    /// Per MoE layer, what the ranks did (empty on one rank).
    ranks: Vec<StepAccounting>,
}

/// Cross-entropy of `model` on `batch`, the balance losses, and each MoE layer's counts.
fn batch_loss<B: MoeBackend>(
    model: &DeepSeekModel<B>,
    sharded: Option<&ShardedModel>,
    batch: &Batch,
    device: &B::Device,
) -> Result<BatchLoss<B>, TrainError> {
    let inputs = tokens(&batch.inputs, batch.batch, batch.seq_len, device);
    let (out, ranks) = match sharded {
        Some(sharded) => sharded.forward(model, inputs)?,
        None => (model.forward(inputs)?, Vec::new()),
    };
    let [b, l, v] = out.logits.dims();
    let targets = tokens::<B>(&batch.targets, batch.batch, batch.seq_len, device).reshape([b * l]);
    let ce = CrossEntropyLossConfig::new().init(device).forward(out.logits.reshape([b * l, v]), targets);
    // The layers hand their losses back in the compute dtype; the loss is summed in f32.
    let balance = out.moe.iter().filter_map(|aux| aux.loss()).reduce(|a, b| a + b).map(|b| b.cast(FloatDType::F32));
    let dropped = out.moe.iter().map(|aux| aux.dropped).sum();
    Ok(BatchLoss { ce, balance, counts: out.moe.into_iter().map(|aux| aux.counts).collect(), dropped, ranks })
}

/// Loss and MaxVio over the fixed validation windows, without gradients or bias updates.
pub fn evaluate<B: MoeBackend>(
    model: &DeepSeekModel<B>,
    corpus: &Corpus,
    config: &RunConfig,
    device: &B::Device,
) -> Result<EvalMetrics, TrainError> {
    let (count, batch, seq) = (config.train.eval_batches, config.data.batch_size, config.data.seq_len);
    let sharded = config.parallel.placement(config.model.moe.n_routed_experts)?.map(ShardedModel::new);
    let layers = config.model.num_moe_layers();
    let mut vio = vec![EvalMaxVio::default(); layers];
    let mut rank_vio = vec![EvalMaxVio::default(); layers];
    let mut total = 0.0;
    for i in 0..count {
        let BatchLoss { ce, counts, ranks, .. } =
            batch_loss(model, sharded.as_ref(), &corpus.val_batch(i, count, batch, seq), device)?;
        total += ce.into_scalar().elem::<f64>();
        for (acc, c) in vio.iter_mut().zip(counts) {
            let load: Vec<u64> = c.into_data().iter::<i64>().map(|x| x as u64).collect();
            acc.add(&load);
        }
        for (acc, layer) in rank_vio.iter_mut().zip(&ranks) {
            acc.add(&layer.pairs_per_rank);
        }
    }
    let val_loss = total / count as f64;
    let worst = |v: &[EvalMaxVio]| v.iter().map(EvalMaxVio::value).fold(0.0, f64::max);
    Ok(EvalMetrics {
        val_loss,
        val_bpb: val_loss / std::f64::consts::LN_2,
        val_max_vio: worst(&vio),
        val_rank_max_vio: sharded.is_some().then(|| worst(&rank_vio)),
    })
}

/// Trains `config` on `device`, writing the run's files to `options.run_dir`.
pub fn train<B>(config: &RunConfig, device: &B::Device, options: &RunOptions) -> Result<RunSummary, TrainError>
where
    B: AutodiffBackend + MoeBackend,
    B::InnerBackend: MoeBackend,
{
    let run_dir = &options.run_dir;
    // Refused before anything is written.
    config.train.precision.compute_dtype::<B>(device, options.gpu)?;
    std::fs::create_dir_all(run_dir).map_err(io_err(run_dir))?;
    let existing = checkpoint::list(run_dir)?;
    if !options.resume && !existing.is_empty() {
        return Err(TrainError::RunExists(run_dir.clone()));
    }
    let resume_from = if options.resume { existing.last().cloned() } else { None };
    let resumed = resume_from.as_deref().map(checkpoint::read_state).transpose()?;
    let config = resumed.as_ref().map_or_else(|| config.clone(), |state| state.config.clone());
    let corpus = Corpus::load(config.corpus_path(), config.data.val_fraction, config.data.seq_len)?;

    let compute_dtype = config.train.precision.compute_dtype::<B>(device, options.gpu)?;
    let mut model = build_model::<B>(&config, device)?.with_compute_dtype(compute_dtype);
    let o = &config.optim;
    let mut optim = OptimizerAdaptor::<_, DeepSeekModel<B>, B>::from(FusedAdamW {
        beta_1: o.beta1 as f32,
        beta_2: o.beta2 as f32,
        epsilon: ADAMW_EPSILON,
        weight_decay: o.weight_decay as f32,
        clip_norm: (o.grad_clip > 0.0).then_some(o.grad_clip as f32),
    });
    let mut rng = SplitMix64::new(config.train.seed ^ 0x5EED_0FBA_7C4E_5000);
    let mut step = 0;
    let mut elapsed_before = 0.0;
    if let (Some(ckpt), Some(state)) = (&resume_from, resumed) {
        model = checkpoint::load_model(ckpt, model, device)?;
        optim = checkpoint::load_optim::<B, _>(ckpt, optim, device)?;
        rng = state.rng;
        step = state.step;
        elapsed_before = state.elapsed_s;
    }
    let mut log = MetricsLog::open(run_dir, step).map_err(io_err(run_dir))?;
    let config_path = run_dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap_or_default())
        .map_err(io_err(&config_path))?;

    let layers = config.model.num_moe_layers();
    let experts = config.model.moe.n_routed_experts;
    let (_, _, gamma) = config.balance.weights();
    let balancer = BiasBalancer::new(
        BiasUpdateConfig::new().with_gamma(gamma).with_frozen(config.balance.mode != BalanceMode::LossFree),
    );
    let mut tracker = LoadTracker::<B>::new(layers, experts);
    let sharded = config.parallel.placement(experts)?.map(ShardedModel::new);
    let t = &config.train;
    let last = options.stop_at.unwrap_or(t.steps).min(t.steps);
    let step_tokens = (config.data.batch_size * config.data.seq_len * o.grad_accum) as f64;

    let bar = if options.progress { ProgressBar::new(t.steps as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(step as u64);

    let first_step = step;
    if options.gpu {
        // The first step compiles and autotunes every kernel it meets: minutes on a cold cache.
        bar.enable_steady_tick(std::time::Duration::from_millis(500));
        say(&bar, format!("step {} compiles and tunes the GPU kernels (computing in {compute_dtype:?})", step + 1));
    }
    let started = Instant::now();
    let mut losses = Vec::new();
    let mut phases = Vec::new();
    let mut eval = None;
    let mut latest = resume_from.clone();
    while step < last {
        let step_started = Instant::now();
        let lr = learning_rate(step, t.steps, o.warmup_steps, o.lr, o.min_lr);
        let mut accumulator = GradientsAccumulator::<DeepSeekModel<B>>::new();
        let (mut loss_sum, mut balance_sum, mut dropped) = (0.0, 0.0, 0);
        let mut rank_metrics = sharded.map(|_| RankMetrics::default());
        let mut clock = PhaseClock::<B>::start(device, options.profile);
        for _ in 0..o.grad_accum {
            let batch = corpus.train_batch(&mut rng, config.data.batch_size, config.data.seq_len);
            let BatchLoss { ce, balance, counts, dropped: d, ranks } =
                batch_loss(&model, sharded.as_ref(), &batch, device)?;
            clock.mark(Phase::Forward);
            if let Some(metrics) = &mut rank_metrics {
                metrics.add(&ranks);
            }
            for (layer, c) in counts.into_iter().enumerate() {
                tracker.record(layer, c);
            }
            dropped += d;
            // One host read per micro-batch for both numbers the log needs.
            let (total, readout) = match balance {
                Some(balance) => (ce.clone() + balance.clone(), Tensor::cat(vec![ce, balance], 0)),
                None => (ce.clone(), ce),
            };
            let values: Vec<f64> = readout.into_data().iter::<f64>().collect();
            clock.mark(Phase::LossRead);
            loss_sum += values[0];
            balance_sum += values.get(1).copied().unwrap_or(0.0);
            let total = total.div_scalar(o.grad_accum as f64);
            accumulator.accumulate(&model, GradientsParams::from_grads(total.backward(), &model));
            clock.mark(Phase::Backward);
        }
        model = optim.step(lr, model, accumulator.grads());
        clock.mark(Phase::Optimizer);
        // The bias moves after the step, from the load of the step's training passes only.
        let load = tracker.take();
        let scale = if config.balance.gamma_follows_lr {
            learning_rate(step, t.steps, 0, 1.0, o.min_lr / o.lr.max(f64::MIN_POSITIVE))
        } else {
            1.0
        };
        for (layer, l) in model.moe_layers_mut().zip(&load) {
            let delta: Vec<f32> = balancer.bias_delta(l).iter().map(|d| d * scale as f32).collect();
            layer.apply_bias_delta(&delta);
        }
        clock.mark(Phase::Balance);
        let split = clock.finish();
        phases.extend(split);
        if options.gpu && step == first_step {
            say(&bar, format!("step {} took {:.1} s", step + 1, step_started.elapsed().as_secs_f64()));
        }
        step += 1;
        let loss = loss_sum / o.grad_accum as f64;
        if !loss.is_finite() {
            return Err(TrainError::Diverged { step, loss });
        }
        losses.push(loss);
        let elapsed = elapsed_before + started.elapsed().as_secs_f64();
        let mut record = StepMetrics {
            step,
            loss,
            balance_loss: balance_sum / o.grad_accum as f64,
            lr,
            tokens_per_s: step_tokens / step_started.elapsed().as_secs_f64(),
            elapsed_s: elapsed,
            max_vio: load.iter().map(|l| max_violation(l)).collect(),
            load,
            dropped,
            ranks: rank_metrics,
            eval: None,
            phases: split,
        };
        let finishing = step == last;
        if finishing || (t.eval_every > 0 && step.is_multiple_of(t.eval_every)) {
            let e = evaluate(&model.valid(), &corpus, &config, device)?;
            let ranks = e.val_rank_max_vio.map_or_else(String::new, |v| format!("  val rank MaxVio {v:.3}"));
            let line = format!(
                "step {step:>6}  loss {loss:.3}  val {:.3} nats/byte ({:.3} bits)  val MaxVio {:.3}{ranks}  {:.0} tok/s",
                e.val_loss,
                e.val_bpb,
                e.val_max_vio,
                step_tokens * step as f64 / elapsed.max(1e-9)
            );
            say(&bar, line);
            record.eval = Some(e);
            eval = Some(e);
        }
        log.append(&record).map_err(io_err(log.path()))?;
        if finishing || (t.checkpoint_every > 0 && step.is_multiple_of(t.checkpoint_every)) {
            let state = TrainState { step, rng, elapsed_s: elapsed, config: config.clone() };
            latest = Some(checkpoint::save(run_dir, &model, &optim, &state, t.keep_checkpoints)?);
        }
        if step.is_multiple_of(t.log_every) || finishing {
            let worst = record.max_vio.iter().copied().fold(0.0, f64::max);
            bar.set_message(format!("loss {loss:.3} | {:.0} tok/s | MaxVio {worst:.2}", record.tokens_per_s));
        }
        bar.set_position(step as u64);
    }
    bar.finish_and_clear();
    if options.profile {
        // The first steps compile and tune kernels.
        println!("{}", median_line(phases.get(3..).filter(|p| !p.is_empty()).unwrap_or(&phases)));
    }
    let elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
    let eval = match eval {
        Some(e) => e,
        None => evaluate(&model.valid(), &corpus, &config, device)?,
    };
    crate::validation_trace::write(&run_dir.join(TRACE_FILE), &model.valid(), &corpus, &config, device)?;
    let checkpoint = latest.ok_or_else(|| RunCheckpointError::None(run_dir.clone()))?;
    Ok(RunSummary {
        steps: step,
        eval,
        tokens_per_s: step_tokens * step as f64 / elapsed_s.max(1e-9),
        elapsed_s,
        checkpoint,
        losses,
    })
}
