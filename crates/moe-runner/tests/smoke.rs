//! The `smoke` configuration trains in seconds: the loss falls, and every file a run promises
//! appears (metrics, checkpoints, plots, summary), and sampling reads the run back.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use moe_model::generate::Sampling;
use moe_runner::sample::{continue_text, load_run};
use moe_runner::settings::{Layers, RunConfig};
use moe_runner::train::{RunOptions, TRACE_FILE, train};
use moe_runner::{checkpoint, metrics, report};

#[test]
fn smoke_run_learns_and_writes_its_files() {
    let config = RunConfig::load(&Layers {
        file: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/smoke.toml")),
        env: false,
        set: vec!["train.keep_checkpoints=1".into()],
    })
    .unwrap();
    let run_dir = std::env::temp_dir().join(format!("moe-runner-smoke-{}", std::process::id()));
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

    let steps = config.train.steps;
    assert_eq!((summary.steps, summary.losses.len()), (steps, steps));
    let head = summary.losses[..5].iter().sum::<f64>() / 5.0;
    let tail = summary.losses[steps - 5..].iter().sum::<f64>() / 5.0;
    // Uniform over 256 bytes is ln 256 = 5.55 nats; the first steps sit near it.
    assert!(head > 4.0 && tail < head - 1.0, "the loss did not fall: first steps {head:.3}, last {tail:.3}");
    assert!(summary.eval.val_loss < head, "validation {:.3} vs first steps {head:.3}", summary.eval.val_loss);

    let records = metrics::read(&run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(records.len(), steps);
    assert!(records.iter().enumerate().all(|(i, r)| r.step == i + 1));
    let layers = config.model.num_moe_layers();
    let pairs = (config.data.batch_size * config.data.seq_len * config.model.moe.num_experts_per_tok) as u64;
    for r in &records {
        assert_eq!(r.load.len(), layers);
        assert!(r.load.iter().all(|l| l.iter().sum::<u64>() == pairs), "every pair is counted once");
    }
    assert_eq!(records.iter().filter(|r| r.eval.is_some()).count(), steps / config.train.eval_every);
    // keep_checkpoints = 1: only the final one is left, and it names the last step.
    let kept = checkpoint::list(&run_dir).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(checkpoint::read_state(&kept[0]).unwrap().step, steps);

    // The routing trace covers every validation token of every MoE layer, and its load gives
    // the same validation MaxVio as the evaluation's own count.
    let trace = moe_balance::RoutingTrace::load(run_dir.join(TRACE_FILE)).unwrap();
    let val_tokens = (config.train.eval_batches * config.data.batch_size * config.data.seq_len) as u64;
    assert_eq!((trace.num_layers(), trace.num_tokens()), (layers, val_tokens));
    let worst =
        (0..layers).map(|l| moe_balance::metrics::max_violation(&trace.expert_load(l).unwrap())).fold(0.0, f64::max);
    assert!((worst - summary.eval.val_max_vio).abs() < 1e-9, "trace {worst} vs eval {}", summary.eval.val_max_vio);

    let text = report::write(&run_dir, &config, &summary).unwrap();
    assert!(text.contains("validation loss"));
    for file in ["loss.png", "load_layer0.png", "summary.md", "config.json"] {
        let bytes = std::fs::read(run_dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        if file.ends_with(".png") {
            assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 2000, "{file} is not a drawn PNG");
        }
    }

    // Sampling reads the run back: greedy is deterministic, and a longer text than the window
    // slides it (the smoke window is 32 bytes).
    let (model, context) = load_run::<Flex>(&run_dir, &Default::default()).unwrap();
    let a = continue_text(&model, context, b"ROMEO:", 40, Sampling::Greedy, 0).unwrap();
    let b = continue_text(&model, context, b"ROMEO:", 40, Sampling::Greedy, 1).unwrap();
    assert_eq!((a.len(), &a), (40, &b), "greedy decoding is deterministic");
    let hot = Sampling::Temperature { temperature: 1.0, top_p: 0.9 };
    assert_eq!(
        continue_text(&model, context, b"", 40, hot, 7).unwrap(),
        continue_text(&model, context, b"", 40, hot, 7).unwrap(),
        "one seed, one text"
    );
    std::fs::remove_dir_all(&run_dir).unwrap();
}
