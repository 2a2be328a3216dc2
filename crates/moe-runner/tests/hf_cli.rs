//! The HF checkpoint verbs through the binary. The `logits` contract: the tiny_a fixture's `input_ids` in, logits out,
//! within 1e-4 of HF transformers' (the fixture's `reference.safetensors`).

use std::path::PathBuf;
use std::process::Command;

use safetensors::SafeTensors;

fn f32s(file: &SafeTensors, name: &str) -> (Vec<f32>, Vec<usize>) {
    let view = file.tensor(name).unwrap();
    let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    (values, view.shape().to_vec())
}

#[test]
fn logits_command_matches_hf_transformers() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../moe-model/tests/data/tiny_a");
    let reference = fixture.join("reference.safetensors");
    let output = std::env::temp_dir().join(format!("moe-runner-logits-{}.safetensors", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_moe-runner"))
        .args(["logits", "--checkpoint"])
        .arg(&fixture)
        .arg("--input")
        .arg(&reference)
        .arg("--output")
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success());
    let ours_bytes = std::fs::read(&output).unwrap();
    let ref_bytes = std::fs::read(&reference).unwrap();
    let (ours, shape) = f32s(&SafeTensors::deserialize(&ours_bytes).unwrap(), "logits");
    let (theirs, ref_shape) = f32s(&SafeTensors::deserialize(&ref_bytes).unwrap(), "logits");
    assert_eq!(shape, ref_shape);
    let worst = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "max abs logits error {worst}");
    // A missing input names the file and writes nothing.
    let out = Command::new(env!("CARGO_BIN_EXE_moe-runner"))
        .args(["logits", "--checkpoint"])
        .arg(&fixture)
        .args(["--input", "/nonexistent/in.safetensors", "--output"])
        .arg(output.with_extension("never"))
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("/nonexistent/in.safetensors"));
    assert!(!output.with_extension("never").exists());
    std::fs::remove_file(&output).unwrap();
}

#[test]
fn generate_from_a_checkpoint_takes_ids_or_names_the_missing_tokenizer() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../moe-model/tests/data/tiny_a");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_moe-runner"))
            .args(["generate", "--checkpoint"])
            .arg(&fixture)
            .args(extra)
            .output()
            .unwrap()
    };
    let greedy = run(&["--ids", "5,17,42", "--length", "6", "--temperature", "0"]);
    assert!(greedy.status.success(), "{}", String::from_utf8_lossy(&greedy.stderr));
    let text = String::from_utf8_lossy(&greedy.stdout).into_owned();
    let new_ids = text.lines().find_map(|l| l.strip_prefix("new ids ")).expect("a line of new ids");
    assert_eq!(new_ids.matches(',').count() + 1, 6, "{text}");
    assert_eq!(run(&["--ids", "5,17,42", "--length", "6", "--temperature", "0"]).stdout, greedy.stdout);
    // The fixture ships no tokenizer.json, so a text prompt is refused, naming the way out.
    let refused = run(&["--prompt", "hello"]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("--ids"));
}
