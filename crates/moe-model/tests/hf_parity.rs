//! The whole model against HF transformers 5.17 on `tests/data/tiny_a`.

mod common;

use common::{B, max_abs, reference, tiny_a, values};
use moe_model::hf::load_checkpoint;

#[test]
fn logits_match_hf_transformers() {
    let device = Default::default();
    let (config, model) = load_checkpoint::<B>(&tiny_a(), &device).unwrap();
    assert!(config.mla().unwrap().is_some());
    let (ids, expected, shape) = reference();
    let out = model.forward(ids).unwrap();
    assert_eq!(out.logits.dims(), shape);
    let err = max_abs(&values(out.logits), &expected);
    println!("logits max-abs error vs HF transformers: {err:e}");
    assert!(err <= 1e-4, "logits max-abs error {err}");
}
