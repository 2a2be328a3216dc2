//! Balance metrics on host-side loads.

/// MaxVio = (max load - mean load) / mean load; 0 when nothing was routed.
pub fn max_violation(load: &[u64]) -> f64 {
    if load.is_empty() {
        return 0.0;
    }
    let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
    if mean == 0.0 {
        return 0.0;
    }
    let max = load.iter().copied().max().unwrap_or(0) as f64;
    (max - mean) / mean
}

/// Each expert's share of the routed tokens (sums to 1; all 0 when nothing was routed).
pub fn load_histogram(load: &[u64]) -> Vec<f64> {
    let total = load.iter().sum::<u64>() as f64;
    load.iter().map(|&l| if total > 0.0 { l as f64 / total } else { 0.0 }).collect()
}

/// MaxVio over a whole eval set: loads are summed over batches first, as the paper reports
/// MaxVio_global.
#[derive(Debug, Clone, Default)]
pub struct EvalMaxVio {
    totals: Vec<u64>,
}

impl EvalMaxVio {
    /// Adds one batch's load.
    pub fn add(&mut self, load: &[u64]) {
        if self.totals.len() < load.len() {
            self.totals.resize(load.len(), 0);
        }
        self.totals.iter_mut().zip(load).for_each(|(t, l)| *t += l);
    }

    /// MaxVio of the summed load.
    pub fn value(&self) -> f64 {
        max_violation(&self.totals)
    }

    /// The summed load.
    pub fn totals(&self) -> &[u64] {
        &self.totals
    }
}

/// Flags experts that received no token for `patience` consecutive steps (expert collapse).
#[derive(Debug, Clone)]
pub struct CollapseAlarm {
    patience: usize,
    idle_steps: Vec<Vec<usize>>,
}

impl CollapseAlarm {
    /// An alarm for `num_layers` layers of `num_experts` experts.
    pub fn new(num_layers: usize, num_experts: usize, patience: usize) -> Self {
        Self { patience, idle_steps: vec![vec![0; num_experts]; num_layers] }
    }

    /// Feeds one step's loads (per layer) and returns the `(layer, expert)` pairs idle for at
    /// least `patience` steps.
    pub fn update(&mut self, loads: &[Vec<u64>]) -> Vec<(usize, usize)> {
        let mut idle = Vec::new();
        for (layer, (steps, load)) in self.idle_steps.iter_mut().zip(loads).enumerate() {
            for (expert, (s, &l)) in steps.iter_mut().zip(load).enumerate() {
                *s = if l == 0 { *s + 1 } else { 0 };
                if *s >= self.patience {
                    idle.push((layer, expert));
                }
            }
        }
        idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_violation_of_even_and_skewed_loads() {
        assert_eq!(max_violation(&[5, 5, 5, 5]), 0.0);
        assert_eq!(max_violation(&[10, 2, 2, 2]), 1.5);
        assert_eq!(max_violation(&[0, 0]), 0.0);
    }

    #[test]
    fn eval_max_violation_sums_before_measuring() {
        let mut m = EvalMaxVio::default();
        m.add(&[4, 0]);
        m.add(&[0, 4]);
        assert_eq!(m.value(), 0.0);
    }

    #[test]
    fn collapse_alarm_fires_after_patience_and_resets() {
        let mut alarm = CollapseAlarm::new(1, 3, 2);
        assert!(alarm.update(&[vec![1, 0, 1]]).is_empty());
        assert_eq!(alarm.update(&[vec![1, 0, 1]]), vec![(0, 1)]);
        assert!(alarm.update(&[vec![1, 3, 1]]).is_empty());
    }

    #[test]
    fn histogram_sums_to_one() {
        let h = load_histogram(&[1, 3]);
        assert_eq!(h, vec![0.25, 0.75]);
    }
}
