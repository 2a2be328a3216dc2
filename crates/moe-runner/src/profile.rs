//! `--profile`: where a training step's time goes. The device is synchronised at the end of
//! each phase, so a phase's time is its own GPU work plus its host dispatch, with no overlap
//! between phases (a profiled step is slower than a plain one; the split is what it is for).

use std::time::Instant;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

/// Seconds per phase of one optimizer step.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct StepPhases {
    /// The forward passes and the losses.
    pub forward_s: f64,
    /// The loss values read to the host for the log.
    pub loss_read_s: f64,
    /// The backward passes and the gradient accumulation.
    pub backward_s: f64,
    /// AdamW (with clipping).
    pub optimizer_s: f64,
    /// The expert loads read to the host and the bias update.
    pub balance_s: f64,
}

/// The phases [`StepPhases`] splits a step into.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    /// See [`StepPhases::forward_s`].
    Forward,
    /// See [`StepPhases::loss_read_s`].
    LossRead,
    /// See [`StepPhases::backward_s`].
    Backward,
    /// See [`StepPhases::optimizer_s`].
    Optimizer,
    /// See [`StepPhases::balance_s`].
    Balance,
}

/// Times the phases of a step on `device` when on; costs nothing when off.
#[derive(Debug)]
pub struct PhaseClock<'a, B: Backend> {
    device: Option<&'a B::Device>,
    last: Instant,
    phases: StepPhases,
}

impl<'a, B: Backend> PhaseClock<'a, B> {
    /// A clock for one step, timing only when `on`.
    pub fn start(device: &'a B::Device, on: bool) -> Self {
        Self { device: on.then_some(device), last: Instant::now(), phases: StepPhases::default() }
    }

    /// Ends `phase`: waits for the device's queued work and adds the time since the last mark.
    pub fn mark(&mut self, phase: Phase) {
        let Some(device) = self.device else { return };
        // A failed sync surfaces at the next read of a tensor, which reports it.
        let _ = B::sync(device);
        let now = Instant::now();
        let seconds = (now - self.last).as_secs_f64();
        self.last = now;
        let slot = match phase {
            Phase::Forward => &mut self.phases.forward_s,
            Phase::LossRead => &mut self.phases.loss_read_s,
            Phase::Backward => &mut self.phases.backward_s,
            Phase::Optimizer => &mut self.phases.optimizer_s,
            Phase::Balance => &mut self.phases.balance_s,
        };
        *slot += seconds;
    }

    /// The step's split, when timing.
    pub fn finish(self) -> Option<StepPhases> {
        self.device.map(|_| self.phases)
    }
}

/// The median of each phase over `steps` (the caller leaves out the warm-up steps), in ms, as
/// one line.
pub fn median_line(steps: &[StepPhases]) -> String {
    let median = |f: fn(&StepPhases) -> f64| {
        let mut values: Vec<f64> = steps.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(0.0) * 1e3
    };
    format!(
        "step phases (median of {} steps, ms): forward {:.1}, loss read {:.1}, backward {:.1}, optimizer {:.1}, balance {:.1}",
        steps.len(),
        median(|p| p.forward_s),
        median(|p| p.loss_read_s),
        median(|p| p.backward_s),
        median(|p| p.optimizer_s),
        median(|p| p.balance_s),
    )
}
