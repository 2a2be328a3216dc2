//! The learning-rate schedule: linear warmup to the peak, then a cosine down to the floor.

/// The learning rate for optimizer step `step` (0-based) of `total`.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64, floor: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    floor + 0.5 * (peak - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_to_the_floor() {
        let lr = |s| learning_rate(s, 110, 10, 1.0, 0.1);
        assert!((lr(0) - 0.1).abs() < 1e-12 && (lr(4) - 0.5).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12, "peak right after the warmup");
        assert!((lr(60) - 0.55).abs() < 1e-12, "halfway down the cosine: the midpoint");
        assert!(lr(109) > 0.1 && lr(109) < 0.101);
        let all: Vec<f64> = (10..110).map(lr).collect();
        assert!(all.windows(2).all(|w| w[1] <= w[0]), "monotone after the warmup");
    }
}
