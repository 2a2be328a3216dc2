//! `--resume` continues a run exactly: on the CPU, the resumed run's losses equal the
//! uninterrupted run's, bit for bit. Alone in its test binary, so no other test touches the
//! backend's global RNG while the two runs initialise.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use moe_runner::error::TrainError;
use moe_runner::settings::{Layers, RunConfig};
use moe_runner::train::{RunOptions, train};

type B = Autodiff<Flex>;

#[test]
fn resumed_run_reproduces_the_uninterrupted_losses() {
    // One rank, and experts sharded over 2 ranks on 2 nodes (whose config the checkpoint
    // must carry back).
    for (tag, extra) in [("plain", None), ("sharded", Some(["parallel.expert_ranks=2", "parallel.nodes=2"]))] {
        // Accumulation and clipping on, so their state is part of what must survive.
        let mut set =
            vec!["train.steps=16".to_string(), "train.checkpoint_every=4".into(), "optim.grad_accum=2".into()];
        set.extend(extra.into_iter().flatten().map(String::from));
        let config = RunConfig::load(&Layers {
            file: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/smoke.toml")),
            env: false,
            set,
        })
        .unwrap();
        let root = std::env::temp_dir().join(format!("moe-runner-resume-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let device = Default::default();
        let options = |dir: &str, resume, stop_at| RunOptions {
            run_dir: root.join(dir),
            resume,
            progress: false,
            stop_at,
            gpu: false,
            profile: false,
        };

        let whole = train::<B>(&config, &device, &options("whole", false, None)).unwrap();
        let first = train::<B>(&config, &device, &options("split", false, Some(6))).unwrap();
        assert_eq!(first.steps, 6);
        // Starting over on a run with checkpoints is refused, and loses nothing.
        assert!(matches!(train::<B>(&config, &device, &options("split", false, None)), Err(TrainError::RunExists(_))));
        // The newest checkpoint is the stop at step 6 (written on the way out), so the resumed
        // run redoes nothing and draws the same batches.
        let rest = train::<B>(&config, &device, &options("split", true, None)).unwrap();
        assert_eq!(rest.steps, 16);
        assert_eq!(first.losses[..], whole.losses[..6], "{tag}");
        assert_eq!(rest.losses[..], whole.losses[6..], "{tag}: resumed losses differ from the uninterrupted run");
        assert_eq!(rest.eval.val_loss, whole.eval.val_loss);
        let metrics = moe_runner::metrics::read(&root.join("split/metrics.jsonl")).unwrap();
        assert_eq!(metrics.iter().map(|m| m.step).collect::<Vec<_>>(), (1..=16).collect::<Vec<_>>());
        assert!(metrics.iter().all(|m| m.ranks.is_some() == extra.is_some()), "{tag}: per-rank records");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
