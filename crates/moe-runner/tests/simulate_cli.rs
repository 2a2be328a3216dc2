//! `simulate` prints its table and draws its PNG, and refuses a bad flag by name.

use std::process::Command;

#[test]
fn simulate_prints_the_table_and_draws_the_plot() {
    let png = std::env::temp_dir().join(format!("moe-simulate-{}.png", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_moe-runner"))
        .args(["simulate", "--gpus", "64", "--gpus-per-node", "8", "--experts", "64", "--top-k", "6"])
        .args(["--max-nodes", "2", "--tokens-per-gpu", "256", "--png"])
        .arg(&png)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("M=2") && text.contains("no limit"), "{text}");
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000, "the PNG is not drawn");
    std::fs::remove_file(&png).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_moe-runner")).args(["simulate", "--max-nodes", "few"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--max-nodes few"), "{err}");
}
