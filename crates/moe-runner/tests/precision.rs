//! Mixed precision on a CPU backend with bf16 arithmetic (Flex): bf16 compute with f32 masters
//! tracks an f32 run of the same seed, its checkpoints hold f32 parameters, and `bf16` on a
//! backend without it is refused before the run directory exists.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex, NdArray};
use moe_runner::checkpoint;
use moe_runner::error::TrainError;
use moe_runner::settings::{Layers, RunConfig};
use moe_runner::train::{RunOptions, train};

fn smoke(precision: &str) -> RunConfig {
    RunConfig::load(&Layers {
        file: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/smoke.toml")),
        env: false,
        set: vec![format!("train.precision={precision}"), "train.keep_checkpoints=1".into()],
    })
    .unwrap()
}

fn options(name: &str) -> RunOptions {
    let run_dir = std::env::temp_dir().join(format!("moe-runner-precision-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    RunOptions { run_dir, resume: false, progress: false, stop_at: None, gpu: false, profile: false }
}

#[test]
fn bf16_compute_with_f32_masters_tracks_f32() {
    let (f32_run, bf16_run) = (options("f32"), options("bf16"));
    let device = Default::default();
    let reference = train::<Autodiff<Flex>>(&smoke("f32"), &device, &f32_run).unwrap();
    let mixed = train::<Autodiff<Flex>>(&smoke("bf16"), &device, &bf16_run).unwrap();

    // bf16 keeps 8 bits of mantissa (0.4% per rounding); over 40 steps of a model that learns
    // fast the curves may drift apart by a few percent, never by the loss's own fall (40%).
    let steps = reference.losses.len();
    assert_eq!(mixed.losses.len(), steps);
    for (step, (a, b)) in reference.losses.iter().zip(&mixed.losses).enumerate() {
        assert!((a - b).abs() <= 0.05 * a, "step {}: f32 {a:.4}, bf16 {b:.4}", step + 1);
    }
    let (a, b) = (reference.eval.val_loss, mixed.eval.val_loss);
    assert!((a - b).abs() <= 0.03 * a, "validation: f32 {a:.4}, bf16 {b:.4}");
    // Not the same run: the products did round.
    assert_ne!(reference.losses, mixed.losses);

    // The checkpoint holds the f32 masters: as many bytes as the f32 run's (bf16 would be half).
    let model_bytes = |run: &RunOptions| {
        let checkpoint = checkpoint::list(&run.run_dir).unwrap().pop().unwrap();
        std::fs::read_dir(&checkpoint)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.file_name().unwrap().to_string_lossy().starts_with("model"))
            .map(|path| std::fs::metadata(path).unwrap().len())
            .sum::<u64>()
    };
    let bytes = model_bytes(&bf16_run);
    assert!(bytes > 0 && bytes == model_bytes(&f32_run), "checkpoint of {bytes} bytes");
    for run in [f32_run, bf16_run] {
        std::fs::remove_dir_all(&run.run_dir).unwrap();
    }
}

#[test]
fn bf16_without_bf16_arithmetic_is_refused_before_anything_is_written() {
    let run = options("refused");
    let err = train::<Autodiff<NdArray>>(&smoke("bf16"), &Default::default(), &run).unwrap_err();
    assert!(matches!(err, TrainError::Settings(_)), "{err}");
    assert!(err.to_string().contains("train.precision"), "{err}");
    assert!(!run.run_dir.exists(), "the run directory was created");
}
