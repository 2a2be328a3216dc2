//! Configuration layering and its errors, as data: each case is a set of `--set` items and what
//! must come out.

use std::path::PathBuf;
use std::process::Command;

use moe_runner::settings::{BalanceMode, Layers, RunConfig};

fn configs(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs").join(name)
}

fn load(file: Option<&str>, set: &[&str]) -> Result<RunConfig, String> {
    let layers = Layers { file: file.map(configs), env: false, set: set.iter().map(|s| s.to_string()).collect() };
    RunConfig::load(&layers).map_err(|e| e.to_string())
}

#[test]
fn layers_override_in_order() {
    let default = load(None, &[]).unwrap();
    assert_eq!((default.name.as_str(), default.model.moe.hidden_size), ("tiny", 128));
    // The file overrides the default; keys it does not name keep the default's values.
    let smoke = load(Some("smoke.toml"), &[]).unwrap();
    assert_eq!((smoke.name.as_str(), smoke.model.moe.hidden_size), ("smoke", 32));
    assert_eq!(smoke.optim.beta2, default.optim.beta2);
    // --set overrides the file, for runner keys and for the flattened model keys alike.
    let set = load(
        Some("smoke.toml"),
        &["train.steps=7", "model.n_routed_experts=4", "balance.mode=aux_loss", "optim.lr=0.5"],
    )
    .unwrap();
    assert_eq!((set.train.steps, set.model.moe.n_routed_experts, set.balance.mode), (7, 4, BalanceMode::AuxLoss));
    assert_eq!(set.optim.lr, 0.5);
    assert_eq!(load(None, &["train.steps=3", "train.steps=9"]).unwrap().train.steps, 9, "the last --set wins");
}

#[test]
fn every_shipped_config_is_valid() {
    for entry in std::fs::read_dir(configs("")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let run = load(Some(&name), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(format!("{}.toml", run.name), name, "a config's name matches its file");
    }
}

#[test]
fn bad_keys_and_values_are_named() {
    let cases: &[(&[&str], &str)] = &[
        (&["train.stepz=5"], "stepz"),
        (&["model.hiden_size=64"], "model.hiden_size"),
        (&["balance.mode=sometimes"], "sometimes"),
        (&["train.steps=0"], "train.steps"),
        (&["train.steps=many"], "train.steps"),
        (&["optim.lr=-1"], "optim.lr"),
        (&["optim.min_lr=1"], "optim.min_lr"),
        (&["optim.beta2=1"], "optim.beta2"),
        (&["optim.grad_accum=0"], "optim.grad_accum"),
        (&["data.seq_len=4096"], "data.seq_len"),
        (&["data.val_fraction=1.5"], "data.val_fraction"),
        (&["model.vocab_size=300"], "model.vocab_size"),
        (&["model.num_experts_per_tok=17"], "top_k (17)"),
        (&["model.num_attention_heads=3"], "num_attention_heads"),
        (&["name=../elsewhere"], "name"),
        (&["train.steps"], "key=value"),
        (&["parallel.expert_ranks=3"], "num_experts (16) must be a multiple of num_ranks (3)"),
        (&["parallel.expert_ranks=4", "parallel.nodes=3"], "num_ranks (4) must be a multiple of num_nodes (3)"),
        (&["parallel.expert_ranks=0"], "num_ranks must be at least 1"),
        (&["parallel.expert_ranks=32"], "num_experts (16) must be a multiple of num_ranks (32)"),
        (&["parallel.expert_ranks=8", "data.batch_size=12"], "data.batch_size"),
        (&["parallel.ranks=2"], "ranks"),
        (&["train.precision=fp8"], "train.precision"),
        (&["train.precision=fp8"], "`fp8`: expected `auto`, `f32` or `bf16`"),
    ];
    for (set, needle) in cases {
        let err = load(None, set).expect_err(&format!("{set:?} was accepted"));
        assert!(err.contains(needle), "{set:?}: the error {err:?} does not name {needle:?}");
    }
}

#[test]
fn environment_layer_sits_between_the_file_and_set() {
    let bin = env!("CARGO_BIN_EXE_moe-runner");
    // The bad data path keeps a broken environment layer from starting a real run.
    let out = Command::new(bin)
        .args(["train", "--data", "/nonexistent/corpus.txt"])
        .env("MOE_TRAIN__STEPS", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("train.steps = 0"), "{err}");
    // --set beats the environment: the run gets past validation and fails on the data file.
    let out = Command::new(bin)
        .args(["train", "--set", "train.steps=5", "--data", "/nonexistent/corpus.txt", "--run-dir"])
        .arg(std::env::temp_dir().join("moe-runner-env-test"))
        .env("MOE_TRAIN__STEPS", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("/nonexistent/corpus.txt"), "{err}");
}
