//! `parallel.expert_ranks`: training with the experts sharded over ranks follows the same
//! trajectory as one rank (same seed, same batches), and its per-rank records agree with the
//! per-expert load and with node-limited routing.

use std::path::PathBuf;
use std::sync::Mutex;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use moe_parallel::Placement;
use moe_runner::expert_parallel::ShardedModel;
use moe_runner::settings::{Layers, RunConfig};
use moe_runner::train::{RunOptions, RunSummary, build_model, train};
use moe_runner::{metrics, report};

type A = Autodiff<Flex>;

/// The backend's seeded RNG is process-wide: tests that build models take turns.
static RNG: Mutex<()> = Mutex::new(());

fn smoke(set: &[String]) -> RunConfig {
    RunConfig::load(&Layers {
        file: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/smoke.toml")),
        env: false,
        set: set.to_vec(),
    })
    .unwrap()
}

/// Every parameter's gradient, in visiting order.
struct Grads<'a> {
    grads: &'a <A as AutodiffBackend>::Gradients,
    out: Vec<(Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor<A> for Grads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
        let grad = param.grad(self.grads).map_or_else(Vec::new, |g| g.into_data().iter::<f32>().collect());
        self.out.push((param.dims().to_vec(), grad));
    }
}

#[test]
fn sharding_leaves_every_gradient_unchanged() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let config = smoke(&[]);
    let device = Default::default();
    let model = build_model::<A>(&config, &device).unwrap();
    let ids: Vec<i64> = (0..8 * 32).map(|i| i * 37 % 256).collect();
    let tokens = || Tensor::<A, 2, Int>::from_data(TensorData::new(ids.clone(), [8, 32]), &device);
    let grads = |out: moe_model::ModelOutput<A>| {
        let balance = out.moe.iter().filter_map(|aux| aux.loss()).reduce(|a, b| a + b).unwrap();
        let grads = (out.logits.powi_scalar(2).mean() + balance).backward();
        let mut visitor = Grads { grads: &grads, out: Vec::new() };
        model.visit(&mut visitor);
        visitor.out
    };
    let want = grads(model.forward(tokens()).unwrap());
    let (out, _) = ShardedModel::new(Placement::new(8, 4, 2).unwrap()).forward(&model, tokens()).unwrap();
    let got = grads(out);
    // A batch the ranks cannot split evenly is refused, not truncated.
    let odd = Tensor::<A, 2, Int>::from_data(TensorData::new(ids[..6 * 32].to_vec(), [6, 32]), &device);
    let err = ShardedModel::new(Placement::new(8, 4, 2).unwrap()).forward(&model, odd).err().unwrap();
    assert!(err.to_string().contains("data.batch_size = 6"), "{err}");
    assert_eq!(got.len(), want.len());
    for ((dims, got), (_, want)) in got.iter().zip(&want) {
        assert_eq!(got.len(), want.len(), "{dims:?}: a gradient is missing");
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f32::max);
        let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(diff <= 1e-5 * scale.max(1e-3), "{dims:?}: max |grad diff| {diff} (scale {scale})");
    }
}

fn run(set: &[&str], tag: &str) -> (RunConfig, RunSummary, Vec<metrics::StepMetrics>) {
    let mut items = vec!["train.steps=8".to_string(), "train.eval_every=8".to_string()];
    items.extend(set.iter().map(|s| s.to_string()));
    let config = smoke(&items);
    let run_dir = std::env::temp_dir().join(format!("moe-runner-ep-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    let options = RunOptions {
        run_dir: run_dir.clone(),
        resume: false,
        progress: false,
        stop_at: None,
        gpu: false,
        profile: false,
    };
    let summary = train::<Autodiff<Flex>>(&config, &Default::default(), &options).unwrap();
    let records = metrics::read(&run_dir.join("metrics.jsonl")).unwrap();
    // The summary shows the ranks exactly when the run had them.
    let text = report::write(&run_dir, &config, &summary).unwrap();
    assert_eq!(text.contains("per-rank MaxVio"), config.parallel.expert_ranks > 1, "{text}");
    std::fs::remove_dir_all(&run_dir).unwrap();
    (config, summary, records)
}

#[test]
fn sharded_training_matches_one_rank() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (_, single, single_records) = run(&[], "1");
    assert!(single_records.iter().all(|r| r.ranks.is_none()) && single.eval.val_rank_max_vio.is_none());
    // smoke: 8 experts in 2 groups keeping 1; 4 ranks on 2 nodes put one group on each node.
    let (config, sharded, records) = run(&["parallel.expert_ranks=4", "parallel.nodes=2"], "4x2");
    // The first step is the same sums in another order. After it, Adam divides each gradient
    // by its own magnitude, so entries that are rounding noise get full-size steps and the
    // trajectories drift apart a little (the gradients themselves are compared below).
    let (a, b) = (single.losses[0], sharded.losses[0]);
    assert!((a - b).abs() < 1e-5 * a, "step 1: loss {a} on one rank, {b} on four");
    for (step, (a, b)) in single.losses.iter().zip(&sharded.losses).enumerate() {
        assert!((a - b).abs() < 1e-2 * a, "step {}: loss {a} on one rank, {b} on four", step + 1);
    }

    let placement = Placement::new(8, 4, 2).unwrap();
    let layers = config.model.num_moe_layers();
    let tokens = (config.data.batch_size * config.data.seq_len) as u64;
    for r in &records {
        let ranks = r.ranks.as_ref().expect("every step records its ranks");
        assert_eq!(ranks.rank_load.len(), layers);
        for (layer, rank_load) in ranks.rank_load.iter().enumerate() {
            // A rank computes exactly the pairs routed to its experts.
            assert_eq!(Some(rank_load.clone()), placement.rank_loads(&r.load[layer]), "step {} layer {layer}", r.step);
        }
        // topk_group = 1 with one group per node: every token stays on one node.
        assert_eq!(ranks.max_nodes_reached, 1);
        // A token's one node holds 2 ranks: at most 2 rows leave for another node, or 1 for
        // the other rank of its own, and each comes back combined.
        let row = config.model.moe.hidden_size as u64 * 4;
        let bound = 2 * tokens * row * layers as u64;
        assert!(ranks.bytes_inter_node <= 2 * bound && ranks.bytes_intra_node <= bound, "step {}", r.step);
        assert!(ranks.bytes_inter_node > 0 && ranks.bytes_intra_node > 0);
    }
    let vio = sharded.eval.val_rank_max_vio.expect("the evaluation reports the per-rank MaxVio");
    assert!(vio.is_finite() && vio >= 0.0);

    // Without the node limit (1 group), tokens reach both nodes.
    let (_, _, records) = run(&["parallel.expert_ranks=4", "parallel.nodes=2", "model.n_group=1"], "no-limit");
    assert!(records.iter().all(|r| r.ranks.as_ref().unwrap().max_nodes_reached == 2));
}
