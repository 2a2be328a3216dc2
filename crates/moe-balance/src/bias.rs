use burn::config::Config;

/// Settings of the loss-free bias update.
#[derive(Config, Debug, PartialEq)]
pub struct BiasUpdateConfig {
    /// Step size `gamma` of `b += gamma * sign(mean - load)`.
    #[config(default = 1e-3)]
    pub gamma: f64,
    /// Subtract the mean of each update so the biases stay zero-mean (torchtitan 1506); the
    /// selection is unchanged by a common shift, so this only keeps the numbers small.
    #[config(default = false)]
    pub recenter: bool,
    /// Freeze the biases (no update).
    #[config(default = false)]
    pub frozen: bool,
}

/// DeepSeek-V3's auxiliary-loss-free balancer.
#[derive(Debug, Clone)]
pub struct BiasBalancer {
    config: BiasUpdateConfig,
}

impl BiasBalancer {
    /// A balancer with the given settings.
    pub fn new(config: BiasUpdateConfig) -> Self {
        Self { config }
    }

    /// The bias change for one optimizer step from the step's per-expert `load`:
    /// overloaded experts go down by gamma, underloaded ones up, exact ones stay.
    pub fn bias_delta(&self, load: &[u64]) -> Vec<f32> {
        if self.config.frozen || load.is_empty() {
            return vec![0.0; load.len()];
        }
        let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
        let gamma = self.config.gamma;
        let mut delta: Vec<f64> = load
            .iter()
            .map(|&l| {
                let gap = mean - l as f64;
                if gap > 0.0 {
                    gamma
                } else if gap < 0.0 {
                    -gamma
                } else {
                    0.0
                }
            })
            .collect();
        if self.config.recenter {
            let shift = delta.iter().sum::<f64>() / delta.len() as f64;
            delta.iter_mut().for_each(|d| *d -= shift);
        }
        delta.into_iter().map(|d| d as f32).collect()
    }

    /// The settings.
    pub fn config(&self) -> &BiasUpdateConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recentered_update_has_zero_mean() {
        let b = BiasBalancer::new(BiasUpdateConfig::new().with_recenter(true));
        let d = b.bias_delta(&[10, 0, 0, 2]);
        assert!(d.iter().sum::<f32>().abs() < 1e-9, "{d:?}");
        assert!(d[0] < 0.0 && d[1] > 0.0);
    }

    #[test]
    fn frozen_or_gamma_zero_never_moves() {
        assert_eq!(BiasBalancer::new(BiasUpdateConfig::new().with_frozen(true)).bias_delta(&[9, 1]), vec![0.0, 0.0]);
        assert_eq!(BiasBalancer::new(BiasUpdateConfig::new().with_gamma(0.0)).bias_delta(&[9, 1]), vec![0.0, 0.0]);
    }
}
