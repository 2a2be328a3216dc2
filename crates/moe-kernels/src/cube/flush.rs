//! When the MoE kernels hand queued work on to the device.
//!
//! burn 0.21 moves work through two queues, each served by its own thread (cubecl-common's
//! channel device handle): burn-fusion's operations, then cubecl's launches. A queue's thread
//! takes tasks 32 at a time, or earlier only when a caller blocks on it (a read, a sync). A
//! forward of one small MoE layer registers fewer than 32 operations after the plan's host read,
//! so without a flush its GEMMs would reach the GPU only at the caller's next sync: the device
//! idles while the host enqueues, then the host waits while the device works.

use burn_backend::{Device as _, DeviceHandle};
use burn_cubecl::CubeRuntime;

/// Which queues the kernels flush (`MOE_FLUSH`: `off`, `fusion`, `all`; `all` by default; the
/// others are for before/after measurements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// Leave both queues to fill up or to the caller's next sync.
    Off,
    /// After registering a kernel, wake burn-fusion's thread (does not wait).
    Fusion,
    /// [`FlushPolicy::Fusion`], and after launching a GEMM, hand cubecl's queue to its thread
    /// (waits for neither that thread nor the device).
    All,
}

impl FlushPolicy {
    /// The policy of this process ([`super::settings::Settings::flush`]).
    pub fn current() -> Self {
        super::settings::settings().flush
    }

    /// Whether kernels registered in burn-fusion's queue wake its thread.
    pub fn flushes_fusion(self) -> bool {
        self != Self::Off
    }

    /// Whether a GEMM launch hands cubecl's queue on to its thread.
    pub fn flushes_launches(self) -> bool {
        self == Self::All
    }
}

/// After a GEMM launch on `device`: hands cubecl's queue on to its thread when the policy says
/// so, through the queue's handle (`ComputeClient::flush` would also wait for that thread).
pub(crate) fn hand_on_launches<R: CubeRuntime>(device: &R::Device) {
    if FlushPolicy::current().flushes_launches() {
        DeviceHandle::<R::Server>::new(device.to_id()).flush_queue();
    }
}
